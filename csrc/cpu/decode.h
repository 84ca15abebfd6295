// The forward for short queries (decoding with a KV cache): split-KV over the keys, partial
// online-softmax states merged through their logsumexps. forward.h hands it calls with
// L <= kDecodeMaxLen.
//
// Part of the per-ISA CPU kernel: included by csrc/cpu/kernels.cpp only, inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE (see cpu/kernel_utils.h).
#pragma once

#include <cmath>

#include "cpu/gemm.h"
#include "cpu/kernel_utils.h"
#include "cpu/sequence.h"
#include "cpu/softmax_rows.h"

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {

// ------------------------------------------------------------------------------------------
// Forward for short queries (decoding with a KV cache): split-KV
// ------------------------------------------------------------------------------------------
//
// With L <= kDecodeMaxLen the query tiles are too short to amortise packing K and V, and
// batch x heads may be smaller than the number of cores. So: one task per (batch, KV head,
// key split). A task takes every query row of the GQA group at once (group * L rows), so each
// key and value is read once per group, streams its keys in blocks (converted to fp32 when
// needed), keeps a partial online-softmax state (m, l, acc) per row, and the partial states
// of the splits are merged at the end through their logsumexps. Where the cache's key rows
// hold every KV head side by side, a thread runs the tasks of all KV heads of a (batch, key
// split) together, block by block (see decode_impl).

#if defined(CPU_CAPABILITY_AVX512)
// Lane j of the result is the sum of the 16 lanes of v[j]: a transpose-and-add tree, 45
// shuffles and adds for 16 sums instead of a separate horizontal reduction per vector.
inline __m512 sum16_avx512(const __m512* v) {
  __m512 w[8], y[4];
  for (int k = 0; k < 8; ++k) {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for a = v[2k], b = v[2k+1].
    w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                         _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  }
  for (int k = 0; k < 4; ++k) {
    // Per 128-bit lane: that lane's partial sums of v[4k], ..., v[4k+3].
    y[k] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Add the four 128-bit lanes: first in pairs, then the pairs.
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The 16 fp32 lanes whose sum is dot(a, b) for rows of length n: fp32 by FMAs, bf16 by
// vdpbf16ps (pairs multiplied and accumulated in fp32).
inline __m512 dot_row(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 mk = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - c)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + c), _mm512_maskz_loadu_ps(mk, b + c), acc);
  }
  return acc;
}
__attribute__((target("avx512bf16"))) inline __m512 dot_row(const c10::BFloat16* a,
                                                            const c10::BFloat16* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + c),
                           (__m512bh)_mm512_loadu_si512(b + c));
  }
  if (c < n) {
    const __mmask32 tail = static_cast<__mmask32>((1ull << (n - c)) - 1);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(tail, a + c),
                           (__m512bh)_mm512_maskz_loadu_epi16(tail, b + c));
  }
  return acc;
}

// s[g * lds + j] = dot(q_g, k_j) for fp32 rows, or bf16 rows straight from bf16 (no conversion
// pass over the keys). Keys go 16 at a time, their 16 dot products summed together by
// sum16_avx512. Marked avx512bf16 for the bf16 dot product; the fp32 instantiation contains no
// bf16 instruction.
template <typename T>
__attribute__((target("avx512bf16"))) void qk_dot(const T* q, int64_t G, int64_t E, const T* k,
                                                  int64_t ldk, int64_t nb, float* s, int64_t lds) {
  int64_t j0 = 0;
  for (; j0 + 16 <= nb; j0 += 16) {
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc[16];
      for (int u = 0; u < 16; ++u) acc[u] = dot_row(q + g * E, k + (j0 + u) * ldk, E);
      _mm512_storeu_ps(s + g * lds + j0, sum16_avx512(acc));
    }
  }
  for (int64_t j = j0; j < nb; ++j) {
    for (int64_t g = 0; g < G; ++g)
      s[g * lds + j] = _mm512_reduce_add_ps(dot_row(q + g * E, k + j * ldk, E));
  }
}
#endif

constexpr int64_t kDecodeMaxLen = 16;
constexpr int64_t kDecodeMaxRows = 128;  // group * L
constexpr int64_t kDecodeBlock = 512;    // keys per block
// Score rows a block wide plus room for a product's columns rounded up to 16 past the block.
constexpr int64_t kDecodeLds = kDecodeBlock + 16;
constexpr int64_t kDecodeDotRows = 8;     // bf16 scores by dot products up to this many rows
constexpr int64_t kDecodePanelKeys = 64;  // keys packed at a time for the fp32 micro-kernels

// Paged caches: the rows of the next page prefetched while a page is read (at most this many;
// the hardware prefetchers follow the stride from there).
constexpr int64_t kDecodePrefetchRows = 16;
constexpr int kAheadK = 1, kAheadV = 2;  // which rows a step reads: keys, values, or both

template <typename T>
inline void prefetch_rows(const KeyRows<T>& rows, int64_t j, int64_t n, int64_t width) {
  const int64_t bytes = width * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < n; ++r) {
    const char* row = reinterpret_cast<const char*>(rows.row(j + r));
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// acc[g * Ev + e] += sum_j s[g * lds + j] * v[j * ldv + e] for kG <= 4 rows of probabilities
// and fp32 or bf16 values (widened on the fly). Each 64-column chunk of the rows' accumulators
// stays in registers across all keys (4 kG of them, kG broadcasts and one value vector), and
// bf16 values need no fp32 copy written and read back: a decoding step is bound by memory
// traffic.
template <typename T, int kG>
void pv_rows_of(const float* s, int64_t lds, const T* v, int64_t ldv, int64_t nb, float* acc,
                int64_t Ev) {
  for (int64_t c0 = 0; c0 < Ev; c0 += 64) {
    __mmask16 mk[4];
    for (int u = 0; u < 4; ++u) {
      const int64_t left = std::clamp<int64_t>(Ev - c0 - 16 * u, 0, 16);
      mk[u] = static_cast<__mmask16>((1u << left) - 1);
    }
    __m512 a[kG][4];
    for (int g = 0; g < kG; ++g)
      for (int u = 0; u < 4; ++u)
        a[g][u] = _mm512_maskz_loadu_ps(mk[u], acc + g * Ev + c0 + 16 * u);
    for (int64_t j = 0; j < nb; ++j) {
      const T* vj = v + j * ldv + c0;
      __m512 pr[kG];
      for (int g = 0; g < kG; ++g) pr[g] = _mm512_set1_ps(s[g * lds + j]);
      for (int u = 0; u < 4; ++u) {
        if (!mk[u]) break;
        const __m512 x = load16_f32(vj + 16 * u, mk[u]);
        for (int g = 0; g < kG; ++g) a[g][u] = _mm512_fmadd_ps(pr[g], x, a[g][u]);
      }
    }
    for (int g = 0; g < kG; ++g)
      for (int u = 0; u < 4; ++u) _mm512_mask_storeu_ps(acc + g * Ev + c0 + 16 * u, mk[u], a[g][u]);
  }
}

// pv_rows_of for G in 1..kPvRowsMax rows.
constexpr int64_t kPvRowsMax = 4;
template <typename T>
void pv_rows(const float* s, int64_t lds, int64_t G, const T* v, int64_t ldv, int64_t nb,
             float* acc, int64_t Ev) {
  switch (G) {
    case 1:
      return pv_rows_of<T, 1>(s, lds, v, ldv, nb, acc, Ev);
    case 2:
      return pv_rows_of<T, 2>(s, lds, v, ldv, nb, acc, Ev);
    case 3:
      return pv_rows_of<T, 3>(s, lds, v, ldv, nb, acc, Ev);
    default:
      return pv_rows_of<T, 4>(s, lds, v, ldv, nb, acc, Ev);
  }
}

#endif

template <typename T>
void decode_impl(const AttentionForwardParams& p) {
  using A = acc_type<T>;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, L = p.len_q, S = p.len_kv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v, group = Hq / Hkv, G = group * L;
  const size_t mesize = mask_elem_size(p, sizeof(T));
  const A scale = static_cast<A>(p.scale);
  const FlashFeatures& f = p.flash;
  const bool mods = f.any_score_mod();
  const Dropout drop(f);
  const int64_t nthreads = at::get_num_threads();
  // Splits cut the keys some row of a batch row sees (a window bounds them) into equal parts.
  int64_t span = 0;
  for (int64_t b = 0; b < B; ++b) {
    const Sequence sq = sequence_of(p, b);
    if (sq.len_q > 0) span = std::max(span, sq.hi(sq.len_q - 1) - sq.lo(0));
  }
  const int64_t nblocks = std::max<int64_t>(1, ceil_div(std::min(span, S), kDecodeBlock));
  // Caches whose key rows hold every KV head side by side ((B, S, H, D), and the pages of a
  // paged cache): one head's slice of each row is a few hundred bytes out of every few KiB.
  // Read head by head, over the whole cache each time, every slice costs a TLB miss and the
  // prefetchers follow nothing. There a task takes every KV head of a batch row and split, and
  // each block of keys (kDecodeBlock) goes to every head in turn while its rows' pages are in
  // the TLB and its lines nearby in the caches: on an AMD Zen 4 a bf16 step (B = 8, 32 query and
  // 8 KV heads, 8192 keys, D = 128) went from 41.4 to 32.0 ms, an fp32 one from 57.2 to 47.4.
  const bool interleaved = Hkv > 1 && p.k_stride_h < p.k_stride_l && p.v_stride_h < p.v_stride_l;
  const int64_t heads_per_task = interleaved ? Hkv : 1;
  int64_t splits =
      f.num_splits > 0
          ? std::min(nblocks, f.num_splits)
          : std::min(nblocks,
                     std::max<int64_t>(1, ceil_div(4 * nthreads, B * Hkv / heads_per_task)));
  const int64_t blocks_per_split = ceil_div(nblocks, splits);
  splits = ceil_div(nblocks, blocks_per_split);
  const int64_t ntasks = B * Hkv * splits;
  const int64_t nunits = ntasks / heads_per_task;  // what a thread takes at a time
  // Partial states: (B, Hkv, splits, G) rows of m, l and acc (Ev).
  std::vector<A> part_m(ntasks * G), part_l(ntasks * G), part_acc(ntasks * G * Ev);
  // A few rows: P V straight from the values (pv_rows).
  bool fused_pv = false;
#if defined(CPU_CAPABILITY_AVX512)
  // bf16 up to kPvRowsMax rows (its scores are dot products or a BLAS product either way);
  // fp32 only up to two, since more rows take the micro-kernel scores below.
  fused_pv =
      std::is_same_v<T, c10::BFloat16> ? G <= kPvRowsMax : std::is_same_v<T, float> && G <= 2;
#endif
  // fp32 scores of more rows on the micro-kernels, as the backward recomputes them: the same
  // products in the same order give the same scores, so the backward's probabilities stay
  // normalised by this logsumexp (BLAS calls of other shapes round differently).
  bool micro_scores = false;
#if AIGC_EXT_MICROKERNEL
  micro_scores = std::is_same_v<T, float> && !fused_pv && use_microkernel();
#endif

  // Merges the splits of rows [begin, end) of (B, Hkv, G) into the output:
  // out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s.
  const auto merge_rows = [&](int64_t begin, int64_t end) {
    A* row = thread_buffer<A, 25>(Ev);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bhk = r / G, g = r % G;
      const int64_t b = bhk / Hkv, hk = bhk % Hkv, h = hk * group + g / L, i = g % L;
      const Sequence sq = sequence_of(p, b);
      if (i >= sq.len_q) continue;
      A mx = neg_inf<A>();
      for (int64_t sp = 0; sp < splits; ++sp) mx = max_nan(mx, part_m[(bhk * splits + sp) * G + g]);
      std::fill(row, row + Ev, A(0));
      A total = 0;
      if (mx != neg_inf<A>()) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t t = bhk * splits + sp;
          const A ms = part_m[t * G + g];
          if (ms == neg_inf<A>()) continue;
          const A w = std::exp(ms - mx);
          total += w * part_l[t * G + g];
          const A* a = part_acc.data() + (t * G + g) * Ev;
          for (int64_t e = 0; e < Ev; ++e) row[e] += w * a[e];
        }
      }
      finish_row<T, A>(p, h, row, mx, total, Ev, out_row<T>(p, sq, h, i), lse_at<A>(p, sq, h, i));
    }
  };

  parallel_tasks(nunits, [&](std::atomic<int64_t>& next) {
    A* qf_all = thread_buffer<A, 20>(heads_per_task * G * E);
    A* sbuf = thread_buffer<A, 21>(G * kDecodeLds);
    A* kf = thread_buffer<A, 22>(kReduced<T> ? kDecodeBlock * E : 0);
    T* qb_all = thread_buffer<T, 24>(heads_per_task * G * E);
    A* vf = thread_buffer<A, 23>(kReduced<T> && !fused_pv ? kDecodeBlock * Ev : 0);
#if AIGC_EXT_MICROKERNEL
    // fp32 keys packed for the micro-kernels (see below).
    float* kpanel = thread_buffer<float, 26>(
        micro_scores ? std::max<int64_t>(mk::panels_size(E, kDecodePanelKeys), 1) : 0);
    // fp32 values of a small page of a paged cache, packed for the micro-kernels (P V of more rows
    // than pv_rows takes). The product writes whole 16-column panels: Ev must fill them, or a
    // row's columns past Ev would land on the next row's accumulator.
    const bool micro_pv = micro_scores && p.flash.block_table != nullptr && Ev % mk::kNR == 0;
    float* vpanel = thread_buffer<float, 27>(
        micro_pv ? std::max<int64_t>(mk::panels_size(kDecodePanelKeys, Ev), 1) : 0);
#endif
    // Task t = (b, hk, sp): its keys [s0, s1), rows and partial state.
    struct Task {
      int64_t t = 0, b = 0, hk = 0, s0 = 0, s1 = 0;
      Sequence sq;
      KeyRows<T> kr, vr;
      A *m = nullptr, *l = nullptr, *acc = nullptr, *qf = nullptr;
      T* qb = nullptr;
    };
    // Starts task t with its query rows in qf / qb: false when its batch row has no queries.
    const auto start_task = [&](int64_t t, A* qf, T* qb, Task& task) -> bool {
      const int64_t sp = t % splits, bhk = t / splits;
      const int64_t b = bhk / Hkv, hk = bhk % Hkv;
      const Sequence sq = sequence_of(p, b);
      A* m = part_m.data() + t * G;
      A* l = part_l.data() + t * G;
      A* acc = part_acc.data() + t * G * Ev;
      std::fill(m, m + G, neg_inf<A>());
      std::fill(l, l + G, A(0));
      std::fill(acc, acc + G * Ev, A(0));
      // Row g is query row i = g % L of head h = hk * group + g / L; rows past the sequence's
      // own length (variable-length batches) stay empty.
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * group + g / L,
                      i = std::min(g % L, std::max<int64_t>(sq.len_q - 1, 0));
        const T* qrow = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
                        (sq.q_row0 + i) * p.q_stride_l;
        if (sq.len_q == 0) {
          std::fill(qf + g * E, qf + g * E + E, A(0));
          std::fill(qb + g * E, qb + g * E + E, T(0));
          continue;
        }
        convert_row(qrow, qf + g * E, E);
        std::memcpy(qb + g * E, qrow, sizeof(T) * E);
      }
      if (sq.len_q == 0) return false;  // (nothing to write: merge_rows skips such rows)
      const int64_t kv_lo = sq.lo(0), kv_hi = sq.hi(sq.len_q - 1);
      task.t = t;
      task.b = b;
      task.hk = hk;
      task.s0 = kv_lo + sp * blocks_per_split * kDecodeBlock;
      task.s1 = std::min(kv_hi, task.s0 + blocks_per_split * kDecodeBlock);
      task.sq = sq;
      task.kr = key_rows<T>(p, sq, p.k, p.k_stride_b, p.k_stride_h, p.k_stride_l, hk);
      task.vr = key_rows<T>(p, sq, p.v, p.v_stride_b, p.v_stride_h, p.v_stride_l, hk);
      task.m = m;
      task.l = l;
      task.acc = acc;
      task.qf = qf;
      task.qb = qb;
      return true;
    };
    // Keys [n0, n0 + nb) of a task: scores, online softmax, P V into its partial state.
    const auto run_block = [&](const Task& task, int64_t n0, int64_t nb) {
      const int64_t b = task.b, hk = task.hk;
      const Sequence& sq = task.sq;
      const KeyRows<T>& kr = task.kr;
      const KeyRows<T>& vr = task.vr;
      A* m = task.m;
      A* l = task.l;
      A* acc = task.acc;
      const A* qf = task.qf;
      const T* qb = task.qb;
      // The pieces of keys [n0, n0 + nb) that lie in one page of a paged cache (the whole range
      // for a dense one): fn(j0, w, k rows, v rows) for keys n0 + j0 .. n0 + j0 + w - 1. A block
      // spans pages, so that small pages (16 keys) do not make small blocks: each page is read
      // in place, and only the memory-touching steps go page by page.
      // ahead (kAheadK, kAheadV): the rows to prefetch from the next page meanwhile. Pages lie
      // anywhere in the pool, and the hardware's stride prefetchers stop at each jump.
      const auto for_pages = [&](int64_t n0, int64_t nb, int ahead, const auto& fn) {
        for (int64_t j0 = 0, w = 0; j0 < nb; j0 += w) {
          w = vr.run(n0 + j0, kr.run(n0 + j0, nb - j0));
          if (ahead != 0 && kr.pages != nullptr && j0 + w < nb) {
            const int64_t j1 = n0 + j0 + w;
            const int64_t rows = std::min(kDecodePrefetchRows, vr.run(j1, kr.run(j1, nb - j0 - w)));
            if (ahead & kAheadK) prefetch_rows(kr, j1, rows, E);
            if (ahead & kAheadV) prefetch_rows(vr, j1, rows, Ev);
          }
          fn(j0, w, kr.row(n0 + j0), vr.row(n0 + j0));
        }
      };
      const bool one_page = kr.run(n0, nb) == nb && vr.run(n0, nb) == nb;
      const A* kb = nullptr;
      const A* vb = nullptr;
      int64_t ldk = 0, ldv = 0;
      bool scores_done = false;
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        // Dot products pay a horizontal sum each: worth it for a few rows only; more rows
        // amortise converting the keys for a GEMM.
        if (G <= kDecodeDotRows && cpu_has_avx512_bf16()) {
          for_pages(n0, nb, kAheadK, [&](int64_t j0, int64_t w, const T* kp, const T*) {
            qk_dot(qb, G, E, kp, p.k_stride_l, w, sbuf + j0, kDecodeLds);
          });
          scores_done = true;
        }
      }
      if constexpr (std::is_same_v<T, float>) {
        if (fused_pv) {
          for_pages(n0, nb, kAheadK, [&](int64_t j0, int64_t w, const T* kp, const T*) {
            qk_dot(qf, G, E, kp, p.k_stride_l, w, sbuf + j0, kDecodeLds);
          });
          scores_done = true;
        }
      }
#endif
      if constexpr (kReduced<T>) {
        // Widened: the keys unless their scores are done, the values unless pv_rows reads them.
        const int widen = (scores_done ? 0 : kAheadK) | (fused_pv ? 0 : kAheadV);
        if (widen != 0)
          for_pages(n0, nb, widen, [&](int64_t j0, int64_t w, const T* kp, const T* vp) {
            for (int64_t j = 0; j < w; ++j) {
              if (widen & kAheadK) convert_row(kp + j * p.k_stride_l, kf + (j0 + j) * E, E);
              if (widen & kAheadV) convert_row(vp + j * p.v_stride_l, vf + (j0 + j) * Ev, Ev);
            }
          });
        kb = kf;
        vb = vf;
        ldk = E;
        ldv = Ev;
      } else if (one_page) {
        kb = kr.row(n0);
        vb = vr.row(n0);
        ldk = p.k_stride_l;
        ldv = p.v_stride_l;
      }
#if AIGC_EXT_MICROKERNEL
      if constexpr (std::is_same_v<T, float>) {
        if (micro_scores) {
          // 64 keys at a time: their panels stay in L1 between packing and the product. Pages
          // that start on a panel (16 keys) are packed side by side into one product; others
          // take a product each (whose columns past the page, up to the next 16, land on keys
          // computed next or on the row's padding).
          for (int64_t w0 = 0; w0 < nb; w0 += kDecodePanelKeys) {
            const int64_t ww = std::min(kDecodePanelKeys, nb - w0);
            bool aligned = true;
            for_pages(n0 + w0, ww, 0, [&](int64_t j0, int64_t, const T*, const T*) {
              aligned = aligned && j0 % mk::kNR == 0;
            });
            for_pages(n0 + w0, ww, kAheadK, [&](int64_t j0, int64_t w, const T* kp, const T*) {
              if (aligned) {
                mk::pack_panels(/*trans=*/true, E, w, kp, p.k_stride_l, kpanel + j0 * E);
              } else {
                mk::pack_panels(/*trans=*/true, E, w, kp, p.k_stride_l, kpanel);
                mk::gemm(G, w, E, false, qf, E, kpanel, E * mk::kNR, sbuf + w0 + j0, kDecodeLds,
                         false);
              }
            });
            if (aligned)
              mk::gemm(G, ww, E, false, qf, E, kpanel, E * mk::kNR, sbuf + w0, kDecodeLds, false);
          }
          scores_done = true;
        }
      }
#endif
      if (!scores_done) {
        if (kb != nullptr) {
          blas_gemm<A>(false, true, G, nb, E, qf, E, kb, ldk, A(0), sbuf, kDecodeLds);
        } else if constexpr (!kReduced<T>) {  // (reduced types always have kb: kf)
          for_pages(n0, nb, kAheadK, [&](int64_t j0, int64_t w, const T* kp, const T*) {
            blas_gemm<A>(false, true, G, w, E, qf, E, kp, p.k_stride_l, A(0), sbuf + j0,
                         kDecodeLds);
          });
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * group + g / L, i = g % L;
        A* s = sbuf + g * kDecodeLds;
        if (i >= sq.len_q) {
          std::fill(s, s + nb, A(0));
          continue;
        }
        const int64_t lo = std::clamp<int64_t>(sq.lo(i) - n0, 0, nb);
        const int64_t valid = std::clamp<int64_t>(sq.hi(i) - n0, lo, nb);
        const A eff_scale =
            prepare_row_scores<T, A>(s, lo, valid, scale, mods, p, mesize, sq, b, h, i, n0);
        if (valid > lo && online_softmax_block(s, valid, eff_scale, m[g], l[g], acc + g * Ev, Ev)) {
          if (f.dropout_p > 0) drop.apply(s, lo, valid, b * Hq + h, i, n0);
          std::fill(s, s + lo, A(0));
          std::fill(s + valid, s + nb, A(0));
        } else {
          std::fill(s, s + nb, A(0));  // nothing visible: P = 0, state unchanged
        }
      }
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>) {
        if (fused_pv) {
          for_pages(n0, nb, kAheadV, [&](int64_t j0, int64_t w, const T*, const T* vp) {
            pv_rows(sbuf + j0, kDecodeLds, G, vp, p.v_stride_l, w, acc, Ev);
          });
          return;
        }
      }
#endif
      if (vb != nullptr) {
        blas_gemm<A>(false, false, G, Ev, nb, sbuf, kDecodeLds, vb, ldv, A(1), acc, Ev);
      } else if constexpr (!kReduced<T>) {  // (reduced types always have vb: vf)
        for_pages(n0, nb, kAheadV, [&](int64_t j0, int64_t w, const T*, const T* vp) {
#if AIGC_EXT_MICROKERNEL
          // A small page's values packed for the micro-kernel (in L1): a BLAS call would cost
          // more than its product. Larger pages stay with BLAS, which reads them in place.
          if constexpr (std::is_same_v<T, float>) {
            if (micro_pv && w <= kDecodePanelKeys) {
              mk::pack_panels(/*trans=*/false, w, Ev, vp, p.v_stride_l, vpanel);
              mk::gemm(G, Ev, w, false, sbuf + j0, kDecodeLds, vpanel, w * mk::kNR, acc, Ev,
                       /*add=*/true);
              return;
            }
          }
#endif
          blas_gemm<A>(false, false, G, Ev, w, sbuf + j0, kDecodeLds, vp, p.v_stride_l, A(1), acc,
                       Ev);
        });
      }
    };
    std::vector<Task> tasks(heads_per_task);
    for (int64_t u = next++; u < nunits; u = next++) {
      // u = (b, sp) with every head of the batch row (interleaved), or u = t.
      const int64_t b_u = interleaved ? u / splits : 0, sp_u = interleaved ? u % splits : 0;
      int64_t started = 0;
      for (int64_t j = 0; j < heads_per_task; ++j) {
        const int64_t t = interleaved ? (b_u * Hkv + j) * splits + sp_u : u;
        if (start_task(t, qf_all + j * G * E, qb_all + j * G * E, tasks[started])) ++started;
      }
      if (started == 0) continue;
      // Every task of u has the same keys (they depend on the batch row and split only).
      const int64_t s0 = tasks[0].s0, s1 = tasks[0].s1;
      for (int64_t n0 = s0, nb = 0; n0 < s1; n0 += nb) {
        nb = std::min(kDecodeBlock, s1 - n0);
        for (int64_t j = 0; j < started; ++j) run_block(tasks[j], n0, nb);
      }
      // A single split needs no merging pass: finish its rows here.
      if (splits == 1)
        for (int64_t j = 0; j < started; ++j) {
          const int64_t bhk = tasks[j].t / splits;
          merge_rows(bhk * G, bhk * G + G);
        }
    }
  });

  if (splits > 1) {
    at::parallel_for(0, B * Hkv * G, 16, merge_rows);
  }
}

}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
