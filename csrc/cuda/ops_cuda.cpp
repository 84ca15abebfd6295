// The operators' CUDA implementations: the same argument checks and parameter structs as the
// CPU operators (attention_params_from_tensors.h, flash_params_from_tensors.h), then the kernels
// of flash_launch.h on the current stream of the query's device.
//
// Host C++ only (no CUDA kernels here), compiled in CUDA builds (AIGC_EXT_WITH_CUDA). What this
// layer adds to the shared preparation, to keep flash_launch.h's promises to the kernels:
//  * every tensor a kernel reads or writes row by row (q, k, v, out, grad_out, the gradients)
//    starts 16-byte aligned with every stride but the last a multiple of 16 bytes: views that
//    are not are copied, and outputs whose last dim is not a multiple of 8 elements are staged
//    in a padded buffer and copied back;
//  * the index tensors and ALiBi slopes are passed as device pointers (the shared preparation
//    reads them on the host for validation and points the params at host copies);
//  * empty problems, and problems without keys, are answered without a launch.
// The kernel: the Hopper forward (flash_fwd_sm90) on compute capability 9.0 when this library
// holds its sm_90a code and it serves the call, otherwise the sm80 kernels (compute capability
// 8.0 and newer). The environment variable AIGC_EXT_CUDA_KERNEL=sm80 forces the sm80 forward on
// Hopper, =sm90 requires the Hopper one (an error where it cannot serve); unset or auto: as
// above. It is read at each call.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "attention_params.h"
#include "attention_params_from_tensors.h"
#include "cuda/flash_launch.h"
#include "flash_params_from_tensors.h"

namespace aigc_ext {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kAlignBytes = 16;

// ---------------------------------------------------------------------------------------------
// Layouts the kernels can take
// ---------------------------------------------------------------------------------------------

bool ptr_aligned(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlignBytes == 0;
}

// Base 16-byte aligned, unit stride on the last dim and every other stride a multiple of 16
// bytes (dims of size 1 have no stride that matters).
bool rows_aligned(const Tensor& t) {
  if (!ptr_aligned(t)) return false;
  const int64_t esize = static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) <= 1) continue;
    if (d == t.dim() - 1) {
      if (t.stride(d) != 1) return false;
    } else if ((t.stride(d) * esize) % kAlignBytes != 0) {
      return false;
    }
  }
  return true;
}

// An uninitialised tensor of `sizes` whose rows are padded in memory to a multiple of 16 bytes
// (a view of the first sizes.back() columns when padded).
Tensor empty_rows_aligned(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  std::vector<int64_t> padded(sizes.begin(), sizes.end());
  if (padded.empty()) return at::empty(sizes, opts);
  const int64_t per_chunk = kAlignBytes / static_cast<int64_t>(opts.dtype().itemsize());
  const int64_t d = padded.back();
  padded.back() = (d + per_chunk - 1) / per_chunk * per_chunk;
  const Tensor t = at::empty(padded, opts);
  return padded.back() == d ? t : t.narrow(-1, 0, d);
}

// `t` itself when the kernels can read it as it is, else a copy they can.
Tensor kernel_layout(const Tensor& t) {
  if (rows_aligned(t)) return t;
  Tensor c = empty_rows_aligned(t.sizes(), t.options());
  c.copy_(t);
  return c;
}

// A tensor read element by element (mask, index vectors, slopes): only the base must be aligned.
Tensor base_aligned(const Tensor& t) {
  return ptr_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

OptTensor base_aligned(const OptTensor& t) {
  if (!op_utils::given(t)) return t;
  return base_aligned(*t);
}

// grad_out is read at out's strides (AttentionBackwardParams): both in kernel layouts with the
// same strides (same shapes, so the same allocation gives the same strides).
std::pair<Tensor, Tensor> same_layout(const Tensor& grad_out, const Tensor& out) {
  Tensor go = kernel_layout(grad_out), o = kernel_layout(out);
  if (go.strides() != o.strides()) {
    go = empty_rows_aligned(grad_out.sizes(), grad_out.options());
    go.copy_(grad_out);
    o = empty_rows_aligned(out.sizes(), out.options());
    o.copy_(out);
  }
  return {go, o};
}

// An output the kernel writes: `t` itself when it has a kernel layout, else a padded staging
// buffer (copied back by finish_output).
Tensor staged_output(const Tensor& t) {
  return rows_aligned(t) ? t : empty_rows_aligned(t.sizes(), t.options());
}

// Copies a staging buffer back to its output; `rows` (on dim 0) bounds what the kernel wrote.
void finish_output(const Tensor& out, const Tensor& staged, int64_t rows = -1) {
  if (staged.is_same(out)) return;
  if (rows < 0) {
    out.copy_(staged);
  } else if (rows > 0) {
    out.narrow(0, 0, rows).copy_(staged.narrow(0, 0, rows));
  }
}

// ---------------------------------------------------------------------------------------------
// Which kernel
// ---------------------------------------------------------------------------------------------

struct Capability {
  int major = 0, minor = 0;
};

Capability capability(c10::DeviceIndex device) {
  Capability c;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&c.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&c.minor, cudaDevAttrComputeCapabilityMinor, device));
  return c;
}

const char* dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float:
      return "float32";
    case c10::ScalarType::Double:
      return "float64";
    case c10::ScalarType::Half:
      return "float16";
    case c10::ScalarType::BFloat16:
      return "bfloat16";
    default:
      return c10::toString(t);
  }
}

// Why no kernel of this backend serves `p` at all, or nullptr.
std::optional<std::string> unsupported(const AttentionForwardParams& p) {
  if (const char* why = cuda::sm80_unsupported(p)) {
    std::string s = why;
    if (p.dtype != c10::ScalarType::Half && p.dtype != c10::ScalarType::BFloat16) {
      s += std::string(" (the inputs are ") + dtype_name(p.dtype) + ")";
    }
    return s;
  }
  if (p.head_dim < 1 || p.head_dim_v < 1) return std::string("head dims of 0 are not implemented");
  return std::nullopt;
}

void check_served(const char* op, const AttentionForwardParams& p) {
  if (const auto why = unsupported(p)) {
    TORCH_CHECK(false, op, ": the cuda backend cannot serve this call: ", *why,
                "; use backend='triton'");
  }
}

// The sm80 kernels run on compute capability 8.0 and newer.
Capability check_device(const char* op, const Tensor& q) {
  const Capability cc = capability(q.get_device());
  TORCH_CHECK(cc.major >= 8, op, ": the cuda backend needs a GPU of compute capability 8.0 or ",
              "newer; ", q.device(), " has ", cc.major, ".", cc.minor, "; use backend='triton'");
  return cc;
}

enum class Forward { kSm80, kSm90 };

// The forward kernel for `p` on a device of capability `cc` (the sm_90a code runs on 9.0 only).
Forward pick_forward(const char* op, const AttentionForwardParams& p, Capability cc) {
  const char* env = std::getenv("AIGC_EXT_CUDA_KERNEL");
  const std::string want = env != nullptr && env[0] != '\0' ? env : "auto";
  TORCH_CHECK(want == "auto" || want == "sm80" || want == "sm90", op,
              ": AIGC_EXT_CUDA_KERNEL must be auto, sm80 or sm90; got '", want, "'");
  if (want == "sm80") return Forward::kSm80;
  const char* why_not = nullptr;
  if (cc.major != 9 || cc.minor != 0) {
    why_not = "the device is not compute capability 9.0";
  } else if (!cuda::sm90_fwd_compiled()) {
    why_not = "this library was built without sm_90a code (AIGC_EXT_CUDA_ARCHS)";
  } else {
    why_not = cuda::sm90_fwd_unsupported(p);
  }
  if (why_not == nullptr) return Forward::kSm90;
  TORCH_CHECK(want != "sm90", op, ": AIGC_EXT_CUDA_KERNEL=sm90 but the sm90 forward cannot serve ",
              "this call: ", why_not);
  return Forward::kSm80;
}

void launch_forward(const char* op, const AttentionForwardParams& p, Capability cc,
                    cudaStream_t stream) {
  const Forward k = pick_forward(op, p, cc);
  C10_CUDA_CHECK(k == Forward::kSm90 ? cuda::flash_fwd_sm90(p, stream)
                                     : cuda::flash_fwd_sm80(p, stream));
}

void launch_backward(const AttentionBackwardParams& p, const Tensor& q, cudaStream_t stream) {
  const size_t bytes = cuda::flash_bwd_sm80_workspace_bytes(p);
  Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  }
  C10_CUDA_CHECK(cuda::flash_bwd_sm80(p, bytes > 0 ? workspace.data_ptr() : nullptr, stream));
}

bool no_work(const AttentionForwardParams& p) {
  return p.batch == 0 || p.heads_q == 0 || p.len_q == 0;
}

// ---------------------------------------------------------------------------------------------
// SDPA operators
// ---------------------------------------------------------------------------------------------

// q, k, v and the mask of an SDPA call in the layouts the kernels take, and their params.
struct SdpaInputs {
  Tensor q, k, v, mask;
  AttentionForwardParams params{};
};

SdpaInputs prepare_sdpa(const Tensor& query, const Tensor& key, const Tensor& value,
                        const OptTensor& attn_mask, bool is_causal, double scale) {
  SdpaInputs in;
  in.q = kernel_layout(op_utils::rows_contiguous(query));
  in.k = kernel_layout(op_utils::rows_contiguous(key));
  in.v = kernel_layout(op_utils::rows_contiguous(value));
  MaskKind kind;
  in.mask = op_utils::prepare_mask(base_aligned(attn_mask), in.q, in.k, kind);
  in.params = op_utils::make_params(in.q, in.k, in.v, in.mask, kind, is_causal, scale);
  return in;
}

std::tuple<Tensor, Tensor> attention_forward_cuda(const Tensor& query, const Tensor& key,
                                                  const Tensor& value, const OptTensor& attn_mask,
                                                  bool is_causal, double scale) {
  const char* op = op_utils::kForwardOp;
  op_utils::check_forward(query, key, value, attn_mask, scale, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(query.device());
  const SdpaInputs in = prepare_sdpa(query, key, value, attn_mask, is_causal, scale);
  const Tensor& q = in.q;
  AttentionForwardParams p = in.params;
  check_served(op, p);
  const Tensor out = at::empty({p.batch, p.heads_q, p.len_q, p.head_dim_v}, q.options());
  const Tensor lse = at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(at::kFloat));
  if (no_work(p)) return {out, lse};
  if (p.len_kv == 0) {  // no visible key anywhere
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const Capability cc = check_device(op, q);
  const Tensor out_k = staged_output(out);
  op_utils::set_outputs(p, out_k, lse);
  launch_forward(op, p, cc, c10::cuda::getCurrentCUDAStream(q.get_device()).stream());
  finish_output(out, out_k);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cuda(const Tensor& grad_out,
                                                           const Tensor& query, const Tensor& key,
                                                           const Tensor& value, const Tensor& out,
                                                           const Tensor& lse,
                                                           const OptTensor& attn_mask,
                                                           bool is_causal, double scale) {
  const char* op = op_utils::kBackwardOp;
  op_utils::check_backward(grad_out, query, key, value, out, lse, attn_mask, scale, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(query.device());
  const SdpaInputs in = prepare_sdpa(query, key, value, attn_mask, is_causal, scale);
  const Tensor &q = in.q, &k = in.k, &v = in.v;
  AttentionBackwardParams bp{};
  bp.fwd = in.params;
  const AttentionForwardParams& p = bp.fwd;
  check_served(op, p);
  if (no_work(p) || p.len_kv == 0) {  // no query sees a key: every gradient is 0
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options())};
  }
  check_device(op, q);
  const auto [go, o] = same_layout(grad_out.contiguous(), out.contiguous());
  const Tensor l = base_aligned(lse.contiguous());
  const Tensor dq = at::empty(q.sizes(), q.options());
  const Tensor dk = at::empty(k.sizes(), k.options());
  const Tensor dv = at::empty(v.sizes(), v.options());
  const Tensor dq_k = staged_output(dq), dk_k = staged_output(dk), dv_k = staged_output(dv);
  op_utils::set_outputs(bp.fwd, o, l);
  op_utils::set_gradients(bp, go, dq_k, dk_k, dv_k);
  launch_backward(bp, q, c10::cuda::getCurrentCUDAStream(q.get_device()).stream());
  finish_output(dq, dq_k);
  finish_output(dk, dk_k);
  finish_output(dv, dv_k);
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------------------------
// Flash operators
// ---------------------------------------------------------------------------------------------

// The inputs in kernel layouts, the element-wise inputs base-aligned, and the prepared call
// with its index tensors and slopes pointing at device memory.
struct FlashInputs {
  Tensor q, k, v;
  OptTensor alibi, mask, cu_q, cu_k;
  op_utils::FlashCall call;
};

FlashInputs prepare_flash_cuda(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                               const op_utils::FlashOptions& o, bool forward) {
  op_utils::check_devices(op, {{"key", k}, {"value", v}}, q, c10::kCUDA);
  FlashInputs in;
  in.q = kernel_layout(q);
  in.k = kernel_layout(k);
  in.v = kernel_layout(v);
  in.alibi = base_aligned(o.alibi_slopes);
  in.mask = base_aligned(o.attn_mask);
  const op_utils::FlashOptions aligned{
      o.cu_seqlens_q, o.cu_seqlens_k, o.max_seqlen_q, o.max_seqlen_k, o.seqused_k,
      o.leftpad_k,    o.kv_batch_idx, o.block_table,  o.scale,        o.causal,
      o.window_left,  o.window_right, o.softcap,      in.alibi,       o.dropout_p,
      o.rng_state,    o.sinks,        o.num_splits,   in.mask};
  in.call = op_utils::prepare_flash(op, in.q, in.k, in.v, aligned, forward, c10::kCUDA);
  FlashFeatures& f = in.call.params.flash;
  if (in.call.varlen) {  // validated: int32 on the query's device, batch + 1 entries
    in.cu_q = base_aligned(o.cu_seqlens_q->contiguous());
    in.cu_k = base_aligned(o.cu_seqlens_k->contiguous());
    f.cu_seqlens_q = in.cu_q->data_ptr<int32_t>();
    f.cu_seqlens_k = in.cu_k->data_ptr<int32_t>();
  }
  // prepare_flash points alibi at the contiguous slopes on the query's device already. The
  // KV-cache arguments stay host pointers: sm80_unsupported declines them, and the sm90 forward
  // is only asked after it (check_served), so no kernel ever sees them.
  return in;
}

// Points p's out at `out` in the flash layouts: (B, L, H, Dv) or (T, H, Dv).
void set_flash_out(AttentionForwardParams& p, const Tensor& out, bool varlen) {
  p.out = out.data_ptr();
  p.out_stride_b = varlen ? 0 : out.stride(0);
  p.out_stride_h = out.stride(varlen ? 1 : 2);
  p.out_stride_l = out.stride(varlen ? 0 : 1);
}

// Rows (dim 0) of a varlen tensor that belong to a sequence; -1 (all) for the dense layout.
int64_t rows_used(const op_utils::FlashCall& c, const std::vector<int32_t>& cu) {
  return c.varlen ? static_cast<int64_t>(cu.back()) : -1;
}

std::tuple<Tensor, Tensor> flash_forward_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& cu_seqlens_q,
    const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const OptTensor& seqused_k, const OptTensor& leftpad_k, const OptTensor& kv_batch_idx,
    const OptTensor& block_table, double scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const OptTensor& alibi_slopes, double dropout_p,
    const OptTensor& rng_state, const OptTensor& sinks, int64_t num_splits,
    const OptTensor& attn_mask) {
  const char* op = op_utils::kFlashForwardOp;
  const op_utils::FlashOptions o{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                                 leftpad_k,    kv_batch_idx, block_table,  scale,        causal,
                                 window_left,  window_right, softcap,      alibi_slopes, dropout_p,
                                 rng_state,    sinks,        num_splits,   attn_mask};
  const c10::cuda::CUDAGuard guard(q.device());
  FlashInputs in = prepare_flash_cuda(op, q, k, v, o, true);
  op_utils::FlashCall& c = in.call;
  AttentionForwardParams& p = c.params;
  check_served(op, p);
  // Allocated, pointed at and, for varlen, the rows past the last sequence written.
  auto [out, lse] = op_utils::flash_outputs(c);
  if (no_work(p)) return {out, lse};
  if (p.len_kv == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const Capability cc = check_device(op, c.q);
  const Tensor out_k = staged_output(out);
  set_flash_out(p, out_k, c.varlen);
  launch_forward(op, p, cc, c10::cuda::getCurrentCUDAStream(c.q.get_device()).stream());
  finish_output(out, out_k, rows_used(c, c.cu_q));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_backward_cuda(
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
  op_utils::check_devices(op, {{"grad_out", grad_out}, {"out", out}, {"lse", lse}}, q, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(q.device());
  FlashInputs in = prepare_flash_cuda(op, q, k, v, o, false);
  op_utils::FlashCall& c = in.call;
  op_utils::check_flash_backward_tensors(op, c, grad_out, out, lse);
  AttentionBackwardParams bp{};
  bp.fwd = c.params;
  AttentionForwardParams& p = bp.fwd;
  check_served(op, p);
  if (no_work(p) || p.len_kv == 0) {
    return {at::zeros(c.q.sizes(), c.q.options()), at::zeros(c.k.sizes(), c.k.options()),
            at::zeros(c.v.sizes(), c.v.options())};
  }
  check_device(op, c.q);
  const auto [go, oc] = same_layout(grad_out.contiguous(), out.contiguous());
  const Tensor lc = base_aligned(lse.contiguous());
  set_flash_out(p, oc, c.varlen);
  p.lse = lc.data_ptr();
  p.lse_stride_b = c.varlen ? 0 : lc.stride(0);
  p.lse_stride_h = c.varlen ? lc.stride(0) : lc.stride(1);
  p.lse_stride_l = c.varlen ? lc.stride(1) : lc.stride(2);
  bp.grad_out = go.data_ptr();
  // The kernel writes every row of every sequence; varlen rows past the last sequence are 0.
  const Tensor dq = at::empty(c.q.sizes(), c.q.options());
  const Tensor dk = at::empty(c.k.sizes(), c.k.options());
  const Tensor dv = at::empty(c.v.sizes(), c.v.options());
  const int64_t used_q = rows_used(c, c.cu_q), used_k = rows_used(c, c.cu_k);
  if (c.varlen) {
    dq.narrow(0, used_q, dq.size(0) - used_q).zero_();
    dk.narrow(0, used_k, dk.size(0) - used_k).zero_();
    dv.narrow(0, used_k, dv.size(0) - used_k).zero_();
  }
  const Tensor dq_k = staged_output(dq), dk_k = staged_output(dk), dv_k = staged_output(dv);
  const int64_t hd = c.varlen ? 1 : 2, ld = c.varlen ? 0 : 1;
  bp.grad_q = dq_k.data_ptr();
  bp.grad_k = dk_k.data_ptr();
  bp.grad_v = dv_k.data_ptr();
  bp.dq_stride_b = c.varlen ? 0 : dq_k.stride(0);
  bp.dq_stride_h = dq_k.stride(hd);
  bp.dq_stride_l = dq_k.stride(ld);
  bp.dk_stride_b = c.varlen ? 0 : dk_k.stride(0);
  bp.dk_stride_h = dk_k.stride(hd);
  bp.dk_stride_l = dk_k.stride(ld);
  bp.dv_stride_b = c.varlen ? 0 : dv_k.stride(0);
  bp.dv_stride_h = dv_k.stride(hd);
  bp.dv_stride_l = dv_k.stride(ld);
  launch_backward(bp, c.q, c10::cuda::getCurrentCUDAStream(c.q.get_device()).stream());
  finish_output(dq, dq_k, used_q);
  finish_output(dk, dk_k, used_k);
  finish_output(dv, dv_k, used_k);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(aigc_ext, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("flash_forward", &flash_forward_cuda);
  m.impl("flash_backward", &flash_backward_cuda);
}

}  // namespace aigc_ext
