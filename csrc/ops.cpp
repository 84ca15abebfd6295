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
// Fake (meta) kernels and autograd are registered from Python (aigc_ext/ops.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

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

std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// A scale for an error message; NaN prints as "nan" whatever its sign bit (as Python prints it).
std::string scale_str(double scale) {
  if (std::isnan(scale)) return "nan";
  std::ostringstream os;
  os << scale;
  return os.str();
}

// A tensor argument and its name in the schema; `t` is undefined for an absent attn_mask.
struct Arg {
  const char* name;
  const Tensor& t;
};

// The argument checks of both operators, in this order: devices, ranks, dtypes, shapes, mask,
// (backward: grad_out, out, lse), scale. aigc_ext/op_checks.py repeats them for the fake
// kernels in the same order and with the same message text, so that a traced call fails as the
// real one does. Nothing is read or allocated before they pass.

// Every tensor must be on the query's device, and that device the CPU: the dispatcher picks the
// kernel from the highest-priority dispatch key among all tensor arguments, so a call with one
// tensor on meta reaches the fake kernel, and a redispatch can bring tensors of any device here
// (a meta tensor has no data: the kernel would read null and leave its outputs unwritten).
void check_devices(const char* op, std::initializer_list<Arg> args, const Tensor& q) {
  for (const Arg& a : args) {
    if (!a.t.defined()) continue;
    TORCH_CHECK(a.t.device() == q.device(), op, ": ", a.name, " is on ", a.t.device(),
                " but query is on ", q.device(), "; all tensors must be on one device");
  }
  TORCH_CHECK(q.device().is_cpu(), op, ": the tensors are on ", q.device(),
              "; this operator has a kernel for CPU tensors only");
}

void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  const Arg qkv[] = {{"query", q}, {"key", k}, {"value", v}};
  for (const Arg& a : qkv) {
    TORCH_CHECK(a.t.dim() == 4, op, ": ", a.name,
                " must be 4-D (batch, heads, seq, dim); got shape ", shape_str(a.t));
  }
  for (const Arg& a : {qkv[1], qkv[2]}) {
    TORCH_CHECK(a.t.scalar_type() == q.scalar_type(), op, ": ", a.name, " has dtype ",
                a.t.scalar_type(), " but query has dtype ", q.scalar_type(),
                "; query, key and value must have the same dtype");
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": unsupported dtype ", dt,
              " of query, key and value (float32, float64, bfloat16, float16 are supported)");
  for (const Arg& a : {qkv[1], qkv[2]}) {
    TORCH_CHECK(a.t.size(0) == q.size(0), op, ": batch sizes differ: query has shape ",
                shape_str(q), " but ", a.name, " has shape ", shape_str(a.t));
  }
  TORCH_CHECK(k.size(1) == v.size(1), op,
              ": key and value must have the same number of heads: key has shape ", shape_str(k),
              " but value has shape ", shape_str(v));
  TORCH_CHECK(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, op,
              ": query heads must be a multiple of key/value heads: query has shape ", shape_str(q),
              " but key has shape ", shape_str(k));
  TORCH_CHECK(k.size(2) == v.size(2), op, ": key and value sequence lengths differ: key has shape ",
              shape_str(k), " but value has shape ", shape_str(v));
  TORCH_CHECK(q.size(3) == k.size(3), op, ": query and key head dims differ: query has shape ",
              shape_str(q), " but key has shape ", shape_str(k));
}

void check_mask(const char* op, const std::optional<Tensor>& mask, const Tensor& q,
                const Tensor& k) {
  if (!mask.has_value() || !mask->defined()) return;
  const Tensor& m = *mask;
  const auto dt = m.scalar_type();
  TORCH_CHECK(dt == at::kBool || dt == q.scalar_type() || dt == at::kFloat, op,
              ": attn_mask must be bool, float32 or the query dtype (", q.scalar_type(), "); got ",
              dt);
  const std::vector<int64_t> target{q.size(0), q.size(1), q.size(2), k.size(2)};
  TORCH_CHECK(
      m.dim() <= 4, op, ": attn_mask ", shape_str(m),
      " has more than 4 dims; it must broadcast to (B, Hq, L, S) = ", at::IntArrayRef(target));
  for (int64_t d = 0; d < m.dim(); ++d) {
    const int64_t md = m.size(m.dim() - 1 - d), td = target[3 - d];
    TORCH_CHECK(md == td || md == 1, op, ": attn_mask ", shape_str(m),
                " does not broadcast to (B, Hq, L, S) = ", at::IntArrayRef(target));
  }
}

void check_scale(const char* op, double scale) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be a finite number; got ", scale_str(scale));
}

at::ScalarType lse_dtype(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

constexpr const char* kForward = "aigc_ext::attention_forward";
constexpr const char* kBackward = "aigc_ext::attention_backward";

const Tensor& mask_or_undefined(const std::optional<Tensor>& mask) {
  static const Tensor kNone;
  return mask.has_value() ? *mask : kNone;
}

void check_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                   const std::optional<Tensor>& mask, double scale) {
  check_devices(kForward, {{"key", k}, {"value", v}, {"attn_mask", mask_or_undefined(mask)}}, q);
  check_qkv(kForward, q, k, v);
  check_mask(kForward, mask, q, k);
  check_scale(kForward, scale);
}

// grad_out and out must be (B, Hq, L, Ev) in the query dtype, lse (B, Hq, L) in lse_dtype.
void check_backward(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                    const Tensor& out, const Tensor& lse, const std::optional<Tensor>& mask,
                    double scale) {
  check_devices(kBackward,
                {{"grad_out", grad_out},
                 {"key", k},
                 {"value", v},
                 {"out", out},
                 {"lse", lse},
                 {"attn_mask", mask_or_undefined(mask)}},
                q);
  check_qkv(kBackward, q, k, v);
  check_mask(kBackward, mask, q, k);
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  for (const Arg& a : {Arg{"grad_out", grad_out}, Arg{"out", out}}) {
    TORCH_CHECK(a.t.sizes() == at::IntArrayRef(out_shape), kBackward, ": ", a.name, " ",
                shape_str(a.t), " must have shape ", at::IntArrayRef(out_shape),
                " (batch, heads and length of query, head dim of value)");
  }
  for (const Arg& a : {Arg{"grad_out", grad_out}, Arg{"out", out}}) {
    TORCH_CHECK(a.t.scalar_type() == q.scalar_type(), kBackward, ": ", a.name, " has dtype ",
                a.t.scalar_type(), "; grad_out and out must have the query dtype ",
                q.scalar_type());
  }
  const at::IntArrayRef lse_shape = at::IntArrayRef(out_shape).slice(0, 3);
  TORCH_CHECK(lse.sizes() == lse_shape && lse.scalar_type() == lse_dtype(q), kBackward,
              ": lse must be ", lse_dtype(q), " of shape ", lse_shape, "; got ", lse.scalar_type(),
              " ", shape_str(lse));
  check_scale(kBackward, scale);
}

// The mask (checked already) expanded as a view to (B, Hq, L, S) with unit or zero stride on S.
Tensor prepare_mask(const std::optional<Tensor>& mask, const Tensor& q, const Tensor& k,
                    cpu::MaskKind& kind) {
  kind = cpu::MaskKind::kNone;
  if (!mask.has_value() || !mask->defined()) return Tensor();
  Tensor m = *mask;
  if (m.scalar_type() == at::kBool) {
    kind = cpu::MaskKind::kBool;
  } else if (m.scalar_type() == q.scalar_type()) {
    kind = cpu::MaskKind::kSameAsInput;
  } else {
    kind = cpu::MaskKind::kFloat32;
  }
  m = m.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
  if (m.stride(3) != 0 && m.stride(3) != 1) m = m.contiguous();
  return m;
}

// The kernels need unit stride on the head dim and rows that do not overlap (a sequence stride
// of at least the head dim, as BLAS leading dimensions require); other views are copied.
Tensor rows_contiguous(const Tensor& t) {
  const bool unit_last = t.size(-1) <= 1 || t.stride(-1) == 1;
  const bool rows_apart = t.size(-2) <= 1 || t.stride(-2) >= std::max<int64_t>(t.size(-1), 1);
  return unit_last && rows_apart ? t : t.contiguous();
}

// The sequence stride handed to the kernels (a GEMM leading dimension). A single-row tensor may
// carry any stride there (torch even calls it contiguous), so use the row length instead.
int64_t seq_stride(const Tensor& t) {
  return t.size(2) <= 1 ? std::max<int64_t>(t.size(3), 1) : t.stride(2);
}

cpu::AttentionForwardParams make_params(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& mask, cpu::MaskKind kind, bool is_causal,
                                        double scale) {
  cpu::AttentionForwardParams p{};
  p.dtype = q.scalar_type();
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.len_q = q.size(2);
  p.len_kv = k.size(2);
  p.head_dim = q.size(3);
  p.head_dim_v = v.size(3);
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.q_stride_l = seq_stride(q);
  p.k = k.data_ptr();
  p.k_stride_b = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.k_stride_l = seq_stride(k);
  p.v = v.data_ptr();
  p.v_stride_b = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.v_stride_l = seq_stride(v);
  p.mask_kind = kind;
  if (kind != cpu::MaskKind::kNone) {
    p.mask = mask.data_ptr();
    p.mask_stride_b = mask.stride(0);
    p.mask_stride_h = mask.stride(1);
    p.mask_stride_l = mask.stride(2);
    p.mask_stride_s = mask.stride(3);
  }
  p.is_causal = is_causal;
  p.scale = scale;
  return p;
}

cpu::KernelOptions options() {
  cpu::KernelOptions opt;
  opt.use_brgemm = use_brgemm().load();
  opt.use_amx = use_amx().load();
  return opt;
}

void run_forward(const cpu::AttentionForwardParams& p) {
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

void run_backward(const cpu::AttentionBackwardParams& p) {
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
  check_forward(query, key, value, attn_mask, scale);
  const Tensor q = rows_contiguous(query), k = rows_contiguous(key), v = rows_contiguous(value);
  cpu::MaskKind kind;
  const Tensor mask = prepare_mask(attn_mask, q, k, kind);
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q)));
  auto p = make_params(q, k, v, mask, kind, is_causal, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  run_forward(p);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(const Tensor& grad_out,
                                                          const Tensor& query, const Tensor& key,
                                                          const Tensor& value, const Tensor& out,
                                                          const Tensor& lse,
                                                          const std::optional<Tensor>& attn_mask,
                                                          bool is_causal, double scale) {
  check_backward(grad_out, query, key, value, out, lse, attn_mask, scale);
  const Tensor q = rows_contiguous(query), k = rows_contiguous(key), v = rows_contiguous(value);
  const Tensor go = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
  cpu::MaskKind kind;
  const Tensor mask = prepare_mask(attn_mask, q, k, kind);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  cpu::AttentionBackwardParams p{};
  p.fwd = make_params(q, k, v, mask, kind, is_causal, scale);
  p.fwd.out = const_cast<void*>(o.data_ptr());
  p.fwd.lse = const_cast<void*>(l.data_ptr());
  p.grad_out = go.data_ptr();
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  run_backward(p);
  return {dq, dk, dv};
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
