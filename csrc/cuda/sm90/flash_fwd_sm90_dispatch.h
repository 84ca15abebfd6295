// The instantiated Hopper forward launchers (flash_fwd_sm90_hdim*.cu), declared without CuTe so
// that the entry points (flash_fwd_sm90.cu) compile quickly.
#pragma once

#include <cuda_runtime_api.h>

#include "attention_params.h"

namespace aigc_ext {
namespace cuda {
namespace sm90 {

// kHeadDim is 64, 128 or 256; kBf16 picks bfloat16 over float16. The caller has checked
// sm90_fwd_unsupported(p) == nullptr.
template <int kHeadDim, bool kBf16>
cudaError_t launch_fwd(const AttentionForwardParams& p, cudaStream_t stream);

// Whether the kernel's image for the current device is sm_90a code (false on any error).
template <int kHeadDim, bool kBf16>
bool fwd_compiled();

}  // namespace sm90
}  // namespace cuda
}  // namespace aigc_ext
