// Launch of the forward kernel for one configuration: grid over (query block, head, batch row)
// on x, opt-in to large dynamic shared memory, launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "attention_params.h"
#include "cuda/sm80/flash_fwd_kernel.cuh"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

// Sets the kernel's dynamic shared memory limit when it needs more than the default 48 KB.
template <class Kernel>
inline cudaError_t allow_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// Whether the lengths fit the kernels' 32-bit row indices.
inline bool lengths_fit(const AttentionForwardParams& p) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max() / 2;
  return p.len_q <= kMax && p.len_kv <= kMax;
}

template <class Tr>
cudaError_t launch_fwd(const AttentionForwardParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.heads_q <= 0 || p.len_q <= 0) return cudaSuccess;
  if (!lengths_fit(p) || p.heads_kv <= 0) return cudaErrorInvalidValue;
  const int64_t grid = (p.len_q + Tr::kBlockM - 1) / Tr::kBlockM * p.heads_q * p.batch;
  if (grid > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidConfiguration;
  auto kernel = flash_fwd_kernel<Tr>;
  if (cudaError_t e = allow_smem(kernel, Tr::kSmemBytes); e != cudaSuccess) return e;
  kernel<<<static_cast<unsigned>(grid), Tr::kNThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
