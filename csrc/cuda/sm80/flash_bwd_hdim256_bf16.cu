// Backward instantiation for head dim 256, bfloat16. Tiles (query rows x keys, warps): dK/dV
// 16 x 64, 4, run twice (dV, then dK: their accumulators do not fit together); dQ 64 x 16, 4.
#include "cuda/sm80/flash_bwd_launch.cuh"
#include "cuda/sm80/launch_list.h"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

template <>
cudaError_t run_bwd<256, true>(const AttentionBackwardParams& p, void* ws, cudaStream_t stream) {
  return launch_bwd<BwdTraits<cute::bfloat16_t, 256, 16, 64, 4>,
                    BwdTraits<cute::bfloat16_t, 256, 64, 16, 4>,
                    /*kSplitDkDv=*/true>(p, ws, stream);
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
