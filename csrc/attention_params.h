// The parameters of one attention call as the kernels of every device take them: raw pointers,
// shapes and element strides, the mask description, scale and causality.
//
// Device-neutral: no CPU or CUDA types, only c10::ScalarType, so that the CPU kernels
// (csrc/cpu/) and CUDA sources (csrc/cuda/*.cu) share it. Strided and expanded views (stride 0
// on the batch or head dimension) are served without copies; only the last dimension of every
// tensor must be contiguous, which the operator layer guarantees
// (attention_params_from_tensors.h fills these structs from tensors).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace aigc_ext {

// How the optional attention mask is stored.
enum class MaskKind : int { kNone = 0, kBool = 1, kSameAsInput = 2, kFloat32 = 3 };

struct AttentionForwardParams {
  c10::ScalarType dtype;  // of q, k, v, out
  int64_t batch, heads_q, heads_kv, len_q, len_kv, head_dim, head_dim_v;
  const void* q;
  int64_t q_stride_b, q_stride_h, q_stride_l;
  const void* k;
  int64_t k_stride_b, k_stride_h, k_stride_l;
  const void* v;
  int64_t v_stride_b, v_stride_h, v_stride_l;
  // Mask, broadcast to (batch, heads_q, len_q, len_kv) through strides (0 where broadcast).
  MaskKind mask_kind;
  const void* mask;
  int64_t mask_stride_b, mask_stride_h, mask_stride_l, mask_stride_s;
  bool is_causal;
  double scale;
  // Outputs: out (batch, heads_q, len_q, head_dim_v) contiguous; lse (batch, heads_q, len_q)
  // contiguous, in float32 (float64 for float64 inputs).
  void* out;
  void* lse;
};

struct AttentionBackwardParams {
  AttentionForwardParams fwd;  // inputs, mask, out and lse as produced by the forward
  const void* grad_out;        // (batch, heads_q, len_q, head_dim_v) contiguous
  void* grad_q;                // contiguous, shapes of q, k, v
  void* grad_k;
  void* grad_v;
};

}  // namespace aigc_ext
