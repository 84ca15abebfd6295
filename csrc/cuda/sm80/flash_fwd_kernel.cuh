// The FlashAttention-2 forward on mma.sync tensor cores (sm80 and newer).
//
// One CTA per (query block of kBlockM rows, query head, batch row), flattened on grid x with the
// query blocks reversed (the longest causal blocks start first). The CTA loads its Q tile once,
// then walks the key blocks that some of its rows see (the causal/window band; blocks outside
// are never touched), from the last to the first:
//   S = Q K^T (fp32) -> scores in log2 units (scale, softcap, ALiBi, mask, band and lengths:
//   score_mod.cuh) -> online softmax (running row max m and sum l, the accumulator rescaled by
//   exp2(m_old - m_new)) -> O += P V with P converted to 16 bits in registers.
// K and V have their own shared tiles, so their cp.async loads alternate with the products:
// V(n) streams in during S = Q K(n)^T, K(n-1) during the softmax and P V(n). A row whose maximum
// is still -inf uses 0 as the reference, so that fully masked rows give P = 0 (never NaN), and
// finish with out = 0 and lse = -inf. lse is natural-log, of the scaled (modified) scores.
//
// Tiles (kBlockM x kBlockN, flash_fwd_hdim*.cu), chosen for zero register spills: head dim 64:
// 128 x 64, 4 warps (32 KB shared); 128: 128 x 64, 8 warps (64 KB); 256: 64 x 32, 4 warps
// (64 KB). All fit the 99 KB a CTA may have on every sm8x and sm90.
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
    flash_fwd_kernel(const __grid_constant__ AttentionForwardParams p) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim;
  using GmemCopy = typename Tr::GmemCopy;
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;

  const int64_t num_m_blocks = (p.len_q + kBlockM - 1) / kBlockM;
  const int64_t bid = blockIdx.x;
  const int m_block = static_cast<int>(num_m_blocks - 1 - bid % num_m_blocks);
  const int64_t bh = bid / num_m_blocks;
  const int h = static_cast<int>(bh % p.heads_q), b = static_cast<int>(bh / p.heads_q);
  const int hk = static_cast<int>(h / (p.heads_q / p.heads_kv));
  const SeqInfo seq = seq_info(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.len_q) return;  // past this sequence's rows: nothing to write
  const int rows = min(kBlockM, seq.len_q - m0);
  const int E = static_cast<int>(p.head_dim), Ev = static_cast<int>(p.head_dim_v);

  const Element* q = static_cast<const Element*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
                     (seq.q_row0 + m0) * p.q_stride_l;
  const Element* k = static_cast<const Element*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h +
                     seq.k_row0 * p.k_stride_l;
  const Element* v = static_cast<const Element*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h +
                     seq.k_row0 * p.v_stride_l;
  const bool vec_q = vec_ok(E, p.q_stride_b, p.q_stride_h, p.q_stride_l);
  const bool vec_k = vec_ok(E, p.k_stride_b, p.k_stride_h, p.k_stride_l);
  const bool vec_v = vec_ok(Ev, p.v_stride_b, p.v_stride_h, p.v_stride_l);
  const ScoreMod<Element> score = make_score_mod<Element>(p, seq, b, h);

  // Key blocks some row of [m0, m0 + rows) sees.
  const int n_lo = seq.lo(m0), n_hi = seq.hi(m0 + rows - 1);
  const int n_block_min = n_lo / kBlockN;
  const int n_block_max = n_hi > n_lo ? (n_hi + kBlockN - 1) / kBlockN : n_block_min;
  // Blocks every row sees whole, with no score modification: scale only.
  const int full_lo = seq.lo(m0 + rows - 1), full_hi = seq.hi(m0);

  Tensor sQ =
      make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Tr::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Tr::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(sV.data(), typename Tr::SmemLayoutVtNoSwizzle{});

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);
  auto copy_q = make_tiled_copy_A(LdsmN<Element>{}, mma);
  auto copy_k = make_tiled_copy_B(LdsmN<Element>{}, mma);
  auto copy_v = make_tiled_copy_B(LdsmT<Element>{}, mma);
  Tensor tSsQ = copy_q.get_thread_slice(tid).partition_S(sQ);
  Tensor tSsK = copy_k.get_thread_slice(tid).partition_S(sK);
  Tensor tOsVt = copy_v.get_thread_slice(tid).partition_S(sVt);

  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);
  // Coordinates (row, col) of the score accumulator's elements within the block.
  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS_rc = rowcol(cS);
  constexpr int kRows = decltype(size<0>(cS_rc))::value;
  float row_max[kRows], row_sum[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }

  load_tile<GmemCopy>(q, p.q_stride_l, rows, E, vec_q, sQ, tid);
  if (n_block_max > n_block_min) {
    const int n0 = (n_block_max - 1) * kBlockN;
    load_tile<GmemCopy>(k + n0 * p.k_stride_l, p.k_stride_l, seq.len_k - n0, E, vec_k, sK, tid);
  }
  cp_async_fence();

  for (int n_block = n_block_max - 1; n_block >= n_block_min; --n_block) {
    const int n0 = n_block * kBlockN;
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K(n) (and Q) in shared memory; every thread done with V(n + 1)
    load_tile<GmemCopy>(v + n0 * p.v_stride_l, p.v_stride_l, seq.len_k - n0, Ev, vec_v, sV, tid);
    cp_async_fence();

    gemm_ss(mma, acc_s, tSrQ, tSrK, tSsQ, tSsK, copy_q, copy_k, tid);

    Tensor s_rc = rowcol(acc_s);
    if (score.plain() && n0 >= full_lo && n0 + kBlockN <= full_hi) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) *= score.scale_log2;
    } else {
      float unused;
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const auto row = score.row(m0 + get<0>(cS_rc(r, 0)));
        CUTE_UNROLL
        for (int c = 0; c < size<1>(s_rc); ++c) {
          s_rc(r, c) = score(s_rc(r, c), row, n0 + get<1>(cS_rc(0, c)), &unused);
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V(n) in shared memory; every thread done with K(n)
    if (n_block > n_block_min) {
      const int n1 = n0 - kBlockN;
      load_tile<GmemCopy>(k + n1 * p.k_stride_l, p.k_stride_l, seq.len_k - n1, E, vec_k, sK, tid);
      cp_async_fence();
    }

    // Online softmax over this block.
    Tensor o_rc = rowcol(acc_o);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float mx = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s_rc); ++c) mx = fmaxf(mx, s_rc(r, c));
      mx = quad_max(mx);
      const float ref = mx == -INFINITY ? 0.f : mx;  // fully masked so far: P = exp2(-inf) = 0
      const float alpha = exp2f(row_max[r] - ref);   // -inf - ref: 0 (the accumulator is 0)
      row_max[r] = mx;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s_rc); ++c) {
        const float e = exp2f(s_rc(r, c) - ref);
        s_rc(r, c) = e;
        sum += e;
      }
      row_sum[r] = row_sum[r] * alpha + sum;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o_rc); ++c) o_rc(r, c) *= alpha;
    }

    Tensor tOrP = acc_to_a_operand<Element>(acc_s);
    gemm_rs(mma, acc_o, tOrP, tOrVt, tOsVt, copy_v, tid);
  }

  // Epilogue: normalise, stage the tile in Q's shared memory, write out and lse.
  cp_async_wait<0>();
  __syncthreads();
  Tensor o_rc = rowcol(acc_o);
  float lse[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const float inv = sum == 0.f ? 0.f : 1.f / sum;  // NaN sums stay NaN
    const float ref = row_max[r] == -INFINITY ? 0.f : row_max[r];
    lse[r] = sum == 0.f ? -INFINITY : (ref + __log2f(sum)) * kLn2;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(o_rc); ++c) o_rc(r, c) *= inv;
  }
  Tensor sO = make_tensor(sQ.data(), typename Tr::SmemLayoutQ{});
  acc_to_smem(mma, acc_o, sO, tid);
  __syncthreads();
  Element* out = static_cast<Element*>(p.out) + b * p.out_stride_b + h * p.out_stride_h +
                 (seq.q_row0 + m0) * p.out_stride_l;
  const bool vec_o = vec_ok(Ev, p.out_stride_b, p.out_stride_h, p.out_stride_l);
  store_tile<GmemCopy>(out, p.out_stride_l, rows, Ev, vec_o, sO, tid);
  if (get<1>(cS_rc(0, 0)) == 0) {  // the lane of the quad that holds column 0 writes the rows
    float* lse_out = static_cast<float*>(p.lse) + b * p.lse_stride_b + h * p.lse_stride_h +
                     (seq.q_row0 + m0) * p.lse_stride_l;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int i = get<0>(cS_rc(r, 0));
      if (i < rows) lse_out[i * p.lse_stride_l] = lse[r];
    }
  }
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
