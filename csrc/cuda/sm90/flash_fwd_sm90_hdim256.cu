// The Hopper forward for head dim 256, float16 and bfloat16.
#include "cuda/sm90/flash_fwd_sm90_launch.cuh"

namespace aigc_ext {
namespace cuda {
namespace sm90 {

template cudaError_t launch_fwd<256, false>(const AttentionForwardParams&, cudaStream_t);
template cudaError_t launch_fwd<256, true>(const AttentionForwardParams&, cudaStream_t);
template bool fwd_compiled<256, false>();
template bool fwd_compiled<256, true>();

}  // namespace sm90
}  // namespace cuda
}  // namespace aigc_ext
