// Compile-time configuration of the Hopper forward: tile sizes, the swizzled shared-memory
// layouts that both the TMA engine and wgmma understand, the warpgroup MMAs, the TMA copy types
// and the shared-memory plan.
//
// One CTA computes BLOCK_M = 128 query rows of one (batch, head): warpgroup 0 is the producer
// (TMA loads), warpgroups 1 and 2 are the consumers, 64 query rows each.
#pragma once

#include <cutlass/numeric_types.h>

#include <cstdint>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
// The 64x80 wgmma atoms of head dim 256 (outside CuTe's default set).
#include <cute/arch/mma_sm90_gmma_ext.hpp>
#include <cute/atom/mma_traits_sm90_gmma_ext.hpp>
#include <cute/tensor.hpp>
#include <type_traits>

namespace aigc_ext {
namespace cuda {
namespace sm90 {

// The wgmma of S = Q K^T for one warpgroup: 64 x kBlockN x 16, both operands K-major in shared
// memory. CuTe's selector only picks power-of-two-like N; 80 is chosen here by name.
template <typename Element, int kBlockN, int kHeadDim>
struct QKAtom {
  CUTE_HOST_DEVICE static auto make() {
    if constexpr (kBlockN == 80) {
      constexpr auto K = cute::GMMA::Major::K;
      if constexpr (std::is_same_v<Element, cutlass::half_t>)
        return cute::SM90_64x80x16_F32F16F16_SS<K, K>{};
      else
        return cute::SM90_64x80x16_F32BF16BF16_SS<K, K>{};
    } else {
      return cute::GMMA::ss_op_selector<
          Element, Element, float,
          cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kHeadDim>>>();
    }
  }
};

template <int kHeadDim_, typename Element_>
struct FwdTraits {
  using Element = Element_;  // cutlass::half_t or cutlass::bfloat16_t
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;
  // Head dim 256: 80 keys a block, so that Q and two K/V stages fit in 227 KB.
  static constexpr int kBlockN = kHeadDim == 256 ? 80 : 128;
  static constexpr int kStages = kHeadDim <= 64 ? 3 : 2;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256,
                "head dims 64, 128 and 256 are instantiated");

  using BM = cute::Int<kBlockM>;
  using BN = cute::Int<kBlockN>;
  using HD = cute::Int<kHeadDim>;
  using ST = cute::Int<kStages>;

  // Rows of 64 elements (128 bytes) with the 128-byte swizzle: K-major for Q and K (the
  // reduction dim of S = Q K^T is the head dim, contiguous) and, viewed transposed, MN-major
  // for V as the B operand of O = P V.
  using SmemAtom = decltype(cute::GMMA::Layout_K_SW128_Atom<Element>{});
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<BM, HD>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<BN, HD, ST>{}));
  using SmemLayoutV = SmemLayoutK;
  // V as (head dim, keys, stage): the same bytes, read as the MN-major B operand.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutV{}, cute::make_ordered_layout(cute::Shape<HD, BN, ST>{},
                                               cute::Step<cute::_2, cute::_1, cute::_3>{})));
  // One stage of K or V, the box of one TMA load.
  using SmemLayoutKStage = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<BN, HD>{}));

  // Per consumer warpgroup: 64 query rows; the two warpgroups tile BLOCK_M.
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kConsumerWarpgroups>, cute::_1, cute::_1>>;
  using TiledMmaQK =
      decltype(cute::make_tiled_mma(QKAtom<Element, kBlockN, kHeadDim>::make(), AtomLayout{}));
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, HD, BN>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      AtomLayout{}));

  // Global tensors as CuTe sees them for the TMA descriptors: (rows, head dim, head, batch),
  // element strides, the head dim contiguous.
  using GShape = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
  using GStride = cute::Stride<int64_t, cute::_1, int64_t, int64_t>;
  using GTensor = decltype(cute::make_tensor(
      cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{}, GStride{}));
  using TmaQ = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GTensor{}, SmemLayoutQ{}));
  using TmaKV = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GTensor{}, SmemLayoutKStage{}));

  // The bytes each TMA load writes into shared memory (a box is always written in full,
  // out-of-bounds rows as zeros), which the full barriers expect.
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);
  static_assert(cute::cosize_v<SmemLayoutQ> * sizeof(Element) == kQBytes);
  static_assert(cute::cosize_v<SmemLayoutKStage> * sizeof(Element) == kKVBytes);
  static_assert(cute::cosize_v<SmemLayoutK> * sizeof(Element) == kKVBytes * kStages);
};

// Shared memory of one CTA. Every tile starts on a 1024-byte boundary (the period of the
// 128-byte swizzle); the kernel aligns the dynamic shared-memory base itself.
template <class Traits>
struct SharedStorage {
  using Element = typename Traits::Element;
  alignas(1024) Element q[cute::cosize_v<typename Traits::SmemLayoutQ>];
  alignas(1024) Element k[cute::cosize_v<typename Traits::SmemLayoutK>];
  alignas(1024) Element v[cute::cosize_v<typename Traits::SmemLayoutV>];
  alignas(8) uint64_t bar_q;             // Q landed (single use)
  uint64_t bar_k_full[Traits::kStages];  // K tile of the stage landed
  uint64_t bar_v_full[Traits::kStages];  // V tile of the stage landed
  uint64_t bar_empty[Traits::kStages];   // both consumers are done with the stage
};

// What the kernel needs besides the TMA descriptors.
struct FwdScalars {
  int batch, heads_q, heads_kv, group;  // group = heads_q / heads_kv
  int len_q, len_kv, num_m_blocks;
  int len_kv_tma;                 // max(len_kv, 1): the key rows of the K/V descriptors
  int diag;                       // d: key j = query i + d is the diagonal
  int window_left, window_right;  // -1: unbounded
  // The softmax's scale of the scores in the wgmma accumulator (scale > 0), as is and times
  // log2(e); with softcap > 0 the accumulator first becomes softcap * tanh(s * softcap_prescale)
  // (already scaled: scale is then 1).
  float scale, scale_log2;
  float softcap, softcap_prescale;
  void* out;
  float* lse;
  int64_t out_stride_b, out_stride_h, out_stride_l;
  int64_t lse_stride_b, lse_stride_h, lse_stride_l;
};

template <class Traits>
struct FwdKernelArgs {
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  FwdScalars s;
};

}  // namespace sm90
}  // namespace cuda
}  // namespace aigc_ext
