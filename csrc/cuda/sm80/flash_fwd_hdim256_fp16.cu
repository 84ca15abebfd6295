// Forward instantiation for head dim 256, float16: tiles 64 x 32, 4 warps.
#include "cuda/sm80/flash_fwd_launch.cuh"
#include "cuda/sm80/launch_list.h"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

template <>
cudaError_t run_fwd<256, false>(const AttentionForwardParams& p, cudaStream_t stream) {
  return launch_fwd<FwdTraits<cute::half_t, 256, 64, 32, 4>>(p, stream);
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
