// A small sm_90a kernel for the compile check's end-to-end test (tests/cuda): one wgmma
// (HGMMA in the SASS) on shared-memory operands, behind an mbarrier wait (SYNCS).
#include <cstdint>

__global__ void tiny_wgmma_kernel(uint64_t desc_a, uint64_t desc_b, float* c) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(8) uint64_t bar;
  const uint32_t bar_addr = static_cast<uint32_t>(__cvta_generic_to_shared(&bar));
  if (threadIdx.x == 0) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar_addr));
  __syncthreads();
  if (threadIdx.x == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar_addr));
  asm volatile(
      "{\n.reg .pred p;\nwait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], 0;\n"
      "@!p bra wait;\n}\n" ::"r"(bar_addr));
  float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
  asm volatile(
      "wgmma.fence.sync.aligned;\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, %4, %5, 1, 1, 1, 0, 0;\n"
      "wgmma.commit_group.sync.aligned;\n"
      "wgmma.wait_group.sync.aligned 0;\n"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "l"(desc_a), "l"(desc_b));
  c[threadIdx.x * 4] = d0;
  c[threadIdx.x * 4 + 1] = d1;
  c[threadIdx.x * 4 + 2] = d2;
  c[threadIdx.x * 4 + 3] = d3;
#endif
}
