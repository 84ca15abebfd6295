// Register-blocked fp32 GEMM micro-kernels for AVX2 + FMA (16 ymm registers).
//
// C[M x N] (+)= A[M x K] * B[K x N] with fp32 accumulation, for the products of the attention
// kernel (S = Q K^T, acc += P V and the backward's five products):
//
//   - B is packed once into panels of 16 columns: panel p holds columns [16 p, 16 p + 16) of
//     rows [0, K), row after row (16 floats, 64 bytes, one cache line per row), zero past N.
//     Packing widens bf16 (a shift: bf16 is the top half of an fp32) and fp16 (F16C) to fp32
//     and transposes where B is given as its transpose (K^T from K's rows), in 8 x 8 register
//     transposes. One block of keys is packed at a time: no fp32 copy of K or V beyond it.
//   - A is read in place with any row and column strides (row-major Q or P, or a transposed
//     P^T / dS^T, whose broadcasts are then contiguous); bf16/fp16 A is widened into one fp32
//     copy per product first.
//   - The micro-kernel keeps a 6 x 16 block of C in 12 accumulators; each step over k loads
//     two vectors of B and broadcasts six elements of A into 12 FMAs, so that loads (8 per
//     step) stay below the two FMAs a cycle and 12 independent chains cover the FMA latency.
//     Row tails use the same kernel with fewer rows (a tail of 7 or 8 rows runs as 4 + 3 or
//     4 + 4, never with one or two rows alone); column tails compute the whole zero-padded
//     panel, so C must have room for N rounded up to 16 columns.
//
// Part of the per-ISA CPU kernel: included by csrc/cpu/gemm.h in the AVX2 build, and in the AVX-512
// build for its packing and row blocking (microkernel_avx512.h), inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE (see cpu/kernel_utils.h). It includes no torch header but
// c10's bf16/fp16 types, so that a standalone program can time it.
#pragma once

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "microkernel_avx2.h needs -mavx2 -mfma -mf16c (the AVX2 build of the CPU kernel)"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/row_band.h"

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {
namespace avx2_micro {

constexpr int64_t kNR = 16;  // columns per panel of B (two ymm vectors)
constexpr int kMR = 6;       // rows of C per micro-kernel call

// 8 elements widened to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// src[0, n) widened to fp32 into dst.
template <typename T>
inline void widen_row(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (!std::is_same_v<T, float>) {
    for (; i + 16 <= n; i += 16) {
      _mm256_storeu_ps(dst + i, load8(src + i));
      _mm256_storeu_ps(dst + i + 8, load8(src + i + 8));
    }
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// The transpose of eight 8-float rows: r[j] = row j on entry, column j on exit.
inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  // s0 = column 0 | column 4 of rows 0..3, s1 = columns 1 | 5, s2 = 2 | 6, s3 = 3 | 7.
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Floats the panels of a K x N operand take: one 16-float row per k and panel.
inline int64_t panels_size(int64_t K, int64_t N) { return (N + kNR - 1) / kNR * K * kNR; }

// Packs the logical K x N operand B into panels at dst (64-byte aligned, panels_size(K, N)
// floats): B(k, n) = src[k * ld + n], or src[n * ld + k] when trans.
template <typename T>
void pack_panels(bool trans, int64_t K, int64_t N, const T* src, int64_t ld, float* dst) {
  for (int64_t n0 = 0; n0 < N; n0 += kNR) {
    const int64_t w = std::min(kNR, N - n0);
    float* d = dst + n0 * K;  // panel n0 / 16 starts K * 16 * (n0 / 16) floats in
    if (!trans) {
      const T* s = src + n0;
      if (w == kNR) {
        for (int64_t k = 0; k < K; ++k) {
          _mm256_store_ps(d + k * kNR, load8(s + k * ld));
          _mm256_store_ps(d + k * kNR + 8, load8(s + k * ld + 8));
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t j = 0; j < w; ++j) d[k * kNR + j] = static_cast<float>(s[k * ld + j]);
          for (int64_t j = w; j < kNR; ++j) d[k * kNR + j] = 0.f;
        }
      }
      continue;
    }
    // Transposed: column n of B is row n of src. Eight rows at a time, eight k at a time.
    int64_t j8 = 0;
    for (; j8 + 8 <= w; j8 += 8) {
      const T* s = src + (n0 + j8) * ld;
      int64_t k0 = 0;
      for (; k0 + 8 <= K; k0 += 8) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = load8(s + j * ld + k0);
        transpose8x8(r);
        for (int k = 0; k < 8; ++k) _mm256_store_ps(d + (k0 + k) * kNR + j8, r[k]);
      }
      for (; k0 < K; ++k0)
        for (int64_t j = 0; j < 8; ++j) d[k0 * kNR + j8 + j] = static_cast<float>(s[j * ld + k0]);
    }
    for (int64_t j = j8; j < kNR; ++j) {
      if (j < w) {
        const T* s = src + (n0 + j) * ld;
        for (int64_t k = 0; k < K; ++k) d[k * kNR + j] = static_cast<float>(s[k]);
      } else {
        for (int64_t k = 0; k < K; ++k) d[k * kNR + j] = 0.f;
      }
    }
  }
}

// C[kRows x 16] (+)= A[kRows x K] * panel, panel row k at b + 16 k (aligned). The
// accumulators stay in registers for the whole of K.
//
// kTransA: A(i, k) = a[i + k * ld] (A given as its transpose, e.g. P^T from P's rows), else
// A(i, k) = a[i * ld + k]. Either way one index register walks all of the rows' broadcasts.
template <int kRows, bool kTransA>
inline void kernel_16(int64_t K, const float* a, int64_t ld, const float* b, float* c, int64_t ldc,
                      bool add) {
  static_assert(kRows >= 1 && kRows <= kMR);
  // Named accumulators, not arrays: GCC keeps arrays of vectors in memory across the loop.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const int64_t rs = kTransA ? 1 : ld;
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kNR), b1 = _mm256_load_ps(b + k * kNR + 8);
    const float* ak = kTransA ? a + k * ld : a + k;
#define AIGC_MK_ROW(i)                                 \
  if constexpr (kRows > i) {                           \
    const __m256 x = _mm256_broadcast_ss(ak + i * rs); \
    c##i##0 = _mm256_fmadd_ps(x, b0, c##i##0);         \
    c##i##1 = _mm256_fmadd_ps(x, b1, c##i##1);         \
  }
    AIGC_MK_ROW(0)
    AIGC_MK_ROW(1)
    AIGC_MK_ROW(2)
    AIGC_MK_ROW(3)
    AIGC_MK_ROW(4)
    AIGC_MK_ROW(5)
#undef AIGC_MK_ROW
  }
#define AIGC_MK_STORE(i)                                         \
  if constexpr (kRows > i) {                                     \
    float* ci = c + i * ldc;                                     \
    if (add) {                                                   \
      c##i##0 = _mm256_add_ps(c##i##0, _mm256_loadu_ps(ci));     \
      c##i##1 = _mm256_add_ps(c##i##1, _mm256_loadu_ps(ci + 8)); \
    }                                                            \
    _mm256_storeu_ps(ci, c##i##0);                               \
    _mm256_storeu_ps(ci + 8, c##i##1);                           \
  }
  AIGC_MK_STORE(0)
  AIGC_MK_STORE(1)
  AIGC_MK_STORE(2)
  AIGC_MK_STORE(3)
  AIGC_MK_STORE(4)
  AIGC_MK_STORE(5)
#undef AIGC_MK_STORE
}

// Rows [0, kRows) of C against the panels of columns [0, N).
template <int kRows, bool kTransA>
inline void row_block(int64_t N, int64_t K, const float* a, int64_t ld, const float* b,
                      int64_t panel_stride, float* c, int64_t ldc, bool add) {
  for (int64_t n0 = 0; n0 < N; n0 += kNR)
    kernel_16<kRows, kTransA>(K, a, ld, b + (n0 / kNR) * panel_stride, c + n0, ldc, add);
}

template <bool kTransA>
inline void rows_dispatch(int rows, int64_t N, int64_t K, const float* a, int64_t ld,
                          const float* b, int64_t panel_stride, float* c, int64_t ldc, bool add) {
  switch (rows) {
    case 6:
      return row_block<6, kTransA>(N, K, a, ld, b, panel_stride, c, ldc, add);
    case 5:
      return row_block<5, kTransA>(N, K, a, ld, b, panel_stride, c, ldc, add);
    case 4:
      return row_block<4, kTransA>(N, K, a, ld, b, panel_stride, c, ldc, add);
    case 3:
      return row_block<3, kTransA>(N, K, a, ld, b, panel_stride, c, ldc, add);
    case 2:
      return row_block<2, kTransA>(N, K, a, ld, b, panel_stride, c, ldc, add);
    default:
      return row_block<1, kTransA>(N, K, a, ld, b, panel_stride, c, ldc, add);
  }
}

// The row blocks of C: whole blocks of six rows, and a tail of 7 or 8 rows as two blocks of 3-4
// rows; fn(i, rows) for each.
template <typename Fn>
inline void for_row_blocks(int64_t M, const Fn& fn) {
  const int64_t tail = M % kMR;
  const int64_t full = M - tail - ((tail == 1 || tail == 2) && M > kMR ? kMR : 0);
  int64_t i = 0;
  for (; i < full; i += kMR) fn(i, kMR);
  while (i < M) {
    const int rows = static_cast<int>(M - i > kMR ? 4 : M - i);
    fn(i, rows);
    i += rows;
  }
}

// The L1 data cache's size in bytes, as the OS reports it (32 KiB where it does not).
inline int64_t l1d_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t{32 * 1024};
  }();
  return bytes;
}

// The loop order of gemm_rows. Where all of B's panels fit in L1 with this much to spare (for A's
// six rows, C's lines and the rest), rows go outside: each block of six rows of A stays in L1
// while B passes, and B stays in L1 across the row blocks. On a 48 KiB L1 (Sapphire Rapids) that
// covers Q K^T and P V at E = 64, and took the fp32 forward at L = 4096 from 183-189 to 191-200
// GFLOP/s (2 threads, the AVX2 build). Otherwise a panel up to kPanelInL1Bytes (K <= 256) stays in
// L1 while every row block passes over it (32 KiB L1: AMD Zen 2/3, Intel before Ice Lake), and a
// longer one streams, past each row block's A.
constexpr int64_t kL1Spare = 16 * 1024;
constexpr int64_t kPanelInL1Bytes = 16 * 1024;

template <bool kTransA>
inline void gemm_rows(int64_t M, int64_t N, int64_t K, const float* a, int64_t ld, const float* b,
                      int64_t panel_stride, float* c, int64_t ldc, bool add, const RowBand& band) {
  const int64_t rs = kTransA ? 1 : ld, ks = kTransA ? ld : 1;
  // Rows [i, i + rows) over C's columns [n_lo, n_hi) (n_lo a multiple of 16), within the band.
  const auto part = [&](int64_t i, int rows, int64_t n_lo, int64_t n_hi) {
    int64_t k_lo = 0, k_hi = K;
    if (!band.narrow(i, rows, N, K, add, kNR, &n_lo, &n_hi, &k_lo, &k_hi)) return;
    rows_dispatch<kTransA>(rows, n_hi - n_lo, k_hi - k_lo, a + i * rs + k_lo * ks, ld,
                           b + (n_lo / kNR) * panel_stride + k_lo * kNR, panel_stride,
                           c + i * ldc + n_lo, ldc, add);
  };
  const int64_t panel_bytes = K * kNR * static_cast<int64_t>(sizeof(float));
  const bool b_in_l1 = (N + kNR - 1) / kNR * panel_bytes + kL1Spare <= l1d_bytes();
  if (!b_in_l1 && panel_bytes <= kPanelInL1Bytes) {
    for (int64_t n0 = 0; n0 < N; n0 += kNR)
      for_row_blocks(M, [&](int64_t i, int rows) { part(i, rows, n0, std::min(n0 + kNR, N)); });
    return;
  }
  for_row_blocks(M, [&](int64_t i, int rows) { part(i, rows, 0, N); });
}

// C[M x N] (+)= A[M x K] * B for B packed by pack_panels with panel_stride = 16 * (its K): the
// product may use only the first K rows of B. A(i, k) = a[i * ld + k], or a[k * ld + i] when
// trans_a. C (row-major, ldc) receives N rounded up to 16 columns. K = 0 gives zeros (or leaves
// C as it is, with add). band (see row_band.h) narrows each block of rows to its rows' ranges.
inline void gemm(int64_t M, int64_t N, int64_t K, bool trans_a, const float* a, int64_t ld,
                 const float* b, int64_t panel_stride, float* c, int64_t ldc, bool add,
                 const RowBand& band = {}) {
  if (M <= 0 || N <= 0) return;
  if (trans_a) return gemm_rows<true>(M, N, K, a, ld, b, panel_stride, c, ldc, add, band);
  gemm_rows<false>(M, N, K, a, ld, b, panel_stride, c, ldc, add, band);
}

}  // namespace avx2_micro
}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
