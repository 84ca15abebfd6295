// Register-blocked fp32 GEMM micro-kernels for AVX-512 (32 zmm registers).
//
// C[M x N] (+)= A[M x K] * B[K x N] with fp32 accumulation, on the operands of
// microkernel_avx2.h, whose packing this build shares: B in panels of 16 columns (one zmm per
// panel row, K rows per panel, bf16/fp16 widened while packing), A read in place with any row
// and column strides (A given as its transpose too), C row-major with room for N rounded up to
// 16 columns.
//
// The micro-kernel keeps a 6 x 64 block of C (four panels) in 24 accumulators; each step over
// k loads four vectors of B and broadcasts six elements of A into 24 FMAs: 10 loads a step,
// below the two FMAs a cycle, and 24 independent chains cover the FMA latency (4 cycles, two
// ports). Narrower column tails take fewer panels, row tails fewer rows (as in the AVX2
// build: 7 or 8 rows run as 4 + 3 or 4 + 4).
//
// Part of the per-ISA CPU kernel: included by csrc/cpu/gemm.h in the AVX-512 build only, inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE (see cpu/kernel_utils.h), after microkernel_avx2.h.
#pragma once

#if !defined(__AVX512F__)
#error "microkernel_avx512.h needs -mavx512f (the AVX-512 build of the CPU kernel)"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {
namespace avx512_micro {

using avx2_micro::for_row_blocks;
using avx2_micro::kMR;  // rows of C per micro-kernel call
using avx2_micro::kNR;  // columns per panel of B (one zmm)
using avx2_micro::panels_size;
using avx2_micro::widen_row;

constexpr int kNV = 4;  // panels (zmm columns) per micro-kernel call

// The transpose of a 16 x 16 block of 32-bit words (fp32 elements, or pairs of 16-bit ones):
// word j of source row i (16 rows of T, ld elements apart, starting at src) goes to word i of
// output row j (16 rows, out_step elements apart). Unpacks and lane shuffles, no memory round
// trip.
template <typename T>
inline void transpose16x16_words(const T* src, int64_t ld, T* out, int64_t out_step) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4);
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ld);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // Now 128-bit lane L of r[4 g + j] holds rows 4g..4g+3 of word column 4 L + j.
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);           // lanes 0 and 2 of groups 0, 1
    t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);       // lanes 1 and 3
    t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);  // same for groups 2, 3
    t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    _mm512_storeu_si512(out + j * out_step, _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88));
    _mm512_storeu_si512(out + (4 + j) * out_step, _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88));
    _mm512_storeu_si512(out + (8 + j) * out_step, _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD));
    _mm512_storeu_si512(out + (12 + j) * out_step, _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xDD));
  }
}

// pack_panels for fp32 B given as its transpose (K^T from K's rows) in 16 x 16 register
// transposes of whole blocks; everything else (bf16/fp16, untransposed B, ragged edges) as in
// the AVX2 build.
template <typename T>
void pack_panels(bool trans, int64_t K, int64_t N, const T* src, int64_t ld, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    if (trans) {
      const int64_t n_full = N / kNR * kNR, k_full = K / 16 * 16;
      for (int64_t n0 = 0; n0 < n_full; n0 += kNR) {
        const float* s = src + n0 * ld;
        float* d = dst + n0 * K;  // panel n0 / 16
        for (int64_t k0 = 0; k0 < k_full; k0 += 16)
          transpose16x16_words(s + k0, ld, d + k0 * kNR, kNR);
        for (int64_t k = k_full; k < K; ++k)
          for (int64_t j = 0; j < kNR; ++j) d[k * kNR + j] = s[j * ld + k];
      }
      if (n_full < N)
        avx2_micro::pack_panels(true, K, N - n_full, src + n_full * ld, ld, dst + n_full * K);
      return;
    }
  }
  avx2_micro::pack_panels(trans, K, N, src, ld, dst);
}

// C[kRows x 16 kCols] (+)= A[kRows x K] * B over the panels b[0, kCols), row k of panel j at
// b[j] + 16 k (64-byte aligned). kTransA: A(i, k) = a[i + k * ld], else a[i * ld + k].
// The loops over rows and panels are unrolled by the compiler (constant trip counts), which
// keeps the accumulators in registers.
template <int kRows, int kCols, bool kTransA>
inline void tile(int64_t K, const float* a, int64_t ld, const float* const* b, float* c,
                 int64_t ldc, bool add) {
  static_assert(kRows >= 1 && kRows <= kMR && kCols >= 1 && kCols <= kNV);
  __m512 acc[kRows][kCols];
  // With add the chains start from C: a product split over k (gemm_rows) gives the bits of the
  // unsplit one.
#pragma GCC unroll 6
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kCols; ++j)
      acc[i][j] = add ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
  const float* b0 = b[0];
  const float* b1 = kCols > 1 ? b[1] : b0;
  const float* b2 = kCols > 2 ? b[2] : b0;
  const float* b3 = kCols > 3 ? b[3] : b0;
  const int64_t rs = kTransA ? 1 : ld, ks = kTransA ? ld : 1;
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[kCols];
    bv[0] = _mm512_load_ps(b0 + k * kNR);
    if constexpr (kCols > 1) bv[1] = _mm512_load_ps(b1 + k * kNR);
    if constexpr (kCols > 2) bv[2] = _mm512_load_ps(b2 + k * kNR);
    if constexpr (kCols > 3) bv[3] = _mm512_load_ps(b3 + k * kNR);
    const float* ak = a + k * ks;
#pragma GCC unroll 6
    for (int i = 0; i < kRows; ++i) {
      const __m512 x = _mm512_set1_ps(ak[i * rs]);
#pragma GCC unroll 4
      for (int j = 0; j < kCols; ++j) acc[i][j] = _mm512_fmadd_ps(x, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kCols; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

template <int kRows, bool kTransA>
inline void tile_cols(int cols, int64_t K, const float* a, int64_t ld, const float* const* b,
                      float* c, int64_t ldc, bool add) {
  switch (cols) {
    case 4:
      return tile<kRows, 4, kTransA>(K, a, ld, b, c, ldc, add);
    case 3:
      return tile<kRows, 3, kTransA>(K, a, ld, b, c, ldc, add);
    case 2:
      return tile<kRows, 2, kTransA>(K, a, ld, b, c, ldc, add);
    default:
      return tile<kRows, 1, kTransA>(K, a, ld, b, c, ldc, add);
  }
}

template <bool kTransA>
inline void tile_dispatch(int rows, int cols, int64_t K, const float* a, int64_t ld,
                          const float* const* b, float* c, int64_t ldc, bool add) {
  switch (rows) {
    case 6:
      return tile_cols<6, kTransA>(cols, K, a, ld, b, c, ldc, add);
    case 5:
      return tile_cols<5, kTransA>(cols, K, a, ld, b, c, ldc, add);
    case 4:
      return tile_cols<4, kTransA>(cols, K, a, ld, b, c, ldc, add);
    case 3:
      return tile_cols<3, kTransA>(cols, K, a, ld, b, c, ldc, add);
    case 2:
      return tile_cols<2, kTransA>(cols, K, a, ld, b, c, ldc, add);
    default:
      return tile_cols<1, kTransA>(cols, K, a, ld, b, c, ldc, add);
  }
}

// Four panels' rows over this many bytes in all (128 rows of k) stay in L1 while every row block
// passes over them: longer products are cut into slices of k that long, each slice's partial
// sums carried in C to the next (so a 512-key P V streams its panels from L2 once per slice, not
// once per row block).
constexpr int64_t kPanelsInL1Bytes = 32 * 1024;
constexpr int64_t kSliceK = kPanelsInL1Bytes / (kNV * kNR * static_cast<int64_t>(sizeof(float)));

template <bool kTransA>
inline void gemm_rows(int64_t M, int64_t N, int64_t K, const float* a, int64_t ld, const float* b,
                      int64_t panel_stride, float* c, int64_t ldc, bool add, const RowBand& band) {
  const int64_t rs = kTransA ? 1 : ld, ks = kTransA ? ld : 1;
  const int64_t np = (N + kNR - 1) / kNR;
  // K = 0 still visits the tiles once: they write zeros (or keep C, with add).
  for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += kSliceK) {
    const int64_t kc = std::min(kSliceK, K - k0);
    const bool add_slice = add || k0 > 0;
    for (int64_t p0 = 0; p0 < np; p0 += kNV) {
      const int64_t p1 = std::min(np, p0 + kNV);
      for_row_blocks(M, [&](int64_t i, int rows) {
        // Panels [pl, ph) and terms [kl, kh) of this slice, within the band.
        int64_t n_lo = p0 * kNR, n_hi = std::min(p1 * kNR, N), kl = k0, kh = k0 + kc;
        if (!band.narrow(i, rows, N, K, add_slice, kNR, &n_lo, &n_hi, &kl, &kh)) return;
        const int64_t pl = n_lo / kNR, ph = (n_hi + kNR - 1) / kNR;
        const float* bp[kNV];
        for (int64_t j = pl; j < ph; ++j) bp[j - pl] = b + j * panel_stride + kl * kNR;
        tile_dispatch<kTransA>(rows, static_cast<int>(ph - pl), kh - kl, a + i * rs + kl * ks, ld,
                               bp, c + i * ldc + pl * kNR, ldc, add_slice);
      });
    }
  }
}

// avx2_micro::gemm's contract: C[M x N] (+)= A[M x K] * B for B packed by pack_panels with
// panel_stride = 16 * (its K); A(i, k) = a[i * ld + k], or a[k * ld + i] when trans_a; C
// receives N rounded up to 16 columns; K = 0 gives zeros (or leaves C, with add); band as there.
inline void gemm(int64_t M, int64_t N, int64_t K, bool trans_a, const float* a, int64_t ld,
                 const float* b, int64_t panel_stride, float* c, int64_t ldc, bool add,
                 const RowBand& band = {}) {
  if (M <= 0 || N <= 0) return;
  if (trans_a) return gemm_rows<true>(M, N, K, a, ld, b, panel_stride, c, ldc, add, band);
  gemm_rows<false>(M, N, K, a, ld, b, panel_stride, c, ldc, add, band);
}

}  // namespace avx512_micro
}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
