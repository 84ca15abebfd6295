// Backward, dK and dV: one CTA per (key block of kBlockN keys, KV head, batch row), flattened
// on grid x. The CTA holds its K and V tiles and its dK, dV accumulators (fp32, in registers)
// and walks every query block of its band for every query head of its GQA group, Q and dO
// double-buffered; so each dK/dV element is summed by one thread in a fixed order: no atomics,
// bitwise reproducible.
// The products are computed transposed, keys along M:
//   S^T = K Q^T, dP^T = V dO^T, P^T = exp2(score - lse), dS^T = P^T * (dP^T - D) * (1 - tanh^2
//   with softcap) * scale, dV += P^T dO, dK += dS^T Q,
// so P^T and dS^T leave the accumulators as the A operands of the last two products directly.
// Keys no query sees (outside every band) get dK = dV = 0.
// For head dim 256 the two accumulators do not fit one thread's registers together: the kernel
// then runs twice, once for dV (kDoDk false) and once for dK (kDoDv false), each recomputing P.
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

template <class Tr, bool kDoDk, bool kDoDv>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
    flash_bwd_dkdv_kernel(const __grid_constant__ AttentionBackwardParams bp, const float* ws_d,
                          const float* ws_lse) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim;
  static_assert(kBlockN % (16 * Tr::kNWarps) == 0, "warps stacked along the keys");
  static_assert(kDoDk || kDoDv);
  using GmemCopy = typename Tr::GmemCopy;
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  const AttentionForwardParams& p = bp.fwd;

  const int64_t num_n_blocks = (p.len_kv + kBlockN - 1) / kBlockN;
  const int64_t bid = blockIdx.x;
  const int n_block = static_cast<int>(bid % num_n_blocks);
  const int64_t bhk = bid / num_n_blocks;
  const int hk = static_cast<int>(bhk % p.heads_kv), b = static_cast<int>(bhk / p.heads_kv);
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const SeqInfo seq = seq_info(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.len_k) return;  // past this sequence's keys: nothing to write
  const int krows = min(kBlockN, seq.len_k - n0);
  const int E = static_cast<int>(p.head_dim), Ev = static_cast<int>(p.head_dim_v);

  // Query rows that see some key of [n0, n0 + krows): i + diag - window_left <= j and
  // j <= i + diag + window_right for some j of the block.
  int64_t i_lo = 0, i_hi = seq.len_q;
  if (seq.window_right >= 0) i_lo = n0 - seq.diag - seq.window_right;
  if (seq.window_left >= 0) i_hi = n0 + krows - seq.diag + seq.window_left;
  i_lo = i_lo < 0 ? 0 : i_lo;
  i_hi = i_hi > seq.len_q ? seq.len_q : i_hi;
  const int m_block_min = i_hi > i_lo ? static_cast<int>(i_lo / kBlockM) : 0;
  const int m_block_max = i_hi > i_lo ? static_cast<int>((i_hi + kBlockM - 1) / kBlockM) : 0;
  const int num_m = m_block_max - m_block_min;
  const int items = group * num_m;  // (query head of the group, query block) pairs

  const Element* k = static_cast<const Element*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h +
                     (seq.k_row0 + n0) * p.k_stride_l;
  const Element* v = static_cast<const Element*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h +
                     (seq.k_row0 + n0) * p.v_stride_l;
  const bool vec_q = vec_ok(E, p.q_stride_b, p.q_stride_h, p.q_stride_l);
  const bool vec_do = vec_ok(Ev, p.out_stride_b, p.out_stride_h, p.out_stride_l);
  const bool vec_k = vec_ok(E, p.k_stride_b, p.k_stride_h, p.k_stride_l);
  const bool vec_v = vec_ok(Ev, p.v_stride_b, p.v_stride_h, p.v_stride_l);

  Element* base = reinterpret_cast<Element*>(smem);
  Tensor sK = make_tensor(make_smem_ptr(base), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Tr::SmemLayoutKV{});
  // Stage s of Q is at sQ0 + s * size, dO's stages follow Q's.
  Tensor sQ0 = make_tensor(sV.data() + size(sV), typename Tr::SmemLayoutQ{});
  const auto q_size = size(sQ0);
  Tensor sQtNoSwizzle = make_tensor(sQ0.data(), typename Tr::SmemLayoutQtNoSwizzle{});

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrK = thr_mma.partition_fragment_A(sK);
  Tensor tSrQ = thr_mma.partition_fragment_B(sQ0);
  Tensor tdPrV = thr_mma.partition_fragment_A(sV);
  Tensor tdPrdO = thr_mma.partition_fragment_B(sQ0);
  Tensor tdVrdOt = thr_mma.partition_fragment_B(sQtNoSwizzle);
  Tensor tdKrQt = thr_mma.partition_fragment_B(sQtNoSwizzle);
  auto copy_a = make_tiled_copy_A(LdsmN<Element>{}, mma);
  auto copy_b = make_tiled_copy_B(LdsmN<Element>{}, mma);
  auto copy_bt = make_tiled_copy_B(LdsmT<Element>{}, mma);
  Tensor tSsK = copy_a.get_thread_slice(tid).partition_S(sK);
  Tensor tdPsV = copy_a.get_thread_slice(tid).partition_S(sV);

  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);
  // (key, query) coordinates of the transposed score accumulator's elements.
  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor cS_rc = rowcol(cS);
  constexpr int kRows = decltype(size<0>(cS_rc))::value;

  auto load_item = [&](int item, int stage) {
    const int h = hk * group + item / num_m;
    const int m0 = (m_block_min + item % num_m) * kBlockM;
    const int64_t row = seq.q_row0 + m0;
    const Element* q =
        static_cast<const Element*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + row * p.q_stride_l;
    const Element* dout = static_cast<const Element*>(bp.grad_out) + b * p.out_stride_b +
                          h * p.out_stride_h + row * p.out_stride_l;
    Tensor sQ = make_tensor(sQ0.data() + stage * q_size, typename Tr::SmemLayoutQ{});
    Tensor sdO = make_tensor(sQ0.data() + (2 + stage) * q_size, typename Tr::SmemLayoutQ{});
    load_tile<GmemCopy>(q, p.q_stride_l, seq.len_q - m0, E, vec_q, sQ, tid);
    load_tile<GmemCopy>(dout, p.out_stride_l, seq.len_q - m0, Ev, vec_do, sdO, tid);
  };

  if (items > 0) {
    load_tile<GmemCopy>(k, p.k_stride_l, krows, E, vec_k, sK, tid);
    load_tile<GmemCopy>(v, p.v_stride_l, krows, Ev, vec_v, sV, tid);
    load_item(0, 0);
  }
  cp_async_fence();

  for (int item = 0; item < items; ++item) {
    const int stage = item & 1;
    if (item + 1 < items) {
      load_item(item + 1, stage ^ 1);
      cp_async_fence();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this item's Q and dO (and K, V) in shared memory
    const int h = hk * group + item / num_m;
    const int m0 = (m_block_min + item % num_m) * kBlockM;
    const ScoreMod<Element> score = make_score_mod<Element>(p, seq, b, h);
    const int64_t ws_row0 = (static_cast<int64_t>(b) * p.heads_q + h) * p.len_q + m0;
    const int rows = min(kBlockM, seq.len_q - m0);
    Tensor sQ = make_tensor(sQ0.data() + stage * q_size, typename Tr::SmemLayoutQ{});
    Tensor sdO = make_tensor(sQ0.data() + (2 + stage) * q_size, typename Tr::SmemLayoutQ{});
    Tensor sQt = make_tensor(sQ.data(), typename Tr::SmemLayoutQt{});
    Tensor sdOt = make_tensor(sdO.data(), typename Tr::SmemLayoutQt{});

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_s);
    gemm_ss(mma, acc_s, tSrK, tSrQ, tSsK, copy_b.get_thread_slice(tid).partition_S(sQ), copy_a,
            copy_b, tid);
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_dp);
    if constexpr (kDoDk) {
      gemm_ss(mma, acc_dp, tdPrV, tdPrdO, tdPsV, copy_b.get_thread_slice(tid).partition_S(sdO),
              copy_a, copy_b, tid);
    }

    // P^T in place of S^T, dS^T in place of dP^T. Every row of the block sees every key of it
    // (and no score modification applies): scale only.
    Tensor s_rc = rowcol(acc_s);
    Tensor dp_rc = rowcol(acc_dp);
    const bool fast = score.plain() && n0 >= seq.lo(m0 + rows - 1) && n0 + kBlockN <= seq.hi(m0) &&
                      n0 + kBlockN <= seq.len_k;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s_rc); ++c) {
      const int ic = get<1>(cS_rc(0, c));
      const float lse2 = ic < rows ? ws_lse[ws_row0 + ic] : INFINITY;
      const float dsum = ic < rows ? ws_d[ws_row0 + ic] : 0.f;
      const auto row = score.row(m0 + ic);
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float t = 0.f;
        const float x = fast ? s_rc(r, c) * score.scale_log2
                             : score(s_rc(r, c), row, n0 + get<0>(cS_rc(r, 0)), &t);
        const float pr = exp2f(x - lse2);
        s_rc(r, c) = pr;
        if constexpr (kDoDk) {
          float ds = pr * (dp_rc(r, c) - dsum);
          if (score.softcap > 0.f) ds *= 1.f - t * t;
          dp_rc(r, c) = ds * score.scale;
        }
      }
    }
    if constexpr (kDoDv) {
      Tensor tdVrP = acc_to_a_operand<Element>(acc_s);
      gemm_rs(mma, acc_dv, tdVrP, tdVrdOt, copy_bt.get_thread_slice(tid).partition_S(sdOt), copy_bt,
              tid);
    }
    if constexpr (kDoDk) {
      Tensor tdKrdS = acc_to_a_operand<Element>(acc_dp);
      gemm_rs(mma, acc_dk, tdKrdS, tdKrQt, copy_bt.get_thread_slice(tid).partition_S(sQt), copy_bt,
              tid);
    }
    __syncthreads();  // every thread done with this stage before it is refilled
  }

  cp_async_wait<0>();
  __syncthreads();
  // dK and dV staged in K's and V's shared tiles.
  if constexpr (kDoDk) acc_to_smem(mma, acc_dk, sK, tid);
  if constexpr (kDoDv) acc_to_smem(mma, acc_dv, sV, tid);
  __syncthreads();
  Element* dk = static_cast<Element*>(bp.grad_k) + b * bp.dk_stride_b + hk * bp.dk_stride_h +
                (seq.k_row0 + n0) * bp.dk_stride_l;
  Element* dv = static_cast<Element*>(bp.grad_v) + b * bp.dv_stride_b + hk * bp.dv_stride_h +
                (seq.k_row0 + n0) * bp.dv_stride_l;
  if constexpr (kDoDk) {
    store_tile<GmemCopy>(dk, bp.dk_stride_l, krows, E,
                         vec_ok(E, bp.dk_stride_b, bp.dk_stride_h, bp.dk_stride_l), sK, tid);
  }
  if constexpr (kDoDv) {
    store_tile<GmemCopy>(dv, bp.dv_stride_l, krows, Ev,
                         vec_ok(Ev, bp.dv_stride_b, bp.dv_stride_h, bp.dv_stride_l), sV, tid);
  }
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
