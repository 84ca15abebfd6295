// The sm80 entry points of csrc/cuda/flash_launch.h: pick the instantiation for the call's
// element type and head dim (the smallest kernel head dim >= max(head_dim, head_dim_v)).
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "attention_params.h"
#include "cuda/flash_launch.h"
#include "cuda/sm80/launch_list.h"

namespace aigc_ext {
namespace cuda {
namespace {

int kernel_head_dim(const AttentionForwardParams& p) {
  const int64_t d = p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v;
  return d <= 64 ? 64 : d <= 128 ? 128 : d <= 256 ? 256 : 0;
}

}  // namespace

cudaError_t flash_fwd_sm80(const AttentionForwardParams& p, cudaStream_t stream) {
  if (sm80_unsupported(p) != nullptr || p.head_dim < 1 || p.head_dim_v < 1) {
    return cudaErrorNotSupported;
  }
  const bool bf16 = p.dtype == c10::ScalarType::BFloat16;
  switch (kernel_head_dim(p)) {
    case 64:
      return bf16 ? sm80::run_fwd<64, true>(p, stream) : sm80::run_fwd<64, false>(p, stream);
    case 128:
      return bf16 ? sm80::run_fwd<128, true>(p, stream) : sm80::run_fwd<128, false>(p, stream);
    case 256:
      return bf16 ? sm80::run_fwd<256, true>(p, stream) : sm80::run_fwd<256, false>(p, stream);
    default:
      return cudaErrorNotSupported;
  }
}

size_t flash_bwd_sm80_workspace_bytes(const AttentionBackwardParams& p) {
  return sm80::bwd_workspace_floats(p) * sizeof(float);
}

cudaError_t flash_bwd_sm80(const AttentionBackwardParams& p, void* workspace, cudaStream_t stream) {
  const AttentionForwardParams& f = p.fwd;
  if (sm80_unsupported(f) != nullptr || f.head_dim < 1 || f.head_dim_v < 1) {
    return cudaErrorNotSupported;
  }
  const bool bf16 = f.dtype == c10::ScalarType::BFloat16;
  switch (kernel_head_dim(f)) {
    case 64:
      return bf16 ? sm80::run_bwd<64, true>(p, workspace, stream)
                  : sm80::run_bwd<64, false>(p, workspace, stream);
    case 128:
      return bf16 ? sm80::run_bwd<128, true>(p, workspace, stream)
                  : sm80::run_bwd<128, false>(p, workspace, stream);
    case 256:
      return bf16 ? sm80::run_bwd<256, true>(p, workspace, stream)
                  : sm80::run_bwd<256, false>(p, workspace, stream);
    default:
      return cudaErrorNotSupported;
  }
}

}  // namespace cuda
}  // namespace aigc_ext
