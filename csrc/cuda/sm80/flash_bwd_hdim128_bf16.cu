// Backward instantiation for head dim 128, bfloat16. Tiles (query rows x keys, warps):
// dK/dV 32 x 64, 4; dQ 64 x 32, 4.
#include "cuda/sm80/flash_bwd_launch.cuh"
#include "cuda/sm80/launch_list.h"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

template <>
cudaError_t run_bwd<128, true>(const AttentionBackwardParams& p, void* ws, cudaStream_t stream) {
  return launch_bwd<BwdTraits<cute::bfloat16_t, 128, 32, 64, 4>,
                    BwdTraits<cute::bfloat16_t, 128, 64, 32, 4>>(p, ws, stream);
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
