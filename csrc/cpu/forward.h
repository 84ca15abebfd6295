// The tiled forward: FlashAttention-2 style tiling with an online softmax.
//
// Per task = (batch, query head, chunk of query rows):
//   for each key/value block (BK keys):      pack K^T and V once, reused by every query block
//     for each query block (BQ rows):        S = Q K^T          (GEMM, fp32 accumulate)
//                                            online softmax     (running max m, running sum l)
//                                            acc = acc*alpha + P V   (GEMM)
//   out = acc / l,  lse = m + log(l)
// Nothing of size L x S is ever stored; the working set per thread is one BQ x BK score tile
// plus the chunk's accumulator. Short queries go to decode.h instead.
//
// Part of the per-ISA CPU kernel: included by csrc/cpu/kernels.cpp only, inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE (see cpu/kernel_utils.h).
#pragma once

#include <cmath>

#include "cpu/amx.h"
#include "cpu/decode.h"
#include "cpu/gemm.h"
#include "cpu/kernel_utils.h"
#include "cpu/sequence.h"
#include "cpu/softmax_rows.h"

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

constexpr int64_t kFwdBlockQ = 128;
// With AMX the GEMMs are fast enough that the score tile's trip through the cache matters:
// 64 rows (a 64 x 512 fp32 score tile) measured best here.
constexpr int64_t kFwdBlockQAmx = 64;
constexpr int64_t kFwdBlockKV = 512;
// fp32 on the micro-kernels (or the JIT brgemm): the GEMMs run near the FMA peak and
// the score tile's trips through the cache dominate the rest, so 128 x 128 tiles (64 KiB of
// scores; with 128 keys of K and V packed in fp32, 192 KiB in all for E = 128) measured best.
constexpr int64_t kFwdBlockKVF32 = 128;
// On the AVX-512 micro-kernels (6 x 64 tiles) wider key blocks pay: 64 query rows and key blocks
// of up to 512 keys whose packed K and V take at most 512 KiB (512 keys up to E = 128, 256 at
// E = 256) measured 5-10% faster than 128 x 128 on a Sapphire Rapids core (2 MiB of L2; 256-key
// blocks at E = 128 were 1-4% slower than 512). The AVX2 build keeps 128 x 128 (measured on Zen
// 3: 512 KiB of L2).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kFwdWideMicroBlocks = true;
#else
constexpr bool kFwdWideMicroBlocks = false;
#endif
constexpr int64_t kFwdBlockQWide = 64;
constexpr int64_t kFwdPackedKVBytes = 512 * 1024;
constexpr int64_t kFwdMaxChunkRows = 4096;
// With a window, a block of query rows computes the keys of its first row's window start to its
// last row's end: about BQ / 2 wasted keys a row at either edge. 48 rows (eight 6-row tiles of
// the AVX2 micro-kernel) keep that under 7% of a 1024-key window on the paths that compute the
// block whole; the micro-kernels narrow it to each 6-row tile (row_band.h), where 48 rows
// measured as fast as 64 and 96 (AVX-512 and AVX2, window 1024 at 16384).
constexpr int64_t kFwdBlockQWindow = 48;
constexpr float kLazyMax = 8.f;

template <typename T>
void forward_impl(const AttentionForwardParams& p, const KernelOptions& opt) {
  using A = acc_type<T>;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, L = p.len_q, S = p.len_kv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v, group = Hkv > 0 ? Hq / Hkv : 1;
  if (B == 0 || Hq == 0 || L == 0) return;
  if (S == 0) {  // no keys anywhere: zeros (or the sink alone)
    for (int64_t b = 0; b < B; ++b) {
      const Sequence sq = sequence_of(p, b);
      for (int64_t h = 0; h < Hq; ++h) {
        for (int64_t i = 0; i < sq.len_q; ++i) {
          finish_row<T, A>(p, h, nullptr, neg_inf<A>(), A(0), Ev, out_row<T>(p, sq, h, i),
                           lse_at<A>(p, sq, h, i));
        }
      }
    }
    return;
  }
  if (L <= kDecodeMaxLen && group * L <= kDecodeMaxRows) return decode_impl<T>(p);
  // bf16/fp16 products on VNNI-packed operands (torch's brgemm or vdpbf16ps), where available.
  const VnniEngine vnni = vnni_engine<T>(opt);
  const bool brgemm = vnni != VnniEngine::kNone;
  const bool f32_brgemm = std::is_same_v<T, float> && use_f32_brgemm();
  bool amx = false;
#if AIGC_EXT_AMX
  amx = std::is_same_v<T, c10::BFloat16> && opt.use_amx && cpu_has_amx_bf16();
#endif
  // The build's own micro-kernels (gemm.h; AVX2 and AVX-512): they take fp32 probabilities for
  // bf16/fp16 too, which saves rounding P to T and widening it back.
  const bool micro = !std::is_same_v<T, double> && !brgemm && !amx && use_microkernel();
  const bool p32 = kReduced<T> && micro;
  const bool wide = kFwdWideMicroBlocks && micro && !f32_brgemm;
  const int64_t bk_wide = std::clamp<int64_t>(
      kFwdPackedKVBytes / (8 * std::max<int64_t>({E, Ev, 1})) / 64 * 64, 128, 512);
  // The AMX path computes whole 16-row tiles: blocks of query rows are multiples of 16.
  const int64_t BQ =
      round_up(env_int("AIGC_EXT_CPU_BLOCK_Q", amx                        ? kFwdBlockQAmx
                                               : p.flash.window_left >= 0 ? kFwdBlockQWindow
                                               : wide                     ? kFwdBlockQWide
                                                                          : kFwdBlockQ),
               amx ? 16 : 1);
  // Key blocks are multiples of 32 so that padded probability rows (to k_align) stay in a row.
  // Windows keep these blocks: the products of a block start at its first row's window (to a
  // multiple of 32 keys) and end at its last row's, so wide key blocks add no waste at the
  // window's edges (512 keys measured 5% faster than 128 in fp32 and 12% in bf16 on AMX, window
  // 1024).
  const int64_t bk_default = wide ? bk_wide : f32_brgemm || micro ? kFwdBlockKVF32 : kFwdBlockKV;
  const int64_t BK =
      round_up(std::min(env_int("AIGC_EXT_CPU_BLOCK_KV", bk_default), round_up(S, kPackN)), 32);
  const int64_t ev_pad = round_up(Ev, kPackN);
  const int64_t k_align = amx ? 32 : brgemm ? 2 : 1;
  const int64_t e_even = round_up(E, k_align);
  const size_t mesize = mask_elem_size(p, sizeof(T));

  const int64_t nthreads = at::get_num_threads();
  const int64_t nqb = ceil_div(L, BQ);
  // About 8 tasks per thread: enough that a core slowed down by another tenant (or a causal
  // chunk that is all diagonal) leaves little idle time at the end; each extra chunk of a head
  // packs that head's K and V once more.
  int64_t chunks = std::min(nqb, std::max<int64_t>(1, ceil_div(8 * nthreads, B * Hq)));
  chunks = std::max(chunks, ceil_div(L, kFwdMaxChunkRows));
  const int64_t blocks_per_chunk = ceil_div(nqb, chunks);
  chunks = ceil_div(nqb, blocks_per_chunk);
  const int64_t chunk_rows = blocks_per_chunk * BQ;
  const int64_t ntasks = B * Hq * chunks;
  const A scale = static_cast<A>(p.scale);

  const FlashFeatures& f = p.flash;
  const bool mods = f.any_score_mod();
  // A softcap alone is fused into the exponential pass (row_exp_sum_to) instead of a pass of
  // its own over the scores. It is increasing, so a row's largest capped score is the cap of its
  // largest raw score.
  const bool fused_cap = !std::is_same_v<T, double> && f.softcap > 0 && !f.alibi &&
                         p.mask_kind == MaskKind::kNone && scale > 0;
  const FusedSoftcap fcap =
      fused_cap ? FusedSoftcap(static_cast<float>(scale), static_cast<float>(f.softcap), kLazyMax)
                : FusedSoftcap{};
  const Dropout drop(f);

  parallel_tasks(ntasks, [&](std::atomic<int64_t>& next) {
    thread_local Gemm<T> gemm;
    thread_local PackedB<T> pk, pv;
    gemm.configure(vnni, f32_brgemm, amx);
    // Row strides a little past BK: rows 2^k bytes apart would share a few cache sets.
    const int64_t lds = BK + 16, ldp = BK + 32;
    A* sbuf = thread_buffer<A, 0>(BQ * lds);
    A* acc = thread_buffer<A, 1>(chunk_rows * ev_pad);
    A* m = thread_buffer<A, 2>(chunk_rows);
    A* l = thread_buffer<A, 3>(chunk_rows);
    T* pbuf = thread_buffer<T, 4>(BQ * ldp);
    float* pbuf32 = thread_buffer<float, 7>(p32 ? BQ * ldp : 0);
    T* qpad = thread_buffer<T, 5>(e_even != E || amx ? BQ * e_even : 0);
    char* started = thread_buffer<char, 6>(blocks_per_chunk);
    // The keys [row_lo[r], row_hi[r]) (from base) that row r of a query block sees.
    int64_t* row_lo = thread_buffer<int64_t, 28>(BQ);
    int64_t* row_hi = thread_buffer<int64_t, 29>(BQ);
    for (int64_t t = next++; t < ntasks; t = next++) {
      // Largest chunks first: with causal masking the last rows carry the most work.
      const int64_t c = chunks - 1 - t % chunks, bh = t / chunks;
      const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
      const Sequence sq = sequence_of(p, b);
      const int64_t r0 = c * chunk_rows, r1 = std::min(sq.len_q, r0 + chunk_rows);
      if (r0 >= r1) continue;
      // Causal or windowed rows see different keys: the micro-kernels compute each block of
      // rows over its rows' keys only (row_band.h).
      const bool banded = micro && (sq.window_left >= 0 || sq.window_right >= 0);
      const T* qp = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
                    sq.q_row0 * p.q_stride_l;
      const KeyRows<T> kr = key_rows<T>(p, sq, p.k, p.k_stride_b, p.k_stride_h, p.k_stride_l, hk);
      const KeyRows<T> vr = key_rows<T>(p, sq, p.v, p.v_stride_b, p.v_stride_h, p.v_stride_l, hk);
      // The keys some row of the chunk sees (windows and causality bound both ends).
      const int64_t kv_begin = sq.lo(r0), kv_end = sq.hi(r1 - 1);
      std::fill(m, m + (r1 - r0), neg_inf<A>());
      std::fill(l, l + (r1 - r0), A(0));
      // acc needs no clearing: the first key block a query block visits writes it instead of
      // adding to it.
      std::fill(started, started + blocks_per_chunk, char(0));

      for (int64_t n0 = kv_begin, bn = 0; n0 < kv_end; n0 += bn) {
        // A block never crosses a page of a paged cache.
        bn = vr.run(n0, kr.run(n0, std::min(BK, kv_end - n0)));
        gemm.pack(pk, /*trans=*/true, E, bn, kr.row(n0), p.k_stride_l);
        gemm.pack(pv, /*trans=*/false, bn, Ev, vr.row(n0), p.v_stride_l);
        for (int64_t q0 = r0; q0 < r1; q0 += BQ) {
          const int64_t q1 = std::min(q0 + BQ, r1), bq = q1 - q0;
          if (!sq.sees(q0, q1, n0, n0 + bn)) continue;  // the block is hidden from every row
          const T* qa = qp + q0 * p.q_stride_l;
          int64_t lda = p.q_stride_l;
          // The AMX tiles read 16 whole rows: a ragged block goes through the padded copy too.
          const int64_t bq_pad = round_up(bq, amx ? 16 : 1);
          if (e_even != E || bq_pad != bq) {
            copy_padded(qa, lda, bq, E, e_even, qpad);
            std::fill(qpad + bq * e_even, qpad + bq_pad * e_even, T(0));
            qa = qpad;
            lda = e_even;
          }
          // Keys at or beyond the last row's bound are hidden from the whole block.
          const int64_t bn_q = std::min(bn, sq.hi(q1 - 1) - n0);
          // With a window, the keys before the first row's window are hidden from the whole
          // block too: the products start at column c0 (a multiple of 32, as Gemm::run needs).
          const int64_t c0 = (std::clamp<int64_t>(sq.lo(q0) - n0, 0, bn_q) / 32) * 32;
          const int64_t base = n0 + c0, width = bn_q - c0;  // the block's keys from here on
          const int64_t width_even = round_up(bn_q, k_align) - c0;
          for (int64_t r = 0; r < bq; ++r) {
            row_lo[r] = std::clamp<int64_t>(sq.lo(q0 + r) - base, 0, width);
            row_hi[r] = std::clamp<int64_t>(sq.hi(q0 + r) - base, row_lo[r], width);
          }
          const auto band = [&](RowBand::Kind kind) {
            return banded ? RowBand{kind, row_lo, row_hi} : RowBand{};
          };
          gemm.run(bq, qa, lda, pk, sbuf, lds, /*add=*/false, bn_q, -1, c0, 0,
                   band(RowBand::Kind::kCols));
          // Probability rows past bq are read by the AMX tiles: keep them zero.
          if (bq_pad != bq) std::fill(pbuf + bq * ldp, pbuf + bq_pad * ldp, T(0));

          for (int64_t r = 0; r < bq; ++r) {
            const int64_t i = q0 + r, ri = i - r0;
            A* s = sbuf + r * lds + c0;
            // Keys base + [lo, valid) take part for this row.
            const int64_t lo = row_lo[r], valid = row_hi[r];
            // (A fused softcap is applied by the exponential pass instead.)
            A eff_scale = prepare_row_scores<T, A>(s, lo, valid, scale, mods && !fused_cap, p,
                                                   mesize, sq, b, h, i, base);
            A* acc_row = acc + ri * ev_pad;
            if constexpr (!std::is_same_v<T, double>) {
              // Lazy rescaling: exponentiate against the running maximum m and track the block's
              // own maximum in the same pass; only when it exceeds m by more than kLazyMax
              // (probabilities up to e^kLazyMax are harmless in fp32/bf16/fp16) is the row
              // redone against the new maximum and the accumulator rescaled.
              // P in T, or in fp32 for the micro-kernels (p32).
              const auto probs = [&](auto* pr) {
                using P = std::remove_pointer_t<decltype(pr)>;
                A sum = 0;
                bool visible = valid > lo;
                if (visible && m[ri] == neg_inf<A>()) {
                  A bmax = row_max(s, valid) * eff_scale;
                  if (fused_cap) bmax = fcap.capped(bmax);
                  visible = bmax != neg_inf<A>();
                  if (visible) m[ri] = bmax;
                }
                // The pass starts at lo: the keys before the window are no work (and the fused
                // softcap would map their -inf to -softcap).
                const auto exp_pass = [&](A shift, float* xmax) {
                  std::fill(pr, pr + lo, P(0));
                  return row_exp_sum_to(s + lo, valid - lo, eff_scale, shift, pr + lo, xmax, fcap);
                };
                if (visible) {
                  // A NaN m (NaN among the first visible scores) makes every exponential, hence l
                  // and the row's output, NaN; NaN scores in later blocks make their sum NaN.
                  // Huge maxima (|m| > kExactShift) take the non-lazy update instead, which
                  // subtracts them exactly; +inf scores end there too, as an infinite maximum
                  // whose inf - inf makes the row NaN, as in torch's softmax.
                  bool lazy = !(std::abs(m[ri]) > kExactShift<A>);
                  if (lazy) {
                    float xmax;
                    sum = exp_pass(m[ri], &xmax);
                    if (xmax > kLazyMax) {
                      const A m_new = m[ri] + xmax;
                      lazy = !(std::abs(m_new) > kExactShift<A>);
                      if (lazy) {
                        const A alpha = std::exp(m[ri] - m_new);
                        sum = exp_pass(m_new, &xmax);
                        row_scale(acc_row, Ev, alpha);
                        l[ri] *= alpha;
                        m[ri] = m_new;
                      }
                    }
                  }
                  if (lazy) {
                    l[ri] += sum;
                  } else {
                    if (fused_cap) {  // the capped scores, for the exact update
                      score_mods_row<A>(s, lo, valid, scale, f, sq, h, i, base, nullptr);
                      eff_scale = 1;
                    }
                    online_softmax_block(s, valid, eff_scale, m[ri], l[ri], acc_row, Ev);
                    convert_row(s, pr, valid);
                  }
                  if (f.dropout_p > 0) drop.apply(pr, lo, valid, b * Hq + h, i, base);
                  std::fill(pr + valid, pr + width_even, P(0));
                } else {
                  std::fill(pr, pr + width_even, P(0));  // nothing visible: P = 0, state unchanged
                }
              };
              if (p32) {
                probs(pbuf32 + r * ldp + c0);
              } else {
                probs(pbuf + r * ldp + c0);
              }
            } else {
              if (valid > lo &&
                  online_softmax_block(s, valid, eff_scale, m[ri], l[ri], acc_row, Ev)) {
                if (f.dropout_p > 0) drop.apply(s, lo, valid, b * Hq + h, i, base);
                std::fill(s + valid, s + width_even, A(0));
              } else {
                std::fill(s, s + width_even, A(0));  // nothing visible: P = 0, state unchanged
              }
            }
          }
          const T* pa;
          int64_t ldpa;
          if constexpr (std::is_same_v<T, double>) {
            pa = sbuf;
            ldpa = lds;
          } else {
            pa = pbuf;
            ldpa = ldp;
          }
          char& first = started[(q0 - r0) / BQ];
          if (p32) {
            gemm.run_f32(bq, pbuf32, ldp, pv, acc + (q0 - r0) * ev_pad, ev_pad, first != 0, -1,
                         bn_q, 0, c0, band(RowBand::Kind::kTerms));
          } else {
            gemm.run(bq, pa, ldpa, pv, acc + (q0 - r0) * ev_pad, ev_pad, /*add=*/first != 0, -1,
                     bn_q, 0, c0, band(RowBand::Kind::kTerms));
          }
          first = 1;
        }
      }
      // Normalise and write out.
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t ri = i - r0;
        finish_row<T, A>(p, h, acc + ri * ev_pad, m[ri], l[ri], Ev, out_row<T>(p, sq, h, i),
                         lse_at<A>(p, sq, h, i));
      }
    }
    gemm.release();
  });
}

}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
