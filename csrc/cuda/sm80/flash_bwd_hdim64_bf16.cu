// Backward instantiation for head dim 64, bfloat16. Tiles (query rows x keys, warps):
// dK/dV 64 x 64, 4; dQ 64 x 32, 4.
#include "cuda/sm80/flash_bwd_launch.cuh"
#include "cuda/sm80/launch_list.h"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

template <>
cudaError_t run_bwd<64, true>(const AttentionBackwardParams& p, void* ws, cudaStream_t stream) {
  return launch_bwd<BwdTraits<cute::bfloat16_t, 64, 64, 64, 4>,
                    BwdTraits<cute::bfloat16_t, 64, 64, 32, 4>>(p, ws, stream);
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
