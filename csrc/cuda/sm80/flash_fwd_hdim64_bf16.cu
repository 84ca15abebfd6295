// Forward instantiation for head dim 64, bfloat16: tiles 128 x 64, 4 warps.
#include "cuda/sm80/flash_fwd_launch.cuh"
#include "cuda/sm80/launch_list.h"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

template <>
cudaError_t run_fwd<64, true>(const AttentionForwardParams& p, cudaStream_t stream) {
  return launch_fwd<FwdTraits<cute::bfloat16_t, 64, 128, 64, 4>>(p, stream);
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
