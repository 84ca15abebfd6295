// Backward, dQ: one CTA per (query block of kBlockM rows, query head, batch row), flattened on
// grid x. The CTA holds its Q and dO tiles and walks the key blocks of its band (the same as
// the forward's), K and V double-buffered (the next block's cp.async runs during this one's
// products):
//   S = Q K^T, dP = dO V^T (fp32), P = exp2(score - lse) recomputed from the forward's lse,
//   dS = P * (dP - D) * (1 - tanh^2 with softcap) * scale, dQ += dS K (dS from registers).
// No atomics: each dQ element is summed by one thread in a fixed order (deterministic). Rows
// that saw no key (lse = -inf) get P = 0, hence dQ = 0; a block outside every band is
// written as zeros.
#pragma once

#include <cmath>
#include <cstdint>
#include <cute/tensor.hpp>

#include "attention_params.h"
#include "cuda/sm80/kernel_traits.cuh"
#include "cuda/sm80/mma_utils.cuh"
#include "cuda/sm80/score_mod.cuh"
#include "cuda/sm80/seq_info.cuh"
#include "cuda/sm80/tile_copy.cuh"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

template <class Tr>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
    flash_bwd_dq_kernel(const __grid_constant__ AttentionBackwardParams bp, const float* ws_d,
                        const float* ws_lse) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim;
  static_assert(kBlockM % (16 * Tr::kNWarps) == 0, "warps stacked along the queries");
  using GmemCopy = typename Tr::GmemCopy;
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  const AttentionForwardParams& p = bp.fwd;

  const int64_t num_m_blocks = (p.len_q + kBlockM - 1) / kBlockM;
  const int64_t bid = blockIdx.x;
  const int m_block = static_cast<int>(num_m_blocks - 1 - bid % num_m_blocks);
  const int64_t bh = bid / num_m_blocks;
  const int h = static_cast<int>(bh % p.heads_q), b = static_cast<int>(bh / p.heads_q);
  const int hk = static_cast<int>(h / (p.heads_q / p.heads_kv));
  const SeqInfo seq = seq_info(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.len_q) return;
  const int rows = min(kBlockM, seq.len_q - m0);
  const int E = static_cast<int>(p.head_dim), Ev = static_cast<int>(p.head_dim_v);

  const int64_t q_row = seq.q_row0 + m0;
  const Element* q =
      static_cast<const Element*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + q_row * p.q_stride_l;
  const Element* dout = static_cast<const Element*>(bp.grad_out) + b * p.out_stride_b +
                        h * p.out_stride_h + q_row * p.out_stride_l;
  const Element* k = static_cast<const Element*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h +
                     seq.k_row0 * p.k_stride_l;
  const Element* v = static_cast<const Element*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h +
                     seq.k_row0 * p.v_stride_l;
  const bool vec_q = vec_ok(E, p.q_stride_b, p.q_stride_h, p.q_stride_l);
  const bool vec_do = vec_ok(Ev, p.out_stride_b, p.out_stride_h, p.out_stride_l);
  const bool vec_k = vec_ok(E, p.k_stride_b, p.k_stride_h, p.k_stride_l);
  const bool vec_v = vec_ok(Ev, p.v_stride_b, p.v_stride_h, p.v_stride_l);
  const ScoreMod<Element> score = make_score_mod<Element>(p, seq, b, h);

  const int n_lo = seq.lo(m0), n_hi = seq.hi(m0 + rows - 1);
  const int n_block_min = n_lo / kBlockN;
  const int n_block_max = n_hi > n_lo ? (n_hi + kBlockN - 1) / kBlockN : n_block_min;
  const int full_lo = seq.lo(m0 + rows - 1), full_hi = seq.hi(m0);

  Element* base = reinterpret_cast<Element*>(smem);
  Tensor sQ = make_tensor(make_smem_ptr(base), typename Tr::SmemLayoutQ{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Tr::SmemLayoutQ{});
  Tensor sK0 = make_tensor(sdO.data() + size(sdO), typename Tr::SmemLayoutKV{});
  // Stage s of K is at sK0 + s * size, V's stages follow K's.
  const auto kv_size = size(sK0);
  Tensor sKtNoSwizzle = make_tensor(sK0.data(), typename Tr::SmemLayoutKtNoSwizzle{});

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK0);
  Tensor tdPrdO = thr_mma.partition_fragment_A(sdO);
  Tensor tdPrV = thr_mma.partition_fragment_B(sK0);
  Tensor tdQrKt = thr_mma.partition_fragment_B(sKtNoSwizzle);
  auto copy_a = make_tiled_copy_A(LdsmN<Element>{}, mma);
  auto copy_b = make_tiled_copy_B(LdsmN<Element>{}, mma);
  auto copy_bt = make_tiled_copy_B(LdsmT<Element>{}, mma);
  Tensor tSsQ = copy_a.get_thread_slice(tid).partition_S(sQ);
  Tensor tdPsdO = copy_a.get_thread_slice(tid).partition_S(sdO);

  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_dq);
  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS_rc = rowcol(cS);
  constexpr int kRows = decltype(size<0>(cS_rc))::value;
  float lse2[kRows], dsum[kRows];
  const int64_t ws_row0 = (static_cast<int64_t>(b) * p.heads_q + h) * p.len_q + m0;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int i = get<0>(cS_rc(r, 0));
    lse2[r] = i < rows ? ws_lse[ws_row0 + i] : INFINITY;
    dsum[r] = i < rows ? ws_d[ws_row0 + i] : 0.f;
  }

  auto load_kv = [&](int n_block, int stage) {
    const int n0 = n_block * kBlockN;
    Tensor sK = make_tensor(sK0.data() + stage * kv_size, typename Tr::SmemLayoutKV{});
    Tensor sV = make_tensor(sK0.data() + (2 + stage) * kv_size, typename Tr::SmemLayoutKV{});
    load_tile<GmemCopy>(k + n0 * p.k_stride_l, p.k_stride_l, seq.len_k - n0, E, vec_k, sK, tid);
    load_tile<GmemCopy>(v + n0 * p.v_stride_l, p.v_stride_l, seq.len_k - n0, Ev, vec_v, sV, tid);
  };

  load_tile<GmemCopy>(q, p.q_stride_l, rows, E, vec_q, sQ, tid);
  load_tile<GmemCopy>(dout, p.out_stride_l, rows, Ev, vec_do, sdO, tid);
  if (n_block_max > n_block_min) load_kv(n_block_min, 0);
  cp_async_fence();

  for (int n_block = n_block_min; n_block < n_block_max; ++n_block) {
    const int stage = (n_block - n_block_min) & 1;
    if (n_block + 1 < n_block_max) {
      load_kv(n_block + 1, stage ^ 1);
      cp_async_fence();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this block's K and V (and Q, dO) in shared memory
    const int n0 = n_block * kBlockN;
    Tensor sK = make_tensor(sK0.data() + stage * kv_size, typename Tr::SmemLayoutKV{});
    Tensor sV = make_tensor(sK0.data() + (2 + stage) * kv_size, typename Tr::SmemLayoutKV{});
    Tensor sKt = make_tensor(sK.data(), typename Tr::SmemLayoutKt{});

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(mma, acc_s, tSrQ, tSrK, tSsQ, copy_b.get_thread_slice(tid).partition_S(sK), copy_a,
            copy_b, tid);
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_ss(mma, acc_dp, tdPrdO, tdPrV, tdPsdO, copy_b.get_thread_slice(tid).partition_S(sV),
            copy_a, copy_b, tid);

    // dS, in place of dP.
    Tensor s_rc = rowcol(acc_s);
    Tensor dp_rc = rowcol(acc_dp);
    const bool fast = score.plain() && n0 >= full_lo && n0 + kBlockN <= full_hi;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const auto row = score.row(m0 + get<0>(cS_rc(r, 0)));
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s_rc); ++c) {
        float t = 0.f;
        const float x = fast ? s_rc(r, c) * score.scale_log2
                             : score(s_rc(r, c), row, n0 + get<1>(cS_rc(0, c)), &t);
        const float pr = exp2f(x - lse2[r]);
        float ds = pr * (dp_rc(r, c) - dsum[r]);
        if (score.softcap > 0.f) ds *= 1.f - t * t;
        dp_rc(r, c) = ds * score.scale;
      }
    }
    Tensor tdQrdS = acc_to_a_operand<Element>(acc_dp);
    gemm_rs(mma, acc_dq, tdQrdS, tdQrKt, copy_bt.get_thread_slice(tid).partition_S(sKt), copy_bt,
            tid);
    __syncthreads();  // every thread done with this stage before it is refilled
  }

  cp_async_wait<0>();
  __syncthreads();
  Tensor sdQ = make_tensor(sQ.data(), typename Tr::SmemLayoutQ{});
  acc_to_smem(mma, acc_dq, sdQ, tid);
  __syncthreads();
  Element* dq = static_cast<Element*>(bp.grad_q) + b * bp.dq_stride_b + h * bp.dq_stride_h +
                q_row * bp.dq_stride_l;
  const bool vec_dq = vec_ok(E, bp.dq_stride_b, bp.dq_stride_h, bp.dq_stride_l);
  store_tile<GmemCopy>(dq, bp.dq_stride_l, rows, E, vec_dq, sdQ, tid);
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
