// Compile-time configuration of the sm80 kernels: element type, head dim (the kernel's; calls
// with smaller head dims zero-fill the columns beyond theirs), tile sizes, warps, the tensor-core
// MMA (mma.sync m16n8k16, fp32 accumulators), the swizzled shared-memory layouts and the copy
// atoms (ldmatrix, plain and transposed).
//
// Shared tiles are rows of kHeadDim elements built from 8 x 64 atoms with a Swizzle<3,3,3>: the
// 16-byte chunks of a row are XOR-permuted by the row index, so that the eight rows an ldmatrix
// phase reads (and the rows cp.async writes) hit distinct banks. Warps are stacked along the
// first (M) dimension of every product: warp w owns rows [16w, 16w + 16) of each 16*kNWarps rows,
// so the row statistics of the softmax stay within a warp (a quad of lanes shares a row).
#pragma once

#include <cute/tensor.hpp>
#include <type_traits>

namespace aigc_ext {
namespace cuda {
namespace sm80 {

using namespace cute;

template <typename Element>
using MmaAtomFor = std::conditional_t<std::is_same_v<Element, cute::half_t>,
                                      MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                      MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;

template <typename Element, int kNWarps>
using TiledMmaFor = TiledMMA<MmaAtomFor<Element>, Layout<Shape<Int<kNWarps>, _1, _1>>,
                             Tile<Int<16 * kNWarps>, _16, _16>>;

using SmemLayoutAtom =
    decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));

// A (rows x cols) tile of row-major rows, swizzled; cols is a multiple of 64.
template <int kRows, int kCols>
using SmemTile = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kRows>, Int<kCols>>{}));

// The (cols x rows) transposed view of a SmemTile<kRows, kCols>, and its layout without the
// swizzle (for sizing register fragments).
template <int kRows, int kCols>
using SmemTileT = decltype(composition(
    SmemTile<kRows, kCols>{}, make_layout(Shape<Int<kCols>, Int<kRows>>{}, GenRowMajor{})));
template <int kRows, int kCols>
using SmemTileTNoSwizzle = decltype(get_nonswizzle_portion(SmemTileT<kRows, kCols>{}));

template <typename Element>
using LdsmN = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
template <typename Element>
using LdsmT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;

// Thread partition of a (rows x kHeadDim) tile for global <-> shared copies: 8 threads per 64
// columns, 8 contiguous elements (16 bytes) each.
template <typename Element, int kNThreads>
using GmemTiledCopy = decltype(make_tiled_copy(
    Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{},
    Layout<Shape<Int<kNThreads / 8>, _8>, Stride<_8, _1>>{}, Layout<Shape<_1, _8>>{}));

// Forward: kBlockM query rows per CTA, key blocks of kBlockN; Q, K and V tiles in shared memory
// (the output tile is staged in Q's).
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_, kNThreads = 32 * kNWarps_;
  static_assert(kBlockM % (16 * kNWarps) == 0 && kBlockN % 16 == 0 && kHeadDim % 64 == 0);
  static_assert(kBlockM % (kNThreads / 8) == 0 && kBlockN % (kNThreads / 8) == 0);
  using TiledMma = TiledMmaFor<Element, kNWarps>;
  using SmemLayoutQ = SmemTile<kBlockM, kHeadDim>;
  using SmemLayoutKV = SmemTile<kBlockN, kHeadDim>;
  using SmemLayoutVt = SmemTileT<kBlockN, kHeadDim>;
  using SmemLayoutVtNoSwizzle = SmemTileTNoSwizzle<kBlockN, kHeadDim>;
  using GmemCopy = GmemTiledCopy<Element, kNThreads>;
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * sizeof(Element);
};

// Backward. dK/dV: a CTA holds one block of kBlockN keys (K and V tiles) and streams blocks of
// kBlockM query rows (Q and dO tiles, double-buffered). dQ: a CTA holds kBlockM query rows (Q
// and dO) and streams key blocks (K and V, double-buffered). The dK/dV products are computed
// transposed (keys along M) so that P^T and dS^T come out of the accumulators directly as the
// A operands of dV += P^T dO and dK += dS^T Q, without a trip through shared memory.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_, kNThreads = 32 * kNWarps_;
  static_assert(kHeadDim % 64 == 0 && kBlockM % 16 == 0 && kBlockN % 16 == 0);
  static_assert(kBlockM % (kNThreads / 8) == 0 && kBlockN % (kNThreads / 8) == 0);
  using TiledMma = TiledMmaFor<Element, kNWarps>;
  using SmemLayoutQ = SmemTile<kBlockM, kHeadDim>;    // Q and dO tiles
  using SmemLayoutKV = SmemTile<kBlockN, kHeadDim>;   // K and V tiles
  using SmemLayoutQt = SmemTileT<kBlockM, kHeadDim>;  // Q^T, dO^T (dK/dV kernel)
  using SmemLayoutQtNoSwizzle = SmemTileTNoSwizzle<kBlockM, kHeadDim>;
  using SmemLayoutKt = SmemTileT<kBlockN, kHeadDim>;  // K^T (dQ kernel)
  using SmemLayoutKtNoSwizzle = SmemTileTNoSwizzle<kBlockN, kHeadDim>;
  using GmemCopy = GmemTiledCopy<Element, kNThreads>;
  // dK/dV: K, V once, Q and dO twice. dQ: Q, dO once, K and V twice.
  static constexpr int kSmemDkdv = (2 * kBlockN + 4 * kBlockM) * kHeadDim * sizeof(Element);
  static constexpr int kSmemDq = (2 * kBlockM + 4 * kBlockN) * kHeadDim * sizeof(Element);
};

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
