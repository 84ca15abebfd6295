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

// The FlashAttention features of the flash_forward/flash_backward operators
// (docs/flash-contract.md). Default-constructed, every feature is off: the SDPA operators leave
// it so. The int32 tensors have been validated by the operator layer (values included), so the
// kernels index with them without further checks.
struct FlashFeatures {
  // Variable-length batches: sequence b is rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) of the
  // packed query (and likewise for keys); len_q/len_kv of the params are then the maxima.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  // KV cache: positions [leftpad_k[b], seqused_k[b]) of cache row kv_batch_idx[b] take part.
  const int32_t* seqused_k = nullptr;
  const int32_t* leftpad_k = nullptr;
  const int32_t* kv_batch_idx = nullptr;
  // Paged cache: position t of batch b is row t % page_size of page block_table[b][t / page_size]
  // (k/v batch strides are then page strides).
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int64_t page_size = 0;
  // Key j takes part for query i iff i + d - window_left <= j <= i + d + window_right (-1: no
  // bound), d = len_k - len_q of the sequence when bottom_right, else 0.
  bool bottom_right = false;
  int64_t window_left = -1, window_right = -1;
  double softcap = 0;            // > 0: x = softcap * tanh(x / softcap)
  const float* alibi = nullptr;  // slopes, (Hq,) or (B, Hq): x -= slope * |i + d - j|
  int64_t alibi_stride_b = 0;
  double dropout_p = 0;  // counter-based (Philox4x32-10) keep mask
  uint64_t seed = 0, offset = 0;
  const float* sinks = nullptr;  // (Hq,): a virtual key of score sinks[h] and value 0
  int64_t num_splits = 0;        // split-KV decode: 0 = chosen by the kernel
  bool any_score_mod() const { return softcap > 0 || alibi != nullptr; }
};

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
  // Outputs: out (batch, heads_q, len_q, head_dim_v) and lse (batch, heads_q, len_q), in
  // float32 (float64 for float64 inputs), at these element strides (contiguous for the SDPA
  // operators; for variable-length batches the batch strides are 0 and rows are offset by
  // cu_seqlens_q).
  void* out;
  void* lse;
  int64_t out_stride_b, out_stride_h, out_stride_l;
  int64_t lse_stride_b, lse_stride_h, lse_stride_l;
  FlashFeatures flash;
};

struct AttentionBackwardParams {
  AttentionForwardParams fwd;  // inputs, mask, out and lse as produced by the forward
  const void* grad_out;        // (batch, heads_q, len_q, head_dim_v), at out's strides
  void* grad_q;                // shapes of q, k, v, at these strides
  void* grad_k;
  void* grad_v;
  int64_t dq_stride_b, dq_stride_h, dq_stride_l;
  int64_t dk_stride_b, dk_stride_h, dk_stride_l;
  int64_t dv_stride_b, dv_stride_h, dv_stride_l;
};

}  // namespace aigc_ext
