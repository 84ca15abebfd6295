// The flash_forward / flash_backward operators (docs/flash-contract.md): argument checks and
// the parameter structs their kernels take, built from tensors in FlashAttention's layouts.
//
// Every check that guards a memory access runs here, on the values of the int32 tensors too
// (cu_seqlens increasing and within the packed tensors, block tables within the cache, cache
// lengths within its capacity), so the kernels index with them unchecked. Device-neutral like
// attention_params_from_tensors.h: the index tensors are read on the host (a CUDA caller pays a
// copy of a few hundred bytes).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "attention_params.h"
#include "attention_params_from_tensors.h"

namespace aigc_ext::op_utils {

inline constexpr const char* kFlashForwardOp = "aigc_ext::flash_forward";
inline constexpr const char* kFlashBackwardOp = "aigc_ext::flash_backward";

// The options shared by both operators, as the schema passes them.
struct FlashOptions {
  const std::optional<at::Tensor>& cu_seqlens_q;
  const std::optional<at::Tensor>& cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;
  const std::optional<at::Tensor>& seqused_k;
  const std::optional<at::Tensor>& leftpad_k;
  const std::optional<at::Tensor>& kv_batch_idx;
  const std::optional<at::Tensor>& block_table;
  double scale;
  bool causal;
  int64_t window_left, window_right;
  double softcap;
  const std::optional<at::Tensor>& alibi_slopes;
  double dropout_p;
  const std::optional<at::Tensor>& rng_state;
  const std::optional<at::Tensor>& sinks;
  int64_t num_splits;
  const std::optional<at::Tensor>& attn_mask;
};

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A 1-D or 2-D index tensor: int32, on the query's device, of the given shape; its values on
// the host.
inline std::vector<int32_t> index_values(const char* op, const char* name, const at::Tensor& t,
                                         at::IntArrayRef shape, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32; got ", t.scalar_type(),
              " of shape ", shape_str(t));
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but query is on ",
              q.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, "; got ",
              shape_str(t));
  const at::Tensor h = t.to(at::kCPU).contiguous();
  const int32_t* d = h.data_ptr<int32_t>();
  return std::vector<int32_t>(d, d + h.numel());
}

inline void check_float_vector(const char* op, const char* name, const at::Tensor& t,
                               std::initializer_list<at::IntArrayRef> shapes, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32; got ",
              t.scalar_type(), " of shape ", shape_str(t));
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but query is on ",
              q.device());
  bool ok = false;
  std::ostringstream want;
  for (const at::IntArrayRef& s : shapes) {
    ok = ok || t.sizes() == s;
    want << (want.tellp() > 0 ? " or " : "") << s;
  }
  TORCH_CHECK(ok, op, ": ", name, " must have shape ", want.str(), "; got ", shape_str(t));
}

// Last dim contiguous, rows apart (the kernels read rows at the sequence stride).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// The checked tensors and params of one call.
struct FlashCall {
  at::Tensor q, k, v, alibi, sinks, mask;
  std::vector<int32_t> cu_q, cu_k, seqused, leftpad, batch_idx, table;
  at::Tensor cu_q_t, cu_k_t, seqused_t, leftpad_t, batch_idx_t, table_t;  // host int32 copies
  AttentionForwardParams params{};
  bool varlen = false;
  int64_t total_q = 0;  // rows of the packed query (varlen)
};

inline at::Tensor host_int32(const std::vector<int32_t>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kInt));
  std::copy(v.begin(), v.end(), t.data_ptr<int32_t>());
  return t;
}

// Checks q, k, v and every option of a flash call and fills the params (inputs and features;
// outputs are set by the caller).
inline FlashCall prepare_flash(const char* op, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const FlashOptions& o, bool forward,
                               c10::DeviceType served) {
  check_devices(op, {{"key", key}, {"value", value}}, query, served);
  FlashCall c;
  c.varlen = given(o.cu_seqlens_q) || given(o.cu_seqlens_k);
  TORCH_CHECK(!c.varlen || (given(o.cu_seqlens_q) && given(o.cu_seqlens_k)), op,
              ": cu_seqlens_q and cu_seqlens_k must be given together");
  const bool paged = given(o.block_table);
  TORCH_CHECK(
      forward || !(paged || given(o.seqused_k) || given(o.leftpad_k) || given(o.kv_batch_idx)), op,
      ": the KV-cache arguments (block_table, seqused_k, leftpad_k, kv_batch_idx) "
      "are forward-only");
  const int64_t qdim = c.varlen ? 3 : 4;
  const char* layout =
      c.varlen ? "(total_tokens, heads, head_dim)" : "(batch, seq, heads, head_dim)";
  const Arg qkv[] = {{"q", query}, {"k", key}, {"v", value}};
  for (const Arg& a : qkv) {
    TORCH_CHECK(a.t.dim() == qdim, op, ": ", a.name, " must be ", qdim, "-D ", layout,
                "; got shape ", shape_str(a.t));
  }
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": unsupported dtype ", dt, " of q (float32, float64, bfloat16, float16)");
  for (const Arg& a : {qkv[1], qkv[2]}) {
    TORCH_CHECK(a.t.scalar_type() == dt, op, ": ", a.name, " has dtype ", a.t.scalar_type(),
                " but q has dtype ", dt);
  }
  c.q = last_dim_contiguous(query);
  c.k = last_dim_contiguous(key);
  c.v = last_dim_contiguous(value);
  const at::Tensor &q = c.q, &k = c.k, &v = c.v;
  const int64_t hd = qdim - 2;  // heads dim
  const int64_t Hq = q.size(hd), Hkv = k.size(hd), D = q.size(-1), Dv = v.size(-1);
  TORCH_CHECK(k.sizes().slice(0, qdim - 1) == v.sizes().slice(0, qdim - 1), op,
              ": k and v must agree in all but the head dim: k ", shape_str(k), ", v ",
              shape_str(v));
  TORCH_CHECK(k.size(-1) == D, op, ": q and k head dims differ: q ", shape_str(q), ", k ",
              shape_str(k));
  TORCH_CHECK(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, op,
              ": the heads of q must be a multiple of those of k and v: q ", shape_str(q), ", k ",
              shape_str(k));
  TORCH_CHECK(std::isfinite(o.scale), op, ": softmax scale must be finite; got ",
              scale_str(o.scale));
  TORCH_CHECK(o.window_left >= -1 && o.window_right >= -1, op,
              ": window_size must be (left, right) with -1 meaning unbounded and no value below "
              "-1; got (",
              o.window_left, ", ", o.window_right, ")");
  TORCH_CHECK(std::isfinite(o.softcap) && o.softcap >= 0, op,
              ": softcap must be >= 0 (0 disables it); got ", o.softcap);
  TORCH_CHECK(o.dropout_p >= 0 && o.dropout_p < 1, op, ": dropout_p must be in [0, 1); got ",
              o.dropout_p);
  TORCH_CHECK(o.num_splits >= 0, op, ": num_splits must be >= 0; got ", o.num_splits);

  AttentionForwardParams& p = c.params;
  FlashFeatures& f = p.flash;
  p.dtype = dt;
  p.heads_q = Hq;
  p.heads_kv = Hkv;
  p.head_dim = D;
  p.head_dim_v = Dv;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.scale = o.scale;
  p.is_causal = false;
  f.bottom_right = true;
  f.window_left = o.window_left;
  f.window_right = o.causal ? 0 : o.window_right;
  f.softcap = o.softcap;
  f.num_splits = o.num_splits;
  f.dropout_p = o.dropout_p;

  int64_t B;
  if (c.varlen) {
    const int64_t nb = o.cu_seqlens_q->numel();
    TORCH_CHECK(o.cu_seqlens_q->dim() == 1 && nb >= 1, op,
                ": cu_seqlens_q must be 1-D of batch + 1 entries; got shape ",
                shape_str(*o.cu_seqlens_q));
    B = nb - 1;
    c.total_q = q.size(0);
    c.cu_q = index_values(op, "cu_seqlens_q", *o.cu_seqlens_q, {nb}, q);
    c.cu_k = index_values(op, "cu_seqlens_k", *o.cu_seqlens_k, {nb}, q);
    int64_t lq = 0, lk = 0;
    for (const auto& [name, cu, total, cap] :
         {std::tuple{"cu_seqlens_q", &c.cu_q, q.size(0), o.max_seqlen_q},
          std::tuple{"cu_seqlens_k", &c.cu_k, k.size(0), o.max_seqlen_k}}) {
      TORCH_CHECK((*cu)[0] == 0, op, ": ", name, " must start at 0; got ", (*cu)[0]);
      int64_t longest = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = int64_t{(*cu)[b + 1]} - (*cu)[b];
        TORCH_CHECK(len >= 0, op, ": ", name, " must be non-decreasing; entry ", b + 1, " (",
                    (*cu)[b + 1], ") is below entry ", b, " (", (*cu)[b], ")");
        longest = std::max(longest, len);
      }
      TORCH_CHECK((*cu)[B] <= total, op, ": ", name, " ends at ", (*cu)[B],
                  " but the packed tensor has only ", total, " rows");
      TORCH_CHECK(longest <= cap, op, ": a sequence of ", name, " has ", longest,
                  " tokens, more than max_seqlen_", name[11], " = ", cap);
      (name[11] == 'q' ? lq : lk) = longest;
    }
    p.batch = B;
    p.len_q = lq;
    p.len_kv = lk;
    c.cu_q_t = host_int32(c.cu_q);
    c.cu_k_t = host_int32(c.cu_k);
    f.cu_seqlens_q = c.cu_q_t.data_ptr<int32_t>();
    f.cu_seqlens_k = c.cu_k_t.data_ptr<int32_t>();
    p.q_stride_b = p.k_stride_b = p.v_stride_b = 0;
    p.q_stride_h = q.stride(1);
    p.q_stride_l = q.stride(0);
    p.k_stride_h = k.stride(1);
    p.k_stride_l = k.stride(0);
    p.v_stride_h = v.stride(1);
    p.v_stride_l = v.stride(0);
    TORCH_CHECK(!paged && !given(o.seqused_k) && !given(o.leftpad_k) && !given(o.kv_batch_idx), op,
                ": the KV-cache arguments do not combine with cu_seqlens");
  } else {
    B = q.size(0);
    p.batch = B;
    p.len_q = q.size(1);
    p.q_stride_b = q.stride(0);
    p.q_stride_h = q.stride(2);
    p.q_stride_l = q.stride(1);
    p.k_stride_b = k.stride(0);
    p.k_stride_h = k.stride(2);
    p.k_stride_l = k.stride(1);
    p.v_stride_b = v.stride(0);
    p.v_stride_h = v.stride(2);
    p.v_stride_l = v.stride(1);
    int64_t capacity = k.size(1);
    if (paged) {
      TORCH_CHECK(o.block_table->dim() == 2 && o.block_table->size(0) == B, op,
                  ": block_table must be (batch, max_pages) = (", B, ", ...); got shape ",
                  shape_str(*o.block_table));
      TORCH_CHECK(!given(o.kv_batch_idx), op,
                  ": kv_batch_idx (cache_batch_idx) does not combine with block_table");
      const int64_t pages = o.block_table->size(1), page = k.size(1);
      TORCH_CHECK(page > 0, op, ": a paged cache needs pages of at least one row; k has shape ",
                  shape_str(k));
      c.table = index_values(op, "block_table", *o.block_table, {B, pages}, q);
      capacity = pages * page;
      f.page_size = page;
      f.block_table_stride = pages;
    } else if (given(o.kv_batch_idx)) {
      c.batch_idx = index_values(op, "kv_batch_idx", *o.kv_batch_idx, {B}, q);
      for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(c.batch_idx[b] >= 0 && c.batch_idx[b] < k.size(0), op, ": kv_batch_idx[", b,
                    "] = ", c.batch_idx[b], " is outside the cache's ", k.size(0), " rows");
      }
    } else {
      TORCH_CHECK(k.size(0) == B, op, ": batch sizes differ: q ", shape_str(q), ", k ",
                  shape_str(k));
    }
    c.seqused.assign(B, static_cast<int32_t>(std::min<int64_t>(capacity, INT32_MAX)));
    c.leftpad.assign(B, 0);
    if (given(o.seqused_k)) c.seqused = index_values(op, "seqused_k", *o.seqused_k, {B}, q);
    if (given(o.leftpad_k)) c.leftpad = index_values(op, "leftpad_k", *o.leftpad_k, {B}, q);
    int64_t lk = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(c.seqused[b] <= capacity, op, ": seqused_k[", b, "] = ", c.seqused[b],
                  " exceeds the cache's capacity of ", capacity, " positions");
      TORCH_CHECK(c.leftpad[b] >= 0 && c.leftpad[b] <= c.seqused[b], op, ": leftpad_k[", b,
                  "] = ", c.leftpad[b], " must be in [0, seqused_k[", b, "] = ", c.seqused[b], "]");
      lk = std::max<int64_t>(lk, c.seqused[b] - c.leftpad[b]);
      if (paged) {
        const int64_t used = (int64_t{c.seqused[b]} + f.page_size - 1) / f.page_size;
        for (int64_t j = c.leftpad[b] / f.page_size; j < used; ++j) {
          const int32_t page = c.table[b * f.block_table_stride + j];
          TORCH_CHECK(page >= 0 && page < k.size(0), op, ": block_table[", b, ", ", j, "] = ", page,
                      " points outside the cache's ", k.size(0), " pages");
        }
      }
    }
    p.len_kv = lk;
    if (given(o.seqused_k) || given(o.leftpad_k) || paged) {
      c.seqused_t = host_int32(c.seqused);
      c.leftpad_t = host_int32(c.leftpad);
      f.seqused_k = c.seqused_t.data_ptr<int32_t>();
      f.leftpad_k = c.leftpad_t.data_ptr<int32_t>();
    }
    if (paged) {
      c.table_t = host_int32(c.table);
      f.block_table = c.table_t.data_ptr<int32_t>();
    }
    if (!c.batch_idx.empty()) {
      c.batch_idx_t = host_int32(c.batch_idx);
      f.kv_batch_idx = c.batch_idx_t.data_ptr<int32_t>();
    }
  }
  if (given(o.attn_mask)) {
    // Dense layout only: broadcast to (B, Hq, Lq, S), bool (True = takes part) or added.
    TORCH_CHECK(
        !c.varlen && !paged && !given(o.seqused_k) && !given(o.leftpad_k) && !given(o.kv_batch_idx),
        op, ": attn_mask combines only with the dense layout (no cu_seqlens or cache)");
    const at::Tensor& m = *o.attn_mask;
    TORCH_CHECK(m.device() == q.device(), op, ": attn_mask is on ", m.device(), " but q is on ",
                q.device());
    TORCH_CHECK(
        m.scalar_type() == at::kBool || m.scalar_type() == dt || m.scalar_type() == at::kFloat, op,
        ": attn_mask must be bool, float32 or the dtype of q (", dt, "); got ", m.scalar_type());
    const std::vector<int64_t> target{B, Hq, p.len_q, k.size(1)};
    bool ok = m.dim() <= 4;
    for (int64_t d = 0; ok && d < m.dim(); ++d) {
      const int64_t md = m.size(m.dim() - 1 - d), td = target[3 - d];
      ok = md == td || md == 1;
    }
    TORCH_CHECK(ok, op, ": attn_mask ", shape_str(m),
                " does not broadcast to (B, Hq, Lq, S) = ", at::IntArrayRef(target));
    c.mask = m.expand(target);
    if (c.mask.stride(3) != 0 && c.mask.stride(3) != 1) c.mask = c.mask.contiguous();
    p.mask_kind = m.scalar_type() == at::kBool ? MaskKind::kBool
                  : m.scalar_type() == dt      ? MaskKind::kSameAsInput
                                               : MaskKind::kFloat32;
    p.mask = c.mask.data_ptr();
    p.mask_stride_b = c.mask.stride(0);
    p.mask_stride_h = c.mask.stride(1);
    p.mask_stride_l = c.mask.stride(2);
    p.mask_stride_s = c.mask.stride(3);
  }
  if (given(o.alibi_slopes)) {
    check_float_vector(op, "alibi_slopes", *o.alibi_slopes, {{Hq}, {B, Hq}}, q);
    c.alibi = o.alibi_slopes->contiguous();
    f.alibi = c.alibi.data_ptr<float>();
    f.alibi_stride_b = c.alibi.dim() == 2 ? Hq : 0;
  }
  if (given(o.sinks)) {
    check_float_vector(op, "sinks", *o.sinks, {{Hq}}, q);
    c.sinks = o.sinks->contiguous();
    f.sinks = c.sinks.data_ptr<float>();
  }
  if (o.dropout_p > 0) {
    TORCH_CHECK(given(o.rng_state), op, ": dropout_p > 0 needs rng_state, an int64 [seed, offset]");
    const at::Tensor& r = *o.rng_state;
    TORCH_CHECK(r.scalar_type() == at::kLong && r.numel() == 2, op,
                ": rng_state must be int64 with 2 elements [seed, offset]; got ", r.scalar_type(),
                " of shape ", shape_str(r));
    const at::Tensor h = r.to(at::kCPU).contiguous();
    f.seed = static_cast<uint64_t>(h.data_ptr<int64_t>()[0]);
    f.offset = static_cast<uint64_t>(h.data_ptr<int64_t>()[1]);
  }
  return c;
}

// The forward's results a flash backward takes: grad_out and out in q's dtype and the forward's
// output shape, lse in lse_dtype and the forward's lse shape. Every device's operator checks
// them here, with the same messages.
inline void check_flash_backward_tensors(const char* op, const FlashCall& c,
                                         const at::Tensor& grad_out, const at::Tensor& out,
                                         const at::Tensor& lse) {
  const at::Tensor& q = c.q;
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = c.v.size(-1);
  for (const Arg& a : {Arg{"grad_out", grad_out}, Arg{"out", out}}) {
    TORCH_CHECK(a.t.sizes() == at::IntArrayRef(out_shape) && a.t.scalar_type() == q.scalar_type(),
                op, ": ", a.name, " must be ", q.scalar_type(), " of shape ",
                at::IntArrayRef(out_shape), "; got ", a.t.scalar_type(), " ", shape_str(a.t));
  }
  const std::vector<int64_t> lse_shape =
      c.varlen ? std::vector<int64_t>{q.size(1), q.size(0)}
               : std::vector<int64_t>{q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape) && lse.scalar_type() == lse_dtype(q), op,
              ": lse must be ", lse_dtype(q), " of shape ", at::IntArrayRef(lse_shape), "; got ",
              lse.scalar_type(), " ", shape_str(lse));
}

// out (B, L, Hq, Dv) or (T, Hq, Dv) and lse (B, Hq, L) or (Hq, T), allocated and pointed at.
inline std::pair<at::Tensor, at::Tensor> flash_outputs(FlashCall& c) {
  AttentionForwardParams& p = c.params;
  const at::Tensor& q = c.q;
  const auto lse_opts = q.options().dtype(lse_dtype(q));
  at::Tensor out, lse;
  if (c.varlen) {
    const int64_t T = c.total_q, used = c.cu_q.back();
    out = at::empty({T, p.heads_q, p.head_dim_v}, q.options());
    lse = at::empty({p.heads_q, T}, lse_opts);
    if (used < T) {  // rows past the last sequence
      out.narrow(0, used, T - used).zero_();
      lse.narrow(1, used, T - used).fill_(-std::numeric_limits<double>::infinity());
    }
    p.out_stride_b = 0;
    p.out_stride_h = out.stride(1);
    p.out_stride_l = out.stride(0);
    p.lse_stride_b = 0;
    p.lse_stride_h = lse.stride(0);
    p.lse_stride_l = lse.stride(1);
  } else {
    out = at::empty({p.batch, p.len_q, p.heads_q, p.head_dim_v}, q.options());
    lse = at::empty({p.batch, p.heads_q, p.len_q}, lse_opts);
    p.out_stride_b = out.stride(0);
    p.out_stride_h = out.stride(2);
    p.out_stride_l = out.stride(1);
    p.lse_stride_b = lse.stride(0);
    p.lse_stride_h = lse.stride(1);
    p.lse_stride_l = lse.stride(2);
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  return {out, lse};
}

}  // namespace aigc_ext::op_utils
