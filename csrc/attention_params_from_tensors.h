// From the operators' tensor arguments to the kernels' parameter structs: the argument checks
// and the filling of AttentionForwardParams / AttentionBackwardParams, for any device.
//
// Shared by the CPU operators (csrc/ops.cpp) and CUDA sources (csrc/cuda/*.cu): nothing here is
// CPU-specific; the caller names the device type its kernel serves, and the checks reject
// tensors elsewhere (a meta tensor reaching a kernel, say) with a message that names it.
//
// The checks run in this order: devices, ranks, dtypes, shapes, mask, (backward: grad_out, out,
// lse), scale. aigc_ext/op_checks.py repeats them for the fake kernels in the same order and
// with the same message text, so that a traced call fails as the real one does. Nothing is read
// or allocated before they pass.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "attention_params.h"

namespace aigc_ext::op_utils {

inline constexpr const char* kForwardOp = "aigc_ext::attention_forward";
inline constexpr const char* kBackwardOp = "aigc_ext::attention_backward";

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// A scale for an error message; NaN prints as "nan" whatever its sign bit (as Python prints it).
inline std::string scale_str(double scale) {
  if (std::isnan(scale)) return "nan";
  std::ostringstream os;
  os << scale;
  return os.str();
}

// A tensor argument and its name in the schema; `t` is undefined for an absent attn_mask.
struct Arg {
  const char* name;
  const at::Tensor& t;
};

// Every tensor must be on the query's device, and that device of the type the kernel serves:
// the dispatcher picks the kernel from the highest-priority dispatch key among all tensor
// arguments, so a call with one tensor on meta reaches the fake kernel, and a redispatch can
// bring tensors of any device here (a meta tensor has no data: the kernel would read null and
// leave its outputs unwritten).
inline void check_devices(const char* op, std::initializer_list<Arg> args, const at::Tensor& q,
                          c10::DeviceType served) {
  for (const Arg& a : args) {
    if (!a.t.defined()) continue;
    TORCH_CHECK(a.t.device() == q.device(), op, ": ", a.name, " is on ", a.t.device(),
                " but query is on ", q.device(), "; all tensors must be on one device");
  }
  TORCH_CHECK(q.device().type() == served, op, ": the tensors are on ", q.device(),
              "; this operator has a kernel for ", c10::DeviceTypeName(served), " tensors only");
}

inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v) {
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

inline void check_mask(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& q,
                       const at::Tensor& k) {
  if (!mask.has_value() || !mask->defined()) return;
  const at::Tensor& m = *mask;
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

inline void check_scale(const char* op, double scale) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be a finite number; got ", scale_str(scale));
}

// The dtype of lse: float32, float64 for float64 inputs.
inline at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline const at::Tensor& mask_or_undefined(const std::optional<at::Tensor>& mask) {
  static const at::Tensor kNone;
  return mask.has_value() ? *mask : kNone;
}

// All checks of attention_forward, for a kernel serving `served` tensors.
inline void check_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double scale,
                          c10::DeviceType served) {
  check_devices(kForwardOp, {{"key", k}, {"value", v}, {"attn_mask", mask_or_undefined(mask)}}, q,
                served);
  check_qkv(kForwardOp, q, k, v);
  check_mask(kForwardOp, mask, q, k);
  check_scale(kForwardOp, scale);
}

// All checks of attention_backward: those of the forward, and grad_out and out must be
// (B, Hq, L, Ev) in the query dtype, lse (B, Hq, L) in lse_dtype.
inline void check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const std::optional<at::Tensor>& mask, double scale,
                           c10::DeviceType served) {
  check_devices(kBackwardOp,
                {{"grad_out", grad_out},
                 {"key", k},
                 {"value", v},
                 {"out", out},
                 {"lse", lse},
                 {"attn_mask", mask_or_undefined(mask)}},
                q, served);
  check_qkv(kBackwardOp, q, k, v);
  check_mask(kBackwardOp, mask, q, k);
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  for (const Arg& a : {Arg{"grad_out", grad_out}, Arg{"out", out}}) {
    TORCH_CHECK(a.t.sizes() == at::IntArrayRef(out_shape), kBackwardOp, ": ", a.name, " ",
                shape_str(a.t), " must have shape ", at::IntArrayRef(out_shape),
                " (batch, heads and length of query, head dim of value)");
  }
  for (const Arg& a : {Arg{"grad_out", grad_out}, Arg{"out", out}}) {
    TORCH_CHECK(a.t.scalar_type() == q.scalar_type(), kBackwardOp, ": ", a.name, " has dtype ",
                a.t.scalar_type(), "; grad_out and out must have the query dtype ",
                q.scalar_type());
  }
  const at::IntArrayRef lse_shape = at::IntArrayRef(out_shape).slice(0, 3);
  TORCH_CHECK(lse.sizes() == lse_shape && lse.scalar_type() == lse_dtype(q), kBackwardOp,
              ": lse must be ", lse_dtype(q), " of shape ", lse_shape, "; got ", lse.scalar_type(),
              " ", shape_str(lse));
  check_scale(kBackwardOp, scale);
}

// The mask (checked already) expanded as a view to (B, Hq, L, S) with unit or zero stride on S.
inline at::Tensor prepare_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q,
                               const at::Tensor& k, MaskKind& kind) {
  kind = MaskKind::kNone;
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  at::Tensor m = *mask;
  if (m.scalar_type() == at::kBool) {
    kind = MaskKind::kBool;
  } else if (m.scalar_type() == q.scalar_type()) {
    kind = MaskKind::kSameAsInput;
  } else {
    kind = MaskKind::kFloat32;
  }
  m = m.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
  if (m.stride(3) != 0 && m.stride(3) != 1) m = m.contiguous();
  return m;
}

// The kernels need unit stride on the head dim and rows that do not overlap (a sequence stride
// of at least the head dim, as BLAS leading dimensions require); other views are copied.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  const bool unit_last = t.size(-1) <= 1 || t.stride(-1) == 1;
  const bool rows_apart = t.size(-2) <= 1 || t.stride(-2) >= std::max<int64_t>(t.size(-1), 1);
  return unit_last && rows_apart ? t : t.contiguous();
}

// The sequence stride handed to the kernels (a GEMM leading dimension). A single-row tensor may
// carry any stride there (torch even calls it contiguous), so use the row length instead.
inline int64_t seq_stride(const at::Tensor& t) {
  return t.size(2) <= 1 ? std::max<int64_t>(t.size(3), 1) : t.stride(2);
}

// The inputs and mask of q, k, v (prepared by rows_contiguous) and mask (by prepare_mask);
// out and lse are left null for the caller.
inline AttentionForwardParams make_params(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& mask,
                                          MaskKind kind, bool is_causal, double scale) {
  AttentionForwardParams p{};
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
  if (kind != MaskKind::kNone) {
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

// A checked forward call, ready for a kernel: the tensors params points into (kept alive by
// this struct), the allocated outputs, and the params.
// Points the params at out (B, Hq, L, Ev) and lse (B, Hq, L), at their strides.
inline void set_outputs(AttentionForwardParams& p, const at::Tensor& out, const at::Tensor& lse) {
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.out_stride_b = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.out_stride_l = out.stride(2);
  p.lse_stride_b = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  p.lse_stride_l = lse.stride(2);
}

// Points the backward params at grad_out (at out's strides) and the gradients, at their strides.
inline void set_gradients(AttentionBackwardParams& p, const at::Tensor& grad_out,
                          const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  p.grad_out = grad_out.data_ptr();
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  p.dq_stride_b = dq.stride(0);
  p.dq_stride_h = dq.stride(1);
  p.dq_stride_l = dq.stride(2);
  p.dk_stride_b = dk.stride(0);
  p.dk_stride_h = dk.stride(1);
  p.dk_stride_l = dk.stride(2);
  p.dv_stride_b = dv.stride(0);
  p.dv_stride_h = dv.stride(1);
  p.dv_stride_l = dv.stride(2);
}

struct ForwardCall {
  at::Tensor q, k, v, mask;
  at::Tensor out;  // (B, Hq, L, Ev) in the query dtype
  at::Tensor lse;  // (B, Hq, L) in lse_dtype
  AttentionForwardParams params{};
};

// Checks the arguments of attention_forward for a kernel serving `served` tensors, makes the
// views the kernels take, allocates out and lse on the query's device and fills the params.
inline ForwardCall prepare_forward(const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value,
                                   const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                   double scale, c10::DeviceType served) {
  check_forward(query, key, value, attn_mask, scale, served);
  ForwardCall c;
  c.q = rows_contiguous(query);
  c.k = rows_contiguous(key);
  c.v = rows_contiguous(value);
  MaskKind kind;
  c.mask = prepare_mask(attn_mask, c.q, c.k, kind);
  c.out = at::empty({c.q.size(0), c.q.size(1), c.q.size(2), c.v.size(3)}, c.q.options());
  c.lse = at::empty({c.q.size(0), c.q.size(1), c.q.size(2)}, c.q.options().dtype(lse_dtype(c.q)));
  c.params = make_params(c.q, c.k, c.v, c.mask, kind, is_causal, scale);
  set_outputs(c.params, c.out, c.lse);
  return c;
}

// A checked backward call, ready for a kernel, as ForwardCall.
struct BackwardCall {
  at::Tensor q, k, v, grad_out, out, lse, mask;
  at::Tensor grad_q, grad_k, grad_v;  // contiguous, shapes of q, k, v
  AttentionBackwardParams params{};
};

// Checks the arguments of attention_backward for a kernel serving `served` tensors, makes the
// views the kernels take, allocates the gradients on the query's device and fills the params.
inline BackwardCall prepare_backward(const at::Tensor& grad_out, const at::Tensor& query,
                                     const at::Tensor& key, const at::Tensor& value,
                                     const at::Tensor& out, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                     double scale, c10::DeviceType served) {
  check_backward(grad_out, query, key, value, out, lse, attn_mask, scale, served);
  BackwardCall c;
  c.q = rows_contiguous(query);
  c.k = rows_contiguous(key);
  c.v = rows_contiguous(value);
  c.grad_out = grad_out.contiguous();
  c.out = out.contiguous();
  c.lse = lse.contiguous();
  MaskKind kind;
  c.mask = prepare_mask(attn_mask, c.q, c.k, kind);
  c.grad_q = at::zeros(c.q.sizes(), c.q.options());
  c.grad_k = at::zeros(c.k.sizes(), c.k.options());
  c.grad_v = at::zeros(c.v.sizes(), c.v.options());
  c.params.fwd = make_params(c.q, c.k, c.v, c.mask, kind, is_causal, scale);
  set_outputs(c.params.fwd, c.out, c.lse);
  set_gradients(c.params, c.grad_out, c.grad_q, c.grad_k, c.grad_v);
  return c;
}

}  // namespace aigc_ext::op_utils
