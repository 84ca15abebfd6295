// The Hopper (sm_90a) FlashAttention forward kernel.
//
// One CTA = 128 query rows of one (batch, head), three warpgroups:
//  * warpgroup 0, the producer: one thread issues the TMA loads, Q once, then the K and V tiles
//    of each key block into a ring of kStages stages. Each stage has a "full" mbarrier for K
//    and one for V (armed with the byte count of the tile) and an "empty" mbarrier on which the
//    256 consumer threads arrive once done with the stage;
//  * warpgroups 1 and 2, the consumers, 64 query rows each: S = Q K^T by wgmma from shared
//    memory, the online softmax on the accumulator registers, then O += P V by wgmma with P
//    from registers and V from shared memory; finally O / rowsum and the logsumexp.
// setmaxnreg hands the producer's registers to the consumers. Key blocks outside the causal
// band / window are never loaded; only the blocks that straddle a boundary are masked.
#pragma once

#include <cuda_runtime_api.h>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <cmath>
#include <cute/tensor.hpp>

#include "cuda/sm90/flash_fwd_sm90_fragment.cuh"
#include "cuda/sm90/flash_fwd_sm90_traits.cuh"

namespace aigc_ext {
namespace cuda {
namespace sm90 {

// The key blocks [n_begin, n_end) that hold a key visible to some row of query block m_block.
struct KeyBlocks {
  int n_begin, n_end;
};

template <class Traits>
CUTE_HOST_DEVICE KeyBlocks key_blocks(const FwdScalars& s, int m_block) {
  const int64_t m0 = int64_t(m_block) * Traits::kBlockM;
  const int64_t m_last = (m0 + Traits::kBlockM < s.len_q ? m0 + Traits::kBlockM : s.len_q) - 1;
  int64_t j_begin = 0, j_end = s.len_kv;
  if (s.window_left >= 0) {
    const int64_t lo = m0 + s.diag - s.window_left;
    j_begin = lo > 0 ? lo : 0;
  }
  if (s.window_right >= 0) {
    const int64_t hi = m_last + s.diag + s.window_right + 1;
    j_end = hi < j_end ? hi : j_end;
  }
  if (j_end <= j_begin) return {0, 0};
  return {int(j_begin / Traits::kBlockN), int((j_end + Traits::kBlockN - 1) / Traits::kBlockN)};
}

// Whether key block n_block has keys outside [0, len_kv) or outside the band of some stored row
// of the query block (then it is masked element by element).
template <class Traits>
CUTE_HOST_DEVICE bool block_needs_mask(const FwdScalars& s, int m_block, int n_block) {
  const int64_t m0 = int64_t(m_block) * Traits::kBlockM;
  const int64_t m_last = (m0 + Traits::kBlockM < s.len_q ? m0 + Traits::kBlockM : s.len_q) - 1;
  const int64_t j0 = int64_t(n_block) * Traits::kBlockN, j_last = j0 + Traits::kBlockN - 1;
  if (j_last >= s.len_kv) return true;
  if (s.window_right >= 0 && j_last > m0 + s.diag + s.window_right) return true;
  if (s.window_left >= 0 && j0 < m_last + s.diag - s.window_left) return true;
  return false;
}

CUTE_HOST_DEVICE int clamp_key(int64_t j, int len_kv) {
  return int(j < 0 ? 0 : (j > len_kv ? len_kv : j));
}

// The keys [lo, hi) visible to query row i (of the sequence; any i, also past len_q).
struct KeyRange {
  int lo, hi;
};

CUTE_HOST_DEVICE KeyRange row_keys(const FwdScalars& s, int64_t i) {
  KeyRange k{0, s.len_kv};
  if (s.window_left >= 0) k.lo = clamp_key(i + s.diag - s.window_left, s.len_kv);
  if (s.window_right >= 0) k.hi = clamp_key(i + s.diag + s.window_right + 1, s.len_kv);
  return k;
}

// Scores of keys outside the row's visible range become -inf (S_rc and C_rc: the score
// fragment and its (row, col) coordinates within the tile, both as (rows, cols)).
template <class TensorS, class TensorC>
__device__ __forceinline__ void mask_scores(TensorS& S_rc, const TensorC& C_rc, const FwdScalars& s,
                                            int m0, int n0) {
  using namespace cute;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(S_rc); ++r) {
    const KeyRange keys = row_keys(s, int64_t(m0) + get<0>(C_rc(r, 0)));
    CUTE_UNROLL
    for (int c = 0; c < size<1>(S_rc); ++c) {
      const int j = n0 + get<1>(C_rc(r, c));
      if (j < keys.lo || j >= keys.hi) S_rc(r, c) = -INFINITY;
    }
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ FwdKernelArgs<Traits> args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Element = typename Traits::Element;
  using BM = typename Traits::BM;
  using BN = typename Traits::BN;
  using HD = typename Traits::HD;
  constexpr int kStages = Traits::kStages;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;

  extern __shared__ char smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes: align the tiles to it.
  const uintptr_t base = (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023);
  auto& ss = *reinterpret_cast<SharedStorage<Traits>*>(base);

  const FwdScalars& sc = args.s;
  const int bid = blockIdx.x;
  // The longest query blocks (most keys under causal masking) first.
  const int m_block = sc.num_m_blocks - 1 - bid % sc.num_m_blocks;
  const int bh = bid / sc.num_m_blocks;
  const int h = bh % sc.heads_q;
  const int b = bh / sc.heads_q;
  const int h_kv = h / sc.group;
  const KeyBlocks kb = key_blocks<Traits>(sc, m_block);
  const int n_blocks = kb.n_end - kb.n_begin;

  const int warpgroup = __shfl_sync(0xffffffff, int(threadIdx.x) / 128, 0);
  if (threadIdx.x == 0) {
    Barrier::init(&ss.bar_q, 1);
    CUTE_UNROLL
    for (int st = 0; st < kStages; ++st) {
      Barrier::init(&ss.bar_k_full[st], 1);
      Barrier::init(&ss.bar_v_full[st], 1);
      Barrier::init(&ss.bar_empty[st], Traits::kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    const int warp = __shfl_sync(0xffffffff, int(threadIdx.x) / 32, 0);
    if (warp == 0 && n_blocks > 0 && elect_one_sync()) {
      Tensor mQ = args.tma_q.get_tma_tensor(make_shape(sc.len_q, int(HD{}), sc.heads_q, sc.batch));
      Tensor mK =
          args.tma_k.get_tma_tensor(make_shape(sc.len_kv_tma, int(HD{}), sc.heads_kv, sc.batch));
      Tensor mV =
          args.tma_v.get_tma_tensor(make_shape(sc.len_kv_tma, int(HD{}), sc.heads_kv, sc.batch));
      Tensor gQ = local_tile(mQ(_, _, h, b), Shape<BM, HD>{}, make_coord(m_block, 0));  // (BM, HD)
      Tensor gK = local_tile(mK(_, _, h_kv, b), Shape<BN, HD>{}, make_coord(_, 0));  // (BN, HD, n)
      Tensor gV = local_tile(mV(_, _, h_kv, b), Shape<BN, HD>{}, make_coord(_, 0));  // (BN, HD, n)
      Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
      Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutK{});  // (BN, HD, st)
      Tensor sV = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutV{});  // (BN, HD, st)
      auto tma_q = args.tma_q.get_slice(0);
      auto tma_k = args.tma_k.get_slice(0);
      auto tma_v = args.tma_v.get_slice(0);
      Tensor tQg = tma_q.partition_S(gQ);
      Tensor tQs = tma_q.partition_D(sQ);
      Tensor tKg = tma_k.partition_S(gK);  // (TMA, TMA_N, TMA_K, n)
      Tensor tKs = tma_k.partition_D(sK);  // (TMA, TMA_N, TMA_K, st)
      Tensor tVg = tma_v.partition_S(gV);
      Tensor tVs = tma_v.partition_D(sV);

      TxBarrier::arrive_and_expect_tx(&ss.bar_q, Traits::kQBytes);
      copy(args.tma_q.with(ss.bar_q), tQg, tQs);
      for (int it = 0; it < n_blocks; ++it) {
        const int st = it % kStages;
        // Reuse of a stage waits for the consumers' release of its previous fill (phase flips
        // every wrap of the ring).
        if (it >= kStages) Barrier::wait(&ss.bar_empty[st], ((it / kStages) - 1) & 1);
        const int n_block = kb.n_begin + it;
        TxBarrier::arrive_and_expect_tx(&ss.bar_k_full[st], Traits::kKVBytes);
        copy(args.tma_k.with(ss.bar_k_full[st]), tKg(_, _, _, n_block), tKs(_, _, _, st));
        TxBarrier::arrive_and_expect_tx(&ss.bar_v_full[st], Traits::kKVBytes);
        copy(args.tma_v.with(ss.bar_v_full[st]), tVg(_, _, _, n_block), tVs(_, _, _, st));
      }
      // Stay until the consumers have released the last fills, so that no copy this thread
      // issued is still in flight when it exits.
      for (int it = n_blocks > kStages ? n_blocks - kStages : 0; it < n_blocks; ++it)
        Barrier::wait(&ss.bar_empty[it % kStages], (it / kStages) & 1);
    }
  } else {
    // ---------------------------------------------------------------- consumers
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    const int tidx = int(threadIdx.x) - 128;
    typename Traits::TiledMmaQK mma_qk;
    typename Traits::TiledMmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(tidx);
    auto thr_pv = mma_pv.get_thread_slice(tidx);

    Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutVt{});
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // descriptors (MMA, MMA_M, MMA_K)
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, st)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, st)
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<BM, BN>{});
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<BM, HD>{});
    Tensor S_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    Tensor O_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<BM, BN>{}));
    Tensor C_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    constexpr int kRows = decltype(size<0>(S_rc))::value;
    static_assert(kRows == decltype(size<0>(O_rc))::value);

    clear(tOrO);
    float row_max[kRows], row_sum[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
    const int m0 = m_block * Traits::kBlockM;
    const float scale_log2 = sc.scale_log2;

    // P of the previous key block, in registers as the A operand of O += P V.
    Tensor rP = make_tensor<Element>(tSrS.layout());
    Tensor tOrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
    float correction[kRows];

    // Software pipeline within the warpgroup: S of block it is computed (wgmma, asynchronous)
    // while O += P V of block it - 1 is in flight; the softmax of block it overlaps the latter.
    if (n_blocks > 0) {
      Barrier::wait(&ss.bar_q, 0);
      Barrier::wait(&ss.bar_k_full[0], 0);
      warpgroup_gemm<true, 0>(mma_qk, tSrQ, tSrK(_, _, _, 0), tSrS);
      if (sc.softcap > 0) apply_softcap(tSrS, sc.softcap_prescale, sc.softcap);
      if (block_needs_mask<Traits>(sc, m_block, kb.n_begin))
        mask_scores(S_rc, C_rc, sc, m0, kb.n_begin * Traits::kBlockN);
      online_softmax(S_rc, row_max, row_sum, correction, scale_log2);  // O is 0: no rescale
      convert_fragment(rP, tSrS);
    }
    for (int it = 1; it < n_blocks; ++it) {
      const int st = it % kStages, phase = (it / kStages) & 1;
      const int st_prev = (it - 1) % kStages, phase_prev = ((it - 1) / kStages) & 1;
      const int n_block = kb.n_begin + it;

      Barrier::wait(&ss.bar_k_full[st], phase);
      warpgroup_gemm<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, st), tSrS);
      Barrier::wait(&ss.bar_v_full[st_prev], phase_prev);
      warpgroup_gemm<false, -1>(mma_pv, tOrP, tOrV(_, _, _, st_prev), tOrO);
      warpgroup_wait<1>();  // S of block it is complete (P V of it - 1 may still run)
      warpgroup_fence_operand(tSrS);
      if (sc.softcap > 0) apply_softcap(tSrS, sc.softcap_prescale, sc.softcap);
      if (block_needs_mask<Traits>(sc, m_block, n_block))
        mask_scores(S_rc, C_rc, sc, m0, n_block * Traits::kBlockN);
      online_softmax(S_rc, row_max, row_sum, correction, scale_log2);
      warpgroup_wait<0>();  // P V of block it - 1 is complete: O and rP are free again
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(rP);
      Barrier::arrive(&ss.bar_empty[st_prev]);  // this thread's reads of K, V of it - 1 are done
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(O_rc); ++c) O_rc(r, c) *= correction[r];
      }
      convert_fragment(rP, tSrS);
    }
    if (n_blocks > 0) {
      const int last = n_blocks - 1;
      const int st = last % kStages, phase = (last / kStages) & 1;
      Barrier::wait(&ss.bar_v_full[st], phase);
      warpgroup_gemm<false, 0>(mma_pv, tOrP, tOrV(_, _, _, st), tOrO);
      Barrier::arrive(&ss.bar_empty[st]);
    }

    // ---------------------------------------------------------------- epilogue
    float lse[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_sum(row_sum[r]);
      const bool any = sum > 0.f;
      const float inv = any ? 1.f / sum : 0.f;
      lse[r] = any ? row_max[r] * sc.scale + logf(sum) : -INFINITY;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(O_rc); ++c) O_rc(r, c) *= inv;
    }
    Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<BM, HD>{}));
    Tensor CO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
    Element* out = static_cast<Element*>(sc.out) + b * sc.out_stride_b + h * sc.out_stride_h;
    float* lse_out = sc.lse + b * sc.lse_stride_b + h * sc.lse_stride_h;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int row = m0 + get<0>(CO_rc(r, 0));
      if (row >= sc.len_q) continue;
      Element* out_row = out + int64_t(row) * sc.out_stride_l;
      // Columns c and c + 1 of the view are adjacent head-dim elements: one 4-byte store.
      CUTE_UNROLL
      for (int c = 0; c < size<1>(O_rc); c += 2) {
        cutlass::AlignedArray<Element, 2> pair;  // 4-byte aligned
        pair[0] = Element(O_rc(r, c));
        pair[1] = Element(O_rc(r, c + 1));
        *reinterpret_cast<cutlass::AlignedArray<Element, 2>*>(out_row + get<1>(CO_rc(r, c))) = pair;
      }
      if (get<1>(CO_rc(r, 0)) == 0) lse_out[int64_t(row) * sc.lse_stride_l] = lse[r];
    }
  }
#else
  __trap();  // built without sm_90a code: sm90_fwd_compiled() reports false, never launched
#endif
}

}  // namespace sm90
}  // namespace cuda
}  // namespace aigc_ext
