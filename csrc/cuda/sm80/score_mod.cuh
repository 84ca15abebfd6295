// The score of query i and key j as the contract orders it (docs/flash-contract.md), in log2
// units so that the softmax runs on exp2:
//   x = scale * q.k;  softcap: x = cap * tanh(x / cap);  ALiBi: x -= slope * |i + d - j|;
//   attn_mask: x += mask (bool: 0 where true, -inf where false);  keys outside the window or
//   beyond the sequence: -inf.
// Shared by the forward and both backward kernels, which recompute the same scores. Adding the
// bool mask as -inf (rather than selecting) keeps a NaN score NaN, as the CPU kernel does.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention_params.h"
#include "cuda/sm80/seq_info.cuh"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything the per-element score needs for one (batch row, query head).
template <typename Element>
struct ScoreMod {
  float scale = 1.f, scale_log2 = kLog2e;
  float softcap = 0.f, softcap_inv = 0.f;  // softcap_inv = scale / softcap
  float slope = 0.f;
  bool alibi = false;
  MaskKind mask_kind = MaskKind::kNone;
  const char* mask = nullptr;                    // element (b, h, 0, 0), in bytes
  int64_t mask_stride_l = 0, mask_stride_s = 0;  // in elements
  SeqInfo seq;

  // Whether any element needs more than scale * s (a score modification or a mask).
  __device__ __forceinline__ bool plain() const {
    return softcap <= 0.f && !alibi && mask_kind == MaskKind::kNone;
  }

  // What the scores of query row i need, computed once per row rather than per element: the
  // keys [lo, hi) it sees (none past the sequence's rows), i + diag for ALiBi and the offset of
  // its mask row. 32-bit key bounds keep the per-element test to two integer compares.
  struct Row {
    int lo = 0, hi = 0;
    int64_t i_diag = 0, mask_off = 0;
  };
  __device__ __forceinline__ Row row(int i) const {
    Row r;
    r.lo = seq.lo(i);
    r.hi = i < seq.len_q ? seq.hi(i) : 0;
    r.i_diag = static_cast<int64_t>(i) + seq.diag;
    r.mask_off = static_cast<int64_t>(i) * mask_stride_l;
    return r;
  }

  __device__ __forceinline__ float mask_value(int64_t off) const {
    switch (mask_kind) {
      case MaskKind::kBool:
        return reinterpret_cast<const uint8_t*>(mask)[off] ? 0.f : -INFINITY;
      case MaskKind::kSameAsInput:
        return static_cast<float>(reinterpret_cast<const Element*>(mask)[off]);
      case MaskKind::kFloat32:
        return reinterpret_cast<const float*>(mask)[off];
      default:
        return 0.f;
    }
  }

  // The score in log2 units of raw product s = q_i . k_j (row r = row(i), sequence key index
  // j); -inf where key j takes no part (j outside [lo(i), hi(i)) is exactly
  // !seq.visible(i, j)). *tanh_out receives tanh(scale * s / softcap) when softcap > 0 (for
  // the backward's 1 - tanh^2).
  __device__ __forceinline__ float operator()(float s, const Row& r, int j, float* tanh_out) const {
    if (j < r.lo || j >= r.hi) return -INFINITY;
    if (plain()) return s * scale_log2;
    float x;
    if (softcap > 0.f) {
      const float t = tanhf(s * softcap_inv);
      *tanh_out = t;
      x = softcap * t;
    } else {
      x = s * scale;
    }
    if (alibi) x -= slope * fabsf(static_cast<float>(r.i_diag - j));
    if (mask_kind != MaskKind::kNone) x += mask_value(r.mask_off + j * mask_stride_s);
    return x * kLog2e;
  }
};

template <typename Element>
__device__ __forceinline__ ScoreMod<Element> make_score_mod(const AttentionForwardParams& p,
                                                            const SeqInfo& seq, int b, int h) {
  ScoreMod<Element> m;
  m.seq = seq;
  m.scale = static_cast<float>(p.scale);
  m.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  if (p.flash.softcap > 0) {
    m.softcap = static_cast<float>(p.flash.softcap);
    m.softcap_inv = static_cast<float>(p.scale / p.flash.softcap);
  }
  if (p.flash.alibi != nullptr) {
    m.alibi = true;
    m.slope = p.flash.alibi[b * p.flash.alibi_stride_b + h];
  }
  m.mask_kind = p.mask != nullptr ? p.mask_kind : MaskKind::kNone;
  if (m.mask_kind != MaskKind::kNone) {
    const int64_t esize = m.mask_kind == MaskKind::kBool ? 1
                          : m.mask_kind == MaskKind::kFloat32
                              ? 4
                              : static_cast<int64_t>(sizeof(Element));
    m.mask = static_cast<const char*>(p.mask) + esize * (b * p.mask_stride_b + h * p.mask_stride_h);
    m.mask_stride_l = p.mask_stride_l;
    m.mask_stride_s = p.mask_stride_s;
  }
  return m;
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
