// bf16 GEMMs on AVX512_BF16 (vdpbf16ps) for CPUs that have it without AMX (AMD Zen 4 and
// later, Intel Cooper Lake), or wherever torch's brgemm is switched off: the products of the
// forward and backward in bf16, with fp32 accumulators, at twice the multiply-adds per
// instruction of fp32 FMAs and with no fp32 copy of either operand.
//
// The operands: A row-major bf16 with an even number of columns (the last one zero when K is
// odd), as on the brgemm path (gemm.h); B in VNNI pairs cut into panels of 64 columns,
// [n_pad / 64][K/2][64][2], so that the part of B one tile reads is contiguous (a row-major
// VNNI B whose rows are 2^k bytes apart would keep a column panel in a few cache sets); C fp32
// row-major with room for N rounded up to 16 columns. One vdpbf16ps multiplies a broadcast pair
// of A by 16 pairs of B and adds the two products of each lane to its fp32 accumulator.
//
// Register blocking for 32 zmm registers: tiles of 6 rows x 64 columns, 24 accumulators, 4 B
// vectors and one broadcast. Column panels are the outer loop: one panel of B, K/2 x 256 bytes,
// is reused from L1/L2 by every 6-row tile of A.
//
// Part of the per-ISA CPU kernel (AVX-512 build only): included by gemm.h inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE. The tiles carry target("avx512bf16"): the build flags of
// the AVX-512 copy do not include it, and callers reach them only where the CPU has it
// (cpu_has_avx512_bf16(), in vnni_engine).
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace dpbf16 {

constexpr int kMR = 6;                       // rows of A per tile
constexpr int kNR = 4;                       // 16-column vectors of B per tile
constexpr int64_t kPanel = 64;               // columns per panel of B
constexpr int64_t kPairStride = 2 * kPanel;  // elements between consecutive k pairs of a panel

// One MR x (16 NR) tile of C over KP pairs of A's columns; b[j] is the first pair of B's
// vector j (16 columns) of the tile, k pairs kPairStride elements apart.
template <int MR, int NR>
__attribute__((target("avx512f,avx512bf16"))) void tile(int64_t KP, const c10::BFloat16* a,
                                                        int64_t lda, const c10::BFloat16* const* b,
                                                        float* c, int64_t ldc, bool add) {
  // Every loop over MR and NR is unrolled so that the accumulators live in registers.
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j)
      acc[i][j] = add ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t q = 0; q < KP; ++q) {
    __m512bh bv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b[j] + q * kPairStride);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * lda + 2 * q, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

using TileFn = void (*)(int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16* const*, float*,
                        int64_t, bool);

// tiles[mr - 1][nr - 1] is tile<mr, nr>: the ragged edges of a product get their own tiles.
template <int... M, int... N>
constexpr auto make_tiles(std::integer_sequence<int, M...>, std::integer_sequence<int, N...>) {
  const auto row = [](auto m) {
    return std::array<TileFn, sizeof...(N)>{&tile<decltype(m)::value + 1, N + 1>...};
  };
  return std::array<std::array<TileFn, sizeof...(N)>, sizeof...(M)>{
      row(std::integral_constant<int, M>{})...};
}

inline const auto& tiles() {
  static constexpr auto t =
      make_tiles(std::make_integer_sequence<int, kMR>{}, std::make_integer_sequence<int, kNR>{});
  return t;
}

// C[M x N] (+)= A[M x 2 KP] * B for the operands described above, B's columns starting at its
// 16-column vector v_off: b points at the first k pair used of panel 0, panels panel_stride
// elements apart. N is rounded up to 16 here, so C must have room for that many columns
// (brgemm's contract).
inline void gemm(int64_t M, int64_t N, int64_t KP, const c10::BFloat16* a, int64_t lda,
                 const c10::BFloat16* b, int64_t panel_stride, int64_t v_off, float* c, int64_t ldc,
                 bool add) {
  constexpr int64_t kVecs = kPanel / 16;  // vectors per panel
  const int64_t nv = (N + 15) / 16;
  const auto& t = tiles();
  for (int64_t v0 = 0; v0 < nv; v0 += kNR) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, nv - v0));
    const c10::BFloat16* bv[kNR];
    for (int j = 0; j < nr; ++j) {
      const int64_t v = v_off + v0 + j;
      bv[j] = b + (v / kVecs) * panel_stride + (v % kVecs) * 32;
    }
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      t[mr - 1][nr - 1](KP, a + m0 * lda, lda, bv, c + m0 * ldc + 16 * v0, ldc, add);
    }
  }
}

}  // namespace dpbf16
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
