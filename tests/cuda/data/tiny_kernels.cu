// Small kernels for the compile check's end-to-end test (tests/cuda): one tensor core
// product without local memory, and one that indexes a local array at run time (a stack
// frame, which the check must flag).
#include <cstdint>

// One m16n8k16 bf16 product per warp (mma.sync: HMMA in the SASS).
__global__ void tiny_mma_kernel(const uint32_t* a, const uint32_t* b, float* c) {
  const int lane = threadIdx.x % 32;
  uint32_t a0 = a[lane * 4], a1 = a[lane * 4 + 1], a2 = a[lane * 4 + 2], a3 = a[lane * 4 + 3];
  uint32_t b0 = b[lane * 2], b1 = b[lane * 2 + 1];
  float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  c[lane * 4] = d0;
  c[lane * 4 + 1] = d1;
  c[lane * 4 + 2] = d2;
  c[lane * 4 + 3] = d3;
}

// A local array indexed by data in a loop: it lives in local memory (a stack frame).
__global__ void tiny_stack_kernel(const int* idx, const float* in, float* out, int n) {
  float buf[128];
  for (int i = 0; i < 128; ++i) buf[i] = in[i];
  for (int i = 0; i < n; ++i) buf[idx[i] & 127] += in[i];
  out[threadIdx.x] = buf[idx[threadIdx.x] & 127];
}

// 64 values live at once under a 32-register cap: ptxas spills.
__global__ void __launch_bounds__(256, 8) tiny_spill_kernel(const float* in, float* out) {
  float v[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) v[i] = in[i * 256 + threadIdx.x];
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) acc += v[i] * v[63 - i] * v[(i * 7) % 64];
  out[threadIdx.x] = acc;
}
