// The interface between the operator layer (csrc/ops.cpp) and the per-ISA CPU kernels: their
// run-time options and entry points. The parameter structs are device-neutral
// (csrc/attention_params.h).
#pragma once

#include "attention_params.h"

namespace aigc_ext::cpu {

// Run-time options, settable from Python for tests and benchmarks.
struct KernelOptions {
  bool use_brgemm = true;  // use torch's brgemm (AMX on capable CPUs) for bf16/fp16 GEMMs
  bool use_amx = true;     // bf16 forward GEMMs through our own AMX tiles where the CPU has them
  // bf16 GEMMs through our own vdpbf16ps micro-kernel where brgemm is off or cannot pack bf16
  // (AVX-512 CPUs with AVX512_BF16 and no AMX)
  bool use_avx512_bf16 = true;
};

// One copy of the kernel per instruction set (csrc/cpu/kernels.cpp, compiled per ISA).
#define AIGC_DECLARE_ISA(ns)                                                           \
  namespace ns {                                                                       \
  void attention_forward(const AttentionForwardParams& p, const KernelOptions& opt);   \
  void attention_backward(const AttentionBackwardParams& p, const KernelOptions& opt); \
  }

AIGC_DECLARE_ISA(default_)
AIGC_DECLARE_ISA(avx2)
AIGC_DECLARE_ISA(avx512)

#undef AIGC_DECLARE_ISA

}  // namespace aigc_ext::cpu
