// What every kernel asks of one (batch row, head) of a call, whatever its layout: where its
// query rows and keys are (dense, variable-length, KV cache, paged), which keys each query row
// sees (causal, sliding window), the score modifications (softcap, ALiBi), the dropout keep
// mask, and how a finished row is written (sinks included). The SDPA operators leave every
// feature off (AttentionForwardParams::flash default-constructed), so these reduce to the
// plain dense, top-left causal case.
//
// Part of the per-ISA CPU kernel: included by csrc/cpu/kernels.cpp only, inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE (see cpu/kernel_utils.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/kernel_utils.h"
#include "cpu/softmax_rows.h"

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {

// One sequence of the batch: rows [q_row0, q_row0 + len_q) of the query's sequence dim, keys at
// positions [k_row0, k_row0 + len_k) of batch kv_b of the key's (or pages through the block
// table); query i is aligned with key i + diag.
struct Sequence {
  int64_t b = 0, q_row0 = 0, len_q = 0, kv_b = 0, k_row0 = 0, len_k = 0, diag = 0;
  int64_t window_left = -1, window_right = -1;

  // The keys [lo, hi) that query row i (0-based in the sequence) sees; empty when hi <= lo.
  int64_t lo(int64_t i) const {
    return window_left >= 0 ? std::max<int64_t>(0, i + diag - window_left) : 0;
  }
  int64_t hi(int64_t i) const {
    return window_right >= 0 ? std::clamp<int64_t>(i + diag + window_right + 1, 0, len_k) : len_k;
  }
  // Whether some row of [i0, i1) sees some key of [j0, j1) (lo and hi grow with i).
  bool sees(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return i0 < i1 && j0 < j1 && lo(i0) < j1 && hi(i1 - 1) > j0;
  }
};

inline Sequence sequence_of(const AttentionForwardParams& p, int64_t b) {
  const FlashFeatures& f = p.flash;
  Sequence s;
  s.b = b;
  if (f.cu_seqlens_q) {
    s.q_row0 = f.cu_seqlens_q[b];
    s.len_q = f.cu_seqlens_q[b + 1] - f.cu_seqlens_q[b];
  } else {
    s.len_q = p.len_q;
  }
  if (f.cu_seqlens_k) {
    s.k_row0 = f.cu_seqlens_k[b];
    s.len_k = f.cu_seqlens_k[b + 1] - f.cu_seqlens_k[b];
  } else {
    s.kv_b = f.kv_batch_idx ? f.kv_batch_idx[b] : f.block_table ? 0 : b;
    s.k_row0 = f.leftpad_k ? f.leftpad_k[b] : 0;
    s.len_k = f.seqused_k ? f.seqused_k[b] - s.k_row0 : p.len_kv;
  }
  s.diag = f.bottom_right ? s.len_k - s.len_q : 0;
  s.window_left = f.window_left;
  s.window_right = p.is_causal ? 0 : f.window_right;
  return s;
}

// Key (or value) rows of one KV head: the address of sequence key j, and how many rows from j on
// are evenly spaced (to the end of its page; unbounded for a dense cache).
template <typename T>
struct KeyRows {
  const T* base = nullptr;  // dense: the head's row 0; paged: the head's offset in page 0
  int64_t stride_l = 0, stride_page = 0, row0 = 0, page_size = 0;
  const int32_t* pages = nullptr;  // this batch row's block table

  const T* row(int64_t j) const {
    const int64_t t = row0 + j;
    if (!pages) return base + t * stride_l;
    return base + pages[t / page_size] * stride_page + (t % page_size) * stride_l;
  }
  int64_t run(int64_t j, int64_t want) const {
    if (!pages) return want;
    return std::min(want, page_size - (row0 + j) % page_size);
  }
};

template <typename T>
inline KeyRows<T> key_rows(const AttentionForwardParams& p, const Sequence& s, const void* data,
                           int64_t stride_b, int64_t stride_h, int64_t stride_l, int64_t hk) {
  KeyRows<T> r;
  r.stride_l = stride_l;
  r.row0 = s.k_row0;
  const T* base = static_cast<const T*>(data) + hk * stride_h;
  if (p.flash.block_table) {
    r.base = base;
    r.stride_page = stride_b;
    r.page_size = p.flash.page_size;
    r.pages = p.flash.block_table + s.b * p.flash.block_table_stride;
  } else {
    r.base = base + s.kv_b * stride_b;
  }
  return r;
}

// ------------------------------------------------------------------------------------------
// Scores: softcap and ALiBi
// ------------------------------------------------------------------------------------------

// s[j] <- softcap/ALiBi-modified scale * s[j] for sequence keys n0 + j, j in [start, end), query
// row i. When tanh_out is given it receives tanh(x / softcap) (for the softcap gradient).
template <typename A>
inline void score_mods_row(A* s, int64_t start, int64_t end, A scale, const FlashFeatures& f,
                           const Sequence& sq, int64_t h, int64_t i, int64_t n0, A* tanh_out) {
  using Vec = Vectorized<A>;
  if (f.softcap > 0) {
    const A cap = static_cast<A>(f.softcap), inv = scale / cap;
    int64_t j = start;
    const Vec vinv(inv), vcap(cap);
    for (; j + Vec::size() <= end; j += Vec::size()) {
      const Vec t = vtanh(Vec::loadu(s + j) * vinv);
      if (tanh_out) t.store(tanh_out + j);
      (t * vcap).store(s + j);
    }
    for (; j < end; ++j) {
      const A t = std::tanh(s[j] * inv);
      if (tanh_out) tanh_out[j] = t;
      s[j] = t * cap;
    }
  } else {
    row_scale(s + start, end - start, scale);
  }
  if (f.alibi) {
    const A slope = static_cast<A>(f.alibi[sq.b * f.alibi_stride_b + h]);
    const int64_t a = i + sq.diag - n0;  // |a - j| is the distance of key n0 + j
    for (int64_t j = start; j < end; ++j) s[j] -= slope * static_cast<A>(std::abs(a - j));
  }
}

// Query row i's raw scores s[0, valid), of sequence keys n0 + j, made ready for the forward's
// exponential: with mods the score modifications (softcap, ALiBi; scale included) on [lo,
// valid), then the mask added unscaled; else the mask with the scale (also where scale <= 0);
// keys before lo (before the row's window) set to -inf. Returns the scale still to apply: 1
// where one of those applied it, else scale (the fused passes apply it). b, h index the mask.
template <typename T, typename A>
inline A prepare_row_scores(A* s, int64_t lo, int64_t valid, A scale, bool mods,
                            const AttentionForwardParams& p, size_t mesize, const Sequence& sq,
                            int64_t b, int64_t h, int64_t i, int64_t n0) {
  A eff_scale = scale;
  if (mods) {
    score_mods_row<A>(s, lo, valid, scale, p.flash, sq, h, i, n0, nullptr);
    if (p.mask_kind != MaskKind::kNone)  // added after the modifications, unscaled
      apply_mask_row<T, A>(s + lo, valid - lo, A(1), p, mask_ptr(p, mesize, b, h, i, n0 + lo));
    eff_scale = 1;
  } else if (p.mask_kind != MaskKind::kNone || !(scale > 0)) {
    apply_mask_row<T, A>(
        s, valid, scale, p,
        p.mask_kind == MaskKind::kNone ? nullptr : mask_ptr(p, mesize, b, h, i, n0));
    eff_scale = 1;
  }
  std::fill(s, s + lo, neg_inf<A>());  // keys before the window take no part
  return eff_scale;
}

// ------------------------------------------------------------------------------------------
// Dropout: Philox4x32-10 keep mask (docs/flash-contract.md)
// ------------------------------------------------------------------------------------------

inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * c[0];
    const uint64_t p1 = uint64_t{0xCD9E8D57u} * c[2];
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = static_cast<uint32_t>(p1);
    c[2] = n2;
    c[3] = static_cast<uint32_t>(p0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The keep mask of one row: keep[j] for sequence keys n0 + j, j in [start, end).
struct Dropout {
  uint32_t k0 = 0, k1 = 0, offset = 0, threshold = 0;
  double rescale = 1;
  explicit Dropout(const FlashFeatures& f) {
    k0 = static_cast<uint32_t>(f.seed);
    k1 = static_cast<uint32_t>(f.seed >> 32);
    offset = static_cast<uint32_t>(f.offset);
    const double t = std::floor(f.dropout_p * 16777216.0);
    threshold = static_cast<uint32_t>(std::min(t, 16777216.0));
    rescale = f.dropout_p < 1 ? 1.0 / (1.0 - f.dropout_p) : 0.0;
  }
  // Multiplies x[j] (j in [start, end)) by keep / (1 - p): zero where dropped.
  template <typename X>
  void apply(X* x, int64_t start, int64_t end, int64_t bh, int64_t i, int64_t n0) const {
    using C = std::conditional_t<std::is_same_v<X, double>, double, float>;
    const C r = static_cast<C>(rescale);
    int64_t j = start;
    while (j < end) {
      const int64_t key = n0 + j;
      uint32_t c[4] = {static_cast<uint32_t>(key >> 2), static_cast<uint32_t>(i),
                       static_cast<uint32_t>(bh), offset};
      philox4x32_10(c, k0, k1);
      for (int64_t w = key & 3; w < 4 && j < end; ++w, ++j) {
        const bool keep = (c[w] >> 8) >= threshold;
        x[j] = keep ? static_cast<X>(static_cast<C>(x[j]) * r) : X(0);
      }
    }
  }
};

// ------------------------------------------------------------------------------------------
// Finished rows
// ------------------------------------------------------------------------------------------

// Writes the output row and lse of a row with running max m, sum l and unnormalised
// accumulator acc (Ev values), counting the head's sink, if any, in the denominator.
template <typename T, typename A>
inline void finish_row(const AttentionForwardParams& p, int64_t h, A* acc, A m, A l, int64_t Ev,
                       T* out_row, A* lse_out) {
  if (p.flash.sinks) {
    const A sink = static_cast<A>(p.flash.sinks[h]);
    if (!(l > A(0)) && !std::isnan(l)) {
      std::fill(out_row, out_row + Ev, T(0));  // only the sink: its value is zero
      *lse_out = sink;
      return;
    }
    const A lse = m + std::log(l);
    const A mx = max_nan(lse, sink);
    const A total = mx + std::log(std::exp(lse - mx) + std::exp(sink - mx));
    scale_convert_row(acc, Ev, std::exp(m - total), out_row);
    *lse_out = total;
    return;
  }
  if (l > A(0) || std::isnan(l)) {  // a NaN l gives a NaN row and lse
    scale_convert_row(acc, Ev, A(1) / l, out_row);
    *lse_out = m + std::log(l);
  } else {
    std::fill(out_row, out_row + Ev, T(0));  // no key to attend to: zeros, as torch does
    *lse_out = neg_inf<A>();
  }
}

template <typename T>
inline T* out_row(const AttentionForwardParams& p, const Sequence& s, int64_t h, int64_t i) {
  return static_cast<T*>(p.out) + s.b * p.out_stride_b + h * p.out_stride_h +
         (s.q_row0 + i) * p.out_stride_l;
}

template <typename A>
inline A* lse_at(const AttentionForwardParams& p, const Sequence& s, int64_t h, int64_t i) {
  return static_cast<A*>(p.lse) + s.b * p.lse_stride_b + h * p.lse_stride_h +
         (s.q_row0 + i) * p.lse_stride_l;
}

}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
