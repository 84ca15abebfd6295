// The instantiations of the sm80 kernels, one per (head dim, element type), each defined in its
// own translation unit (flash_fwd_hdim*.cu, flash_bwd_hdim*.cu) so that they compile in
// parallel; flash_sm80.cu picks one per call. Host-only: no CuTe types.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "attention_params.h"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

// kHeadDim is the kernel's head dim (64, 128 or 256), at least max(head_dim, head_dim_v).
template <int kHeadDim, bool kBf16>
cudaError_t run_fwd(const AttentionForwardParams& p, cudaStream_t stream);

template <int kHeadDim, bool kBf16>
cudaError_t run_bwd(const AttentionBackwardParams& p, void* workspace, cudaStream_t stream);

// The backward's scratch: per (batch row, query head, row) D = rowsum(dO * O) and the forward's
// lse in log2 units, float32 each.
inline size_t bwd_workspace_floats(const AttentionBackwardParams& p) {
  return 2 * static_cast<size_t>(p.fwd.batch) * static_cast<size_t>(p.fwd.heads_q) *
         static_cast<size_t>(p.fwd.len_q);
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
