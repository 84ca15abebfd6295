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
#include <sstream>
#include <string>

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

void check_common(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "aigc_ext::attention: query, key and value must be 4-D (batch, heads, seq, dim); got "
              "query ",
              shape_str(q), ", key ", shape_str(k), ", value ", shape_str(v));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "aigc_ext::attention: query, key and value must have the same dtype; got ",
              q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "aigc_ext::attention: unsupported dtype ", dt,
              " (float32, float64, bfloat16, float16 are supported)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "aigc_ext::attention CPU kernel: query, key and value must be CPU tensors; got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(0) == v.size(0),
              "aigc_ext::attention: batch sizes differ: query ", shape_str(q), ", key ",
              shape_str(k), ", value ", shape_str(v));
  TORCH_CHECK(
      k.size(1) == v.size(1) && (k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0),
      "aigc_ext::attention: key/value heads must be equal and divide query heads; got query ",
      shape_str(q), ", key ", shape_str(k), ", value ", shape_str(v));
  TORCH_CHECK(k.size(2) == v.size(2),
              "aigc_ext::attention: key and value sequence lengths differ: key ", shape_str(k),
              ", value ", shape_str(v));
  TORCH_CHECK(q.size(3) == k.size(3), "aigc_ext::attention: query and key head dims differ: query ",
              shape_str(q), ", key ", shape_str(k));
}

// Returns the mask expanded (as a view) to (B, Hq, L, S) with unit or zero stride on S.
Tensor prepare_mask(const std::optional<Tensor>& mask, const Tensor& q, const Tensor& k,
                    cpu::MaskKind& kind) {
  kind = cpu::MaskKind::kNone;
  if (!mask.has_value() || !mask->defined()) return Tensor();
  Tensor m = *mask;
  TORCH_CHECK(m.device().is_cpu(), "aigc_ext::attention: attn_mask must be on the CPU; got ",
              m.device());
  if (m.scalar_type() == at::kBool) {
    kind = cpu::MaskKind::kBool;
  } else if (m.scalar_type() == q.scalar_type()) {
    kind = cpu::MaskKind::kSameAsInput;
  } else if (m.scalar_type() == at::kFloat) {
    kind = cpu::MaskKind::kFloat32;
  } else {
    TORCH_CHECK(false, "aigc_ext::attention: attn_mask must be bool, float32 or the query dtype (",
                q.scalar_type(), "); got ", m.scalar_type());
  }
  const std::vector<int64_t> target{q.size(0), q.size(1), q.size(2), k.size(2)};
  TORCH_CHECK(
      m.dim() <= 4, "aigc_ext::attention: attn_mask ", shape_str(m),
      " has more than 4 dims; it must broadcast to (B, Hq, L, S) = ", at::IntArrayRef(target));
  for (int64_t d = 0; d < m.dim(); ++d) {
    const int64_t md = m.size(m.dim() - 1 - d), td = target[3 - d];
    TORCH_CHECK(md == td || md == 1, "aigc_ext::attention: attn_mask ", shape_str(m),
                " does not broadcast to (B, Hq, L, S) = ", at::IntArrayRef(target));
  }
  m = m.expand(target);
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

at::ScalarType lse_dtype(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<Tensor, Tensor> attention_forward_cpu(const Tensor& query, const Tensor& key,
                                                 const Tensor& value,
                                                 const std::optional<Tensor>& attn_mask,
                                                 bool is_causal, double scale) {
  check_common(query, key, value);
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
  check_common(query, key, value);
  const std::vector<int64_t> out_shape{query.size(0), query.size(1), query.size(2), value.size(3)};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape) && out.sizes() == grad_out.sizes(),
              "aigc_ext::attention_backward: grad_out ", shape_str(grad_out), " and out ",
              shape_str(out), " must have shape ", at::IntArrayRef(out_shape));
  TORCH_CHECK(
      grad_out.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type(),
      "aigc_ext::attention_backward: grad_out and out must have the query dtype ",
      query.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(out_shape).slice(0, 3) &&
                  lse.scalar_type() == lse_dtype(query),
              "aigc_ext::attention_backward: lse must be ", lse_dtype(query), " of shape ",
              at::IntArrayRef(out_shape).slice(0, 3), "; got ", lse.scalar_type(), " ",
              shape_str(lse));
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
