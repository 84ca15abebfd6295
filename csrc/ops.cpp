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
#include "flash_params_from_tensors.h"

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

// The vdpbf16ps micro-kernel: -1 auto (on where the CPU has no AMX, whose brgemm is faster and
// whose vdpbf16ps runs at half the fp32 FMA rate), 0 off, 1 on.
std::atomic<int>& avx512_bf16_mode() {
  static std::atomic<int> mode{-1};
  return mode;
}

bool use_avx512_bf16() {
  const int mode = avx512_bf16_mode().load();
  return mode < 0 ? !__builtin_cpu_supports("amx-bf16") : mode == 1;
}

cpu::KernelOptions options() {
  cpu::KernelOptions opt;
  opt.use_brgemm = use_brgemm().load();
  opt.use_amx = use_amx().load();
  opt.use_avx512_bf16 = use_avx512_bf16();
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

using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor> flash_forward_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& cu_seqlens_q,
    const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const OptTensor& seqused_k, const OptTensor& leftpad_k, const OptTensor& kv_batch_idx,
    const OptTensor& block_table, double scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const OptTensor& alibi_slopes, double dropout_p,
    const OptTensor& rng_state, const OptTensor& sinks, int64_t num_splits,
    const OptTensor& attn_mask) {
  const op_utils::FlashOptions o{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                                 leftpad_k,    kv_batch_idx, block_table,  scale,        causal,
                                 window_left,  window_right, softcap,      alibi_slopes, dropout_p,
                                 rng_state,    sinks,        num_splits,   attn_mask};
  op_utils::FlashCall c =
      op_utils::prepare_flash(op_utils::kFlashForwardOp, q, k, v, o, true, c10::kCPU);
  auto [out, lse] = op_utils::flash_outputs(c);
  run_forward(c.params);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_backward_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const OptTensor& alibi_slopes, double dropout_p,
    const OptTensor& rng_state, const OptTensor& attn_mask) {
  const char* op = op_utils::kFlashBackwardOp;
  const OptTensor none;
  const op_utils::FlashOptions o{
      cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, none,        none,
      none,         none,         scale,        causal,       window_left, window_right,
      softcap,      alibi_slopes, dropout_p,    rng_state,    none,        0,
      attn_mask};
  op_utils::check_devices(op, {{"grad_out", grad_out}, {"out", out}, {"lse", lse}}, q, c10::kCPU);
  op_utils::FlashCall c = op_utils::prepare_flash(op, q, k, v, o, false, c10::kCPU);
  op_utils::check_flash_backward_tensors(op, c, grad_out, out, lse);
  const Tensor go = grad_out.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  AttentionBackwardParams bp{};
  bp.fwd = c.params;
  AttentionForwardParams& p = bp.fwd;
  const int64_t hd = c.varlen ? 1 : 2, ld = c.varlen ? 0 : 1;
  p.out = oc.data_ptr();
  p.lse = lc.data_ptr();
  p.out_stride_b = c.varlen ? 0 : oc.stride(0);
  p.out_stride_h = oc.stride(hd);
  p.out_stride_l = oc.stride(ld);
  p.lse_stride_b = c.varlen ? 0 : lc.stride(0);
  p.lse_stride_h = c.varlen ? lc.stride(0) : lc.stride(1);
  p.lse_stride_l = c.varlen ? lc.stride(1) : lc.stride(2);
  Tensor dq = at::zeros(c.q.sizes(), c.q.options());
  Tensor dk = at::zeros(c.k.sizes(), c.k.options());
  Tensor dv = at::zeros(c.v.sizes(), c.v.options());
  bp.grad_out = go.data_ptr();
  bp.grad_q = dq.data_ptr();
  bp.grad_k = dk.data_ptr();
  bp.grad_v = dv.data_ptr();
  bp.dq_stride_b = c.varlen ? 0 : dq.stride(0);
  bp.dq_stride_h = dq.stride(hd);
  bp.dq_stride_l = dq.stride(ld);
  bp.dk_stride_b = c.varlen ? 0 : dk.stride(0);
  bp.dk_stride_h = dk.stride(hd);
  bp.dk_stride_l = dk.stride(ld);
  bp.dv_stride_b = c.varlen ? 0 : dv.stride(0);
  bp.dv_stride_h = dv.stride(hd);
  bp.dv_stride_l = dv.stride(ld);
  run_backward(bp);
  return {dq, dk, dv};
}

// Reads and optionally changes the CPU kernel configuration; returns a description such as
// "isa=avx512 brgemm=1 amx=1 ... compiled=default,avx2,avx512". avx512_bf16 is the setting of
// the vdpbf16ps micro-kernel (auto, on, off), vdpbf16ps whether bf16 GEMMs that brgemm does not
// take run on it now (AVX-512 kernels, a CPU with AVX512_BF16, the setting).
std::string cpu_kernel_config(std::optional<std::string> isa, std::optional<bool> brgemm,
                              std::optional<bool> amx, std::optional<std::string> avx512_bf16) {
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
  if (avx512_bf16.has_value()) {
    const std::string& m = *avx512_bf16;
    TORCH_CHECK(m == "auto" || m == "on" || m == "off", "aigc_ext: use_avx512_bf16 must be auto, ",
                "on or off (or True / False), not '", m, "'");
    avx512_bf16_mode().store(m == "auto" ? -1 : m == "on" ? 1 : 0);
  }
  const int mode = avx512_bf16_mode().load();
  const bool vdp = static_cast<Isa>(current_isa().load()) == Isa::kAvx512 &&
                   __builtin_cpu_supports("avx512bf16") && use_avx512_bf16();
  std::ostringstream os;
  os << "isa=" << isa_name(static_cast<Isa>(current_isa().load()))
     << " brgemm=" << (use_brgemm().load() ? 1 : 0) << " amx=" << (use_amx().load() ? 1 : 0)
     << " brgemm_bf16=" << (at::native::cpublas::could_pack(at::kBFloat16) ? 1 : 0)
     << " brgemm_fp16=" << (at::native::cpublas::could_pack(at::kHalf) ? 1 : 0)
     << " amx_tiles=" << (at::cpu::init_amx() ? 1 : 0) << " avx512_bf16="
     << (mode < 0    ? "auto"
         : mode == 1 ? "on"
                     : "off")
     << " vdpbf16ps=" << (vdp ? 1 : 0) << " compiled=default";
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
  m.def(
      "flash_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0, "
      "Tensor? seqused_k=None, Tensor? leftpad_k=None, Tensor? kv_batch_idx=None, "
      "Tensor? block_table=None, float scale=1.0, bool causal=False, int window_left=-1, "
      "int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, float dropout_p=0.0, "
      "Tensor? rng_state=None, Tensor? sinks=None, int num_splits=0, Tensor? attn_mask=None) -> "
      "(Tensor, Tensor)");
  m.def(
      "flash_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, "
      "int max_seqlen_k=0, float scale=1.0, bool causal=False, int window_left=-1, "
      "int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, float dropout_p=0.0, "
      "Tensor? rng_state=None, Tensor? attn_mask=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_cpu_kernel_config(str? isa=None, bool? use_brgemm=None, bool? use_amx=None, "
      "str? use_avx512_bf16=None) -> str",
      &cpu_kernel_config);
}

TORCH_LIBRARY_IMPL(aigc_ext, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("flash_forward", &flash_forward_cpu);
  m.impl("flash_backward", &flash_backward_cpu);
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
