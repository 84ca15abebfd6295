// Launch of the backward for one configuration: the preprocess (D and log2 lse into the
// workspace), then the dK/dV and dQ kernels, each on grid x only, each skipped when its grid is
// empty; opt-in to large dynamic shared memory; launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "attention_params.h"
#include "cuda/sm80/flash_bwd_dkdv_kernel.cuh"
#include "cuda/sm80/flash_bwd_dq_kernel.cuh"
#include "cuda/sm80/flash_bwd_preprocess.cuh"
#include "cuda/sm80/flash_fwd_launch.cuh"
#include "cuda/sm80/launch_list.h"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

template <class Tr, bool kDoDk, bool kDoDv>
cudaError_t launch_dkdv(const AttentionBackwardParams& bp, const float* ws_d, const float* ws_lse,
                        unsigned grid, cudaStream_t stream) {
  auto kernel = flash_bwd_dkdv_kernel<Tr, kDoDk, kDoDv>;
  if (cudaError_t e = allow_smem(kernel, Tr::kSmemDkdv); e != cudaSuccess) return e;
  kernel<<<grid, Tr::kNThreads, Tr::kSmemDkdv, stream>>>(bp, ws_d, ws_lse);
  return cudaGetLastError();
}

// kSplitDkDv: dV and dK by two launches of the dK/dV kernel (head dim 256, whose two
// accumulators do not fit the registers of one thread together).
template <class TrDkdv, class TrDq, bool kSplitDkDv = false>
cudaError_t launch_bwd(const AttentionBackwardParams& bp, void* workspace, cudaStream_t stream) {
  static_assert(std::is_same_v<typename TrDkdv::Element, typename TrDq::Element>);
  using Element = typename TrDq::Element;
  const AttentionForwardParams& p = bp.fwd;
  if (p.batch <= 0 || p.heads_q <= 0) return cudaSuccess;
  if (!lengths_fit(p) || p.heads_kv <= 0) return cudaErrorInvalidValue;
  constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  const int64_t pre_grid = (rows + kPreprocessWarps - 1) / kPreprocessWarps;
  const int64_t dkdv_grid =
      (p.len_kv + TrDkdv::kBlockN - 1) / TrDkdv::kBlockN * p.heads_kv * p.batch;
  const int64_t dq_grid = (p.len_q + TrDq::kBlockM - 1) / TrDq::kBlockM * p.heads_q * p.batch;
  if (pre_grid > kMaxGrid || dkdv_grid > kMaxGrid || dq_grid > kMaxGrid) {
    return cudaErrorInvalidConfiguration;
  }
  if (rows > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  float* ws_d = static_cast<float*>(workspace);
  float* ws_lse = ws_d + rows;

  if (pre_grid > 0) {
    flash_bwd_preprocess_kernel<Element>
        <<<static_cast<unsigned>(pre_grid), 32 * kPreprocessWarps, 0, stream>>>(bp, ws_d, ws_lse);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (dkdv_grid > 0) {
    const unsigned grid = static_cast<unsigned>(dkdv_grid);
    if constexpr (kSplitDkDv) {
      cudaError_t e = launch_dkdv<TrDkdv, false, true>(bp, ws_d, ws_lse, grid, stream);
      if (e != cudaSuccess) return e;
      e = launch_dkdv<TrDkdv, true, false>(bp, ws_d, ws_lse, grid, stream);
      if (e != cudaSuccess) return e;
    } else {
      cudaError_t e = launch_dkdv<TrDkdv, true, true>(bp, ws_d, ws_lse, grid, stream);
      if (e != cudaSuccess) return e;
    }
  }
  if (dq_grid > 0) {
    auto kernel = flash_bwd_dq_kernel<TrDq>;
    if (cudaError_t e = allow_smem(kernel, TrDq::kSmemDq); e != cudaSuccess) return e;
    kernel<<<static_cast<unsigned>(dq_grid), TrDq::kNThreads, TrDq::kSmemDq, stream>>>(bp, ws_d,
                                                                                       ws_lse);
  }
  return cudaGetLastError();
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
