// The backward, per task = (batch, KV head, chunk of key blocks), probabilities recomputed
// from lse:
//   P = exp(scale*S - lse), dV += P^T dO, dP = dO V^T, dS = P*(dP - D) with D = rowsum(dO*O),
//   dK += scale * dS^T Q, dQ += scale * dS K.
// dK and dV are owned by the task (all query heads of a GQA group are visited inside it), so
// they need no reduction; dQ is accumulated per key chunk in fp32 and summed at the end, which
// lets a single (batch, head) use every core.
//
// Part of the per-ISA CPU kernel: included by csrc/cpu/kernels.cpp only, inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE (see cpu/kernel_utils.h).
#pragma once

#include <cmath>

#include "cpu/decode.h"
#include "cpu/gemm.h"
#include "cpu/kernel_utils.h"
#include "cpu/sequence.h"
#include "cpu/softmax_rows.h"

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockKV = 256;

template <typename T>
void backward_impl(const AttentionBackwardParams& bp, const KernelOptions& opt) {
  using A = acc_type<T>;
  const AttentionForwardParams& p = bp.fwd;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, L = p.len_q, S = p.len_kv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v, group = Hkv > 0 ? Hq / Hkv : 1;
  T* dq = static_cast<T*>(bp.grad_q);
  T* dk = static_cast<T*>(bp.grad_k);
  T* dv = static_cast<T*>(bp.grad_v);
  const T* dout = static_cast<const T*>(bp.grad_out);
  const T* out = static_cast<const T*>(p.out);
  // The gradients arrive zeroed (the operator layer allocates them so): rows no task reaches
  // (keys no query sees, padding of variable-length batches) stay zero.
  if (B == 0 || Hq == 0 || L == 0 || S == 0) return;

  const VnniEngine vnni = vnni_engine<T>(opt);  // as forward_impl
  const bool brgemm = vnni != VnniEngine::kNone;
  const bool decode_forward = L <= kDecodeMaxLen && group * L <= kDecodeMaxRows;  // as forward_impl
  const int64_t BQ = kBwdBlockQ;
  const int64_t BK = std::min(kBwdBlockKV, round_up(S, kPackN));
  const int64_t e_pad = round_up(E, kPackN), ev_pad = round_up(Ev, kPackN);
  const int64_t e_even = round_up(E, 2), ev_even = round_up(Ev, 2);
  const int64_t bq_cap = round_up(std::min(BQ, L), 2);
  const size_t mesize = mask_elem_size(p, sizeof(T));
  const A scale = static_cast<A>(p.scale);
  const FlashFeatures& f = p.flash;
  const bool mods = f.any_score_mod(), softcap = f.softcap > 0, dropout = f.dropout_p > 0;
  const Dropout drop(f);
  const int64_t osb = p.out_stride_b, osh = p.out_stride_h, osl = p.out_stride_l;

  // D = rowsum(dO * O), one value per query row, (B, Hq, L).
  std::vector<A> D(B * Hq * L, A(0));
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      const Sequence sq = sequence_of(p, b);
      for (int64_t i = 0; i < sq.len_q; ++i) {
        const int64_t off = b * osb + h * osh + (sq.q_row0 + i) * osl;
        A acc = 0;
        for (int64_t e = 0; e < Ev; ++e)
          acc += static_cast<A>(dout[off + e]) * static_cast<A>(out[off + e]);
        D[bh * L + i] = acc;
      }
    }
  });

  const int64_t nthreads = at::get_num_threads();
  const int64_t nkb = ceil_div(S, BK);
  int64_t chunks = std::min(nkb, std::max<int64_t>(1, ceil_div(2 * nthreads, B * Hkv)));
  const int64_t blocks_per_chunk = ceil_div(nkb, chunks);
  chunks = ceil_div(nkb, blocks_per_chunk);
  const int64_t ntasks = B * Hkv * chunks;
  // dQ partial sums, one slab per key chunk: (chunks, B, Hq, L, e_pad).
  std::vector<A> dq_acc(chunks * B * Hq * L * e_pad, A(0));

  parallel_tasks(ntasks, [&](std::atomic<int64_t>& next) {
    thread_local Gemm<T> gemm;
    thread_local PackedB<T> pkt, pvt, pk;
    // fp32: the micro-kernels (AVX2 and AVX-512 builds), which read transposed operands in place
    // (the backward has two per tile), as BLAS does elsewhere. The forward computed its scores
    // on them too (the decoding path's for more than two rows): the same products give the same
    // scores, so P = exp(scale * S - lse) stays normalised to fp32 rounding.
    gemm.configure(vnni, /*f32_brgemm=*/false, /*amx=*/false);
    A* sbuf = thread_buffer<A, 10>(bq_cap * BK);
    A* dpbuf = thread_buffer<A, 11>(bq_cap * BK);
    A* dk_acc = thread_buffer<A, 12>(BK * e_pad);
    A* dv_acc = thread_buffer<A, 13>(BK * ev_pad);
    T* pbuf = thread_buffer<T, 14>(kReduced<T> || dropout ? bq_cap * BK : 0);
    T* dsbuf = thread_buffer<T, 15>(kReduced<T> ? bq_cap * BK : 0);
    const bool pad_q = brgemm && e_even != E, pad_do = brgemm && ev_even != Ev;
    T* qpad = thread_buffer<T, 16>(pad_q ? BQ * e_even : 0);
    T* dopad = thread_buffer<T, 17>(pad_do ? BQ * ev_even : 0);
    A* tbuf = thread_buffer<A, 18>(softcap ? bq_cap * BK : 0);
    A* pdrop = thread_buffer<A, 19>(dropout && kReduced<T> ? BK : 0);
    for (int64_t t = next++; t < ntasks; t = next++) {
      const int64_t c = t % chunks, bhk = t / chunks;
      const int64_t b = bhk / Hkv, hk = bhk % Hkv;
      const Sequence sq = sequence_of(p, b);
      const KeyRows<T> kr = key_rows<T>(p, sq, p.k, p.k_stride_b, p.k_stride_h, p.k_stride_l, hk);
      const KeyRows<T> vr = key_rows<T>(p, sq, p.v, p.v_stride_b, p.v_stride_h, p.v_stride_l, hk);
      const int64_t kb0 = c * blocks_per_chunk, kb1 = std::min(nkb, kb0 + blocks_per_chunk);
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t n0 = kb * BK;
        if (n0 >= sq.len_k) break;
        const int64_t bn = std::min(BK, sq.len_k - n0), bn_even = round_up(bn, 2);
        // The query rows that see some key of the block.
        int64_t i_begin = 0, i_end = sq.len_q;
        if (sq.window_right >= 0)
          i_begin = std::clamp<int64_t>(n0 - sq.diag - sq.window_right, 0, sq.len_q);
        if (sq.window_left >= 0)
          i_end = std::clamp<int64_t>(n0 + bn + sq.window_left - sq.diag, 0, sq.len_q);
        T* dk_row0 =
            dk + sq.kv_b * bp.dk_stride_b + hk * bp.dk_stride_h + (sq.k_row0 + n0) * bp.dk_stride_l;
        T* dv_row0 =
            dv + sq.kv_b * bp.dv_stride_b + hk * bp.dv_stride_h + (sq.k_row0 + n0) * bp.dv_stride_l;
        if (i_begin >= i_end) continue;  // no query sees these keys: their gradients stay 0
        const T* kblk = kr.row(n0);
        const T* vblk = vr.row(n0);
        gemm.pack(pkt, /*trans=*/true, E, bn, kblk, p.k_stride_l);   // K^T for S = Q K^T
        gemm.pack(pvt, /*trans=*/true, Ev, bn, vblk, p.v_stride_l);  // V^T for dP = dO V^T
        gemm.pack(pk, /*trans=*/false, bn, E, kblk, p.k_stride_l);   // K for dQ = dS K
        std::fill(dk_acc, dk_acc + BK * e_pad, A(0));
        std::fill(dv_acc, dv_acc + BK * ev_pad, A(0));
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hk * group + g;
          const T* qp = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
                        sq.q_row0 * p.q_stride_l;
          const T* dop = dout + b * osb + h * osh + sq.q_row0 * osl;
          const A* D_h = D.data() + (b * Hq + h) * L;
          A* dqa = dq_acc.data() + ((c * B + b) * Hq + h) * L * e_pad;
          for (int64_t q0 = i_begin; q0 < i_end; q0 += BQ) {
            const int64_t bq = std::min(BQ, i_end - q0);
            const T* qa = qp + q0 * p.q_stride_l;
            int64_t ldq = p.q_stride_l;
            const T* doa = dop + q0 * osl;
            int64_t lddo = osl;
            if (pad_q) {
              copy_padded(qa, ldq, bq, E, e_even, qpad);
              qa = qpad;
              ldq = e_even;
            }
            if (pad_do) {
              copy_padded(doa, lddo, bq, Ev, ev_even, dopad);
              doa = dopad;
              lddo = ev_even;
            }
            // S = Q K^T, then P = exp(scale*S + mask - lse)
            gemm.run(bq, qa, ldq, pkt, sbuf, BK, false);
            for (int64_t r = 0; r < bq; ++r) {
              const int64_t i = q0 + r;
              A* s = sbuf + r * BK;
              const int64_t lo = std::clamp<int64_t>(sq.lo(i) - n0, 0, bn);
              const int64_t valid = std::clamp<int64_t>(sq.hi(i) - n0, lo, bn);
              const A lse_i = *lse_at<A>(p, sq, h, i);
              if (valid <= lo || lse_i == neg_inf<A>()) {
                std::fill(s, s + bn_even, A(0));
              } else {
                A eff_scale = scale;
                if (mods) {
                  score_mods_row<A>(s, lo, valid, scale, f, sq, h, i, n0,
                                    softcap ? tbuf + r * BK : nullptr);
                  if (p.mask_kind != MaskKind::kNone)
                    apply_mask_row<T, A>(s + lo, valid - lo, A(1), p,
                                         mask_ptr(p, mesize, b, h, i, n0 + lo));
                  eff_scale = 1;
                } else if (p.mask_kind != MaskKind::kNone) {
                  apply_mask_row<T, A>(s, valid, scale, p, mask_ptr(p, mesize, b, h, i, n0));
                  eff_scale = 1;
                }
                // A NaN lse (a row with NaN scores) gives NaN probabilities, as torch's softmax.
                exact_scores(s, valid, lse_i, eff_scale);
                row_exp_sum(s, valid, eff_scale, lse_i);
                std::fill(s, s + lo, A(0));
                std::fill(s + valid, s + bn_even, A(0));
              }
              if (dropout) {
                // dV takes the dropped probabilities P * keep / (1 - p).
                if constexpr (kReduced<T>) {
                  std::copy(s, s + bn_even, pdrop);
                  drop.apply(pdrop, lo, valid, b * Hq + h, i, n0);
                  convert_row(pdrop, pbuf + r * BK, bn_even);
                } else {
                  std::copy(s, s + bn_even, pbuf + r * BK);
                  drop.apply(pbuf + r * BK, lo, valid, b * Hq + h, i, n0);
                }
              } else if constexpr (kReduced<T>) {
                convert_row(s, pbuf + r * BK, bn_even);
              }
            }
            const T* pa;
            if constexpr (kReduced<T>) {
              pa = pbuf;
            } else {
              pa = dropout ? pbuf : sbuf;
            }
            // dV += P^T dO
            gemm.mm(true, false, bn, Ev, bq, pa, BK, dop + q0 * osl, osl, dv_acc, ev_pad, true);
            // dP = dO V^T, dS = P * (dP - D)
            gemm.run(bq, doa, lddo, pvt, dpbuf, BK, false);
            for (int64_t r = 0; r < bq; ++r) {
              const int64_t i = q0 + r;
              const A d = D_h[i];
              A* dp = dpbuf + r * BK;
              const A* pr = sbuf + r * BK;
              if (dropout) {
                const int64_t lo = std::clamp<int64_t>(sq.lo(i) - n0, 0, bn);
                const int64_t valid = std::clamp<int64_t>(sq.hi(i) - n0, lo, bn);
                drop.apply(dp, lo, valid, b * Hq + h, i, n0);
              }
              using Vec = Vectorized<A>;
              const Vec vd(d);
              int64_t j = 0;
              for (; j + Vec::size() <= bn; j += Vec::size())
                (Vec::loadu(pr + j) * (Vec::loadu(dp + j) - vd)).store(dp + j);
              for (; j < bn; ++j) dp[j] = pr[j] * (dp[j] - d);
              for (j = bn; j < bn_even; ++j) dp[j] = 0;
              if (softcap) {
                // d softcap*tanh(x/softcap) / dx = 1 - tanh^2, where the row took part.
                const int64_t lo = std::clamp<int64_t>(sq.lo(i) - n0, 0, bn);
                const int64_t valid = std::clamp<int64_t>(sq.hi(i) - n0, lo, bn);
                const A* tr = tbuf + r * BK;
                for (int64_t jj = lo; jj < valid; ++jj) dp[jj] *= A(1) - tr[jj] * tr[jj];
              }
              if constexpr (kReduced<T>) convert_row(dp, dsbuf + r * BK, bn_even);
            }
            const T* dsa;
            if constexpr (kReduced<T>) {
              dsa = dsbuf;
            } else {
              dsa = dpbuf;
            }
            // dK += dS^T Q (scaled at the end), dQ += dS K (scaled at the end)
            gemm.mm(true, false, bn, E, bq, dsa, BK, qp + q0 * p.q_stride_l, p.q_stride_l, dk_acc,
                    e_pad, true);
            gemm.run(bq, dsa, BK, pk, dqa + q0 * e_pad, e_pad, true);
          }
        }
        for (int64_t j = 0; j < bn; ++j) {
          A* dkr = dk_acc + j * e_pad;
          row_scale(dkr, E, scale);
          convert_row(dkr, dk_row0 + j * bp.dk_stride_l, E);
          convert_row(dv_acc + j * ev_pad, dv_row0 + j * bp.dv_stride_l, Ev);
        }
      }
    }
    gemm.release();
  });

  // dQ = scale * sum over key chunks.
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> row(e_pad);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      const Sequence sq = sequence_of(p, b);
      for (int64_t i = 0; i < sq.len_q; ++i) {
        std::fill(row.begin(), row.end(), A(0));
        for (int64_t c = 0; c < chunks; ++c) {
          const A* src = dq_acc.data() + ((c * B * Hq + bh) * L + i) * e_pad;
          for (int64_t e = 0; e < E; ++e) row[e] += src[e];
        }
        row_scale(row.data(), E, scale);
        convert_row(row.data(),
                    dq + b * bp.dq_stride_b + h * bp.dq_stride_h + (sq.q_row0 + i) * bp.dq_stride_l,
                    E);
      }
    }
  });
}

}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
