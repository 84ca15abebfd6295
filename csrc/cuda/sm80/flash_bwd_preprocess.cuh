// Backward, step 1: per query row D_i = rowsum(dO_i * O_i) (float32) and the forward's lse in
// log2 units, into the workspace at index ((b * Hq + h) * len_q + i) (len_q: the longest
// sequence for variable-length batches). A row with lse = -inf saw no key: its log2 lse is
// stored as +inf, so that the recomputed P = exp2(x - lse) is 0 there (never NaN).
// One warp per row, lanes striding over the head dim.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention_params.h"
#include "cuda/sm80/score_mod.cuh"
#include "cuda/sm80/seq_info.cuh"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

constexpr int kPreprocessWarps = 4;

template <typename Element>
__global__ void __launch_bounds__(32 * kPreprocessWarps)
    flash_bwd_preprocess_kernel(const __grid_constant__ AttentionBackwardParams bp, float* ws_d,
                                float* ws_lse) {
  const AttentionForwardParams& p = bp.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kPreprocessWarps + threadIdx.x / 32;
  if (w >= p.batch * p.heads_q * p.len_q) return;
  const int i = static_cast<int>(w % p.len_q);
  const int64_t bh = w / p.len_q;
  const int h = static_cast<int>(bh % p.heads_q), b = static_cast<int>(bh / p.heads_q);
  const SeqInfo seq = seq_info(p, b);
  if (i >= seq.len_q) return;
  const int64_t row = seq.q_row0 + i;
  const int64_t off = b * p.out_stride_b + h * p.out_stride_h + row * p.out_stride_l;
  const Element* o = static_cast<const Element*>(p.out) + off;
  const Element* dout = static_cast<const Element*>(bp.grad_out) + off;
  float acc = 0.f;
  for (int c = lane; c < p.head_dim_v; c += 32) {
    acc += static_cast<float>(o[c]) * static_cast<float>(dout[c]);
  }
#pragma unroll
  for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) {
    ws_d[w] = acc;
    const float lse = static_cast<const float*>(
        p.lse)[b * p.lse_stride_b + h * p.lse_stride_h + row * p.lse_stride_l];
    ws_lse[w] = lse == -INFINITY ? INFINITY : lse * kLog2e;
  }
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
