// The AMX bf16 micro-kernel of the forward GEMMs: tile configuration, a 32 x 32 register
// block and the loop over it. Compiled into the AVX-512 kernel only (AIGC_EXT_AMX is 0 elsewhere)
// and used at run time only where the CPU and the OS allow AMX tiles.
//
// Part of the per-ISA CPU kernel: included by csrc/cpu/kernels.cpp only, inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE (see cpu/kernel_utils.h).
#pragma once

#include "cpu/kernel_utils.h"

// The AMX tile code needs the compiler's AMX intrinsics (GCC 11, clang 12 and later); without
// them bf16 GEMMs go through torch's brgemm only.
#if defined(CPU_CAPABILITY_AVX512) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define AIGC_EXT_AMX 1
#else
#define AIGC_EXT_AMX 0
#endif

#if AIGC_EXT_AMX
#include <ATen/cpu/Utils.h>
#include <cpuid.h>
#include <immintrin.h>

#include "cpu/amx_tiles.h"
#endif

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {

#if AIGC_EXT_AMX
// ------------------------------------------------------------------------------------------
// AMX bf16 micro-kernel
// ------------------------------------------------------------------------------------------
//
// The attention GEMMs are small and fixed-shape (a 128 x 64 query tile against 512 keys, then
// 128 x 512 probabilities against a 512 x 64 value tile), so a general GEMM library spends a
// large share of their time on per-call dispatch and tile reconfiguration. Here one tile
// configuration serves both products for a whole forward call: every tile register is
// 16 rows x 64 bytes, i.e. 16 x 32 bf16 for A, 16 pairs x 16 columns (VNNI) for B and
// 16 x 16 fp32 for C. A 32 x 32 block of C lives in tiles 0-3 across the whole K loop; tiles
// 4-5 hold two A row tiles and 6-7 two B column tiles.
//
// Operands must be padded by the caller: M and N to multiples of 16 (rows of A and columns of
// B beyond the real ones are read, their products are discarded), K to a multiple of 32 with
// zeros (those products are added).

inline bool cpu_has_amx_bf16() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
    // The kernel must also be allowed to use the tile state; torch asks the OS for it.
    return tile && bf16 && at::cpu::init_amx();
  }();
  return has;
}

__attribute__((target("amx-tile"))) void amx_configure() {
  const AmxTileConfig cfg = amx_full_tiles();
  amx_load_config(cfg);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// C[16*MT x 16*NT] (+)= A[16*MT x 32*ksteps] * B, B in VNNI panels of 16 columns
// ([k/2][16][2] each, the next panel `panel` elements further). Strides in elements.
template <int MT, int NT>
__attribute__((target("amx-tile,amx-bf16"))) void amx_block(const c10::BFloat16* a, int64_t lda,
                                                            const c10::BFloat16* b, int64_t panel,
                                                            int64_t ksteps, float* c, int64_t ldc,
                                                            bool add) {
  const int64_t sa = lda * 2, sb = 64, sc = ldc * 4;
  if (add) {
    _tile_loadd(0, c, sc);
    if constexpr (NT > 1) _tile_loadd(1, c + 16, sc);
    if constexpr (MT > 1) _tile_loadd(2, c + 16 * ldc, sc);
    if constexpr (MT > 1 && NT > 1) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (MT > 1) _tile_zero(2);
    if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  }
  for (int64_t ks = 0; ks < ksteps; ++ks) {
    const c10::BFloat16* ak = a + 32 * ks;
    const c10::BFloat16* bk = b + 512 * ks;  // 16 pairs x 16 columns x 2
    _tile_loadd(4, ak, sa);
    _tile_loadd(6, bk, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) {
      _tile_loadd(7, bk + panel, sb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MT > 1) {
      _tile_loadd(5, ak + 16 * lda, sa);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if constexpr (NT > 1) _tile_stored(1, c + 16, sc);
  if constexpr (MT > 1) _tile_stored(2, c + 16 * ldc, sc);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, c + 16 * ldc + 16, sc);
}

// C[M x N] (+)= A[M x 32*ksteps] * B for M, N multiples of 16; the tiles must be configured.
void amx_gemm(int64_t M, int64_t N, int64_t ksteps, const c10::BFloat16* a, int64_t lda,
              const c10::BFloat16* b, int64_t panel, float* c, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; i += 32) {
    const bool two_m = i + 16 < M;
    const c10::BFloat16* ai = a + i * lda;
    float* ci = c + i * ldc;
    for (int64_t j = 0; j < N; j += 32) {
      const bool two_n = j + 16 < N;
      const c10::BFloat16* bj = b + (j / 16) * panel;
      if (two_m && two_n) {
        amx_block<2, 2>(ai, lda, bj, panel, ksteps, ci + j, ldc, add);
      } else if (two_m) {
        amx_block<2, 1>(ai, lda, bj, panel, ksteps, ci + j, ldc, add);
      } else if (two_n) {
        amx_block<1, 2>(ai, lda, bj, panel, ksteps, ci + j, ldc, add);
      } else {
        amx_block<1, 1>(ai, lda, bj, panel, ksteps, ci + j, ldc, add);
      }
    }
  }
}
#endif

}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
