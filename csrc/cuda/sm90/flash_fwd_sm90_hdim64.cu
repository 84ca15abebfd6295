// The Hopper forward for head dim 64, float16 and bfloat16.
#include "cuda/sm90/flash_fwd_sm90_launch.cuh"

namespace aigc_ext {
namespace cuda {
namespace sm90 {

template cudaError_t launch_fwd<64, false>(const AttentionForwardParams&, cudaStream_t);
template cudaError_t launch_fwd<64, true>(const AttentionForwardParams&, cudaStream_t);
template bool fwd_compiled<64, false>();
template bool fwd_compiled<64, true>();

}  // namespace sm90
}  // namespace cuda
}  // namespace aigc_ext
