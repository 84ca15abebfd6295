// Operator schemas and their CPU implementations.
//
// Contract shared by every backend:
//   attention_forward(q, k, v, attn_mask?, is_causal, scale) -> (out, lse)
//     q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) with Hq % Hkv == 0 (GQA);
//     attn_mask broadcastable to (B, Hq, L, S), bool (True = takes part) or floating (added);
//     is_causal masks key j > query i (top-left aligned); out (B, Hq, L, Ev); lse (B, Hq, L) in
//     float32 (float64 for float64 inputs), -inf for a row with no visible key (its out is 0).
//   attention_backward(grad_out, q, k, v, out, lse, attn_mask?, is_causal, scale)
//     -> (grad_q, grad_k, grad_v)
// Fake (meta) kernels and autograd are registered from Python (aigc_ext/ops.py). The argument
// checks and the parameter structs the kernels take are device-neutral
// (attention_params_from_tensors.h, attention_params.h), for CUDA sources to share; this file
// holds the schemas and the CPU registrations, and picks the CPU kernel's instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "attention_params.h"
#include "attention_params_from_tensors.h"
#include "cpu/attention.h"

namespace aigc_ext {
namespace {

using at::Tensor;

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::kDefault:
      return true;
    case Isa::kAvx2:
#ifdef AIGC_HAVE_ISA_AVX2
      return true;
#else
      return false;
#endif
    case Isa::kAvx512:
#ifdef AIGC_HAVE_ISA_AVX512
      return true;
#else
      return false;
#endif
  }
  return false;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

// The best compiled kernel the CPU supports; torch's own detection (which honours the
// ATEN_CPU_CAPABILITY environment variable) decides what the CPU supports.
Isa detect_isa() {
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512" && isa_compiled(Isa::kAvx512)) return Isa::kAvx512;
  if ((cap == "AVX512" || cap == "AVX2") && isa_compiled(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kDefault;
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{static_cast<int>(detect_isa())};
  return isa;
}

std::atomic<bool>& use_brgemm() {
  static std::atomic<bool> flag{true};
  return flag;
}

std::atomic<bool>& use_amx() {
  static std::atomic<bool> flag{true};
  return flag;
}

cpu::KernelOptions options() {
  cpu::KernelOptions opt;
  opt.use_brgemm = use_brgemm().load();
  opt.use_amx = use_amx().load();
  return opt;
}

void run_forward(const AttentionForwardParams& p) {
  switch (static_cast<Isa>(current_isa().load())) {
#ifdef AIGC_HAVE_ISA_AVX512
    case Isa::kAvx512:
      return cpu::avx512::attention_forward(p, options());
#endif
#ifdef AIGC_HAVE_ISA_AVX2
    case Isa::kAvx2:
      return cpu::avx2::attention_forward(p, options());
#endif
    default:
      return cpu::default_::attention_forward(p, options());
  }
}

void run_backward(const AttentionBackwardParams& p) {
  switch (static_cast<Isa>(current_isa().load())) {
#ifdef AIGC_HAVE_ISA_AVX512
    case Isa::kAvx512:
      return cpu::avx512::attention_backward(p, options());
#endif
#ifdef AIGC_HAVE_ISA_AVX2
    case Isa::kAvx2:
      return cpu::avx2::attention_backward(p, options());
#endif
    default:
      return cpu::default_::attention_backward(p, options());
  }
}

std::tuple<Tensor, Tensor> attention_forward_cpu(const Tensor& query, const Tensor& key,
                                                 const Tensor& value,
                                                 const std::optional<Tensor>& attn_mask,
                                                 bool is_causal, double scale) {
  const op_utils::ForwardCall call =
      op_utils::prepare_forward(query, key, value, attn_mask, is_causal, scale, c10::kCPU);
  run_forward(call.params);
  return {call.out, call.lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(const Tensor& grad_out,
                                                          const Tensor& query, const Tensor& key,
                                                          const Tensor& value, const Tensor& out,
                                                          const Tensor& lse,
                                                          const std::optional<Tensor>& attn_mask,
                                                          bool is_causal, double scale) {
  const op_utils::BackwardCall call = op_utils::prepare_backward(
      grad_out, query, key, value, out, lse, attn_mask, is_causal, scale, c10::kCPU);
  run_backward(call.params);
  return {call.grad_q, call.grad_k, call.grad_v};
}

// Reads and optionally changes the CPU kernel configuration; returns a description such as
// "isa=avx512 brgemm=1 amx=1 compiled=default,avx2,avx512".
std::string cpu_kernel_config(std::optional<std::string> isa, std::optional<bool> brgemm,
                              std::optional<bool> amx) {
  if (isa.has_value()) {
    Isa want = Isa::kDefault;
    if (*isa == "auto") {
      want = detect_isa();
    } else if (*isa == "avx512") {
      want = Isa::kAvx512;
    } else if (*isa == "avx2") {
      want = Isa::kAvx2;
    } else {
      TORCH_CHECK(*isa == "default", "aigc_ext: unknown CPU ISA '", *isa,
                  "'; expected auto, default, avx2 or avx512");
    }
    TORCH_CHECK(isa_compiled(want), "aigc_ext: CPU kernels for ", *isa, " were not compiled in");
    const std::string cap = at::get_cpu_capability();
    TORCH_CHECK(want == Isa::kDefault ||
                    (want == Isa::kAvx2 && (cap == "AVX2" || cap == "AVX512")) ||
                    (want == Isa::kAvx512 && cap == "AVX512"),
                "aigc_ext: this CPU does not support ", *isa, " (torch reports ", cap, ")");
    current_isa().store(static_cast<int>(want));
  }
  if (brgemm.has_value()) use_brgemm().store(*brgemm);
  if (amx.has_value()) use_amx().store(*amx);
  std::ostringstream os;
  os << "isa=" << isa_name(static_cast<Isa>(current_isa().load()))
     << " brgemm=" << (use_brgemm().load() ? 1 : 0) << " amx=" << (use_amx().load() ? 1 : 0)
     << " brgemm_bf16=" << (at::native::cpublas::could_pack(at::kBFloat16) ? 1 : 0)
     << " brgemm_fp16=" << (at::native::cpublas::could_pack(at::kHalf) ? 1 : 0)
     << " amx_tiles=" << (at::cpu::init_amx() ? 1 : 0) << " compiled=default";
  if (isa_compiled(Isa::kAvx2)) os << ",avx2";
  if (isa_compiled(Isa::kAvx512)) os << ",avx512";
  os << " threads=" << at::get_num_threads();
  return os.str();
}

}  // namespace

TORCH_LIBRARY(aigc_ext, m) {
  m.def(
      "attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "bool is_causal=False, float scale=1.0) -> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? attn_mask=None, bool is_causal=False, float scale=1.0) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("_cpu_kernel_config(str? isa=None, bool? use_brgemm=None, bool? use_amx=None) -> str",
        &cpu_kernel_config);
}

TORCH_LIBRARY_IMPL(aigc_ext, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace aigc_ext

#ifdef AIGC_EXT_PYTHON_MODULE
// A module object, so that `import aigc_ext._C` loads this library (and registers the ops).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "aigc_ext operators", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
#endif
