// The part of a product each row of C needs, for blocks whose rows see different keys.
//
// In a causal or windowed block of attention, query row i sees only keys [lo[i], hi[i]) of the
// block. Its scores S = Q K^T are needed at those columns only, and its row of P is zero outside
// them, so the product P V needs only those terms. The micro-kernels compute a block of rows
// (6 on AVX2 and AVX-512) over the union of its rows' ranges instead of the whole block's: at
// the causal diagonal and a window's edges that skips most of the triangle a block of rows
// leaves unused.
//
// Part of the per-ISA CPU kernel, inside aigc_ext::cpu::AIGC_ISA_NAMESPACE (see
// cpu/kernel_utils.h). It includes no torch header, so that a standalone program can time the
// micro-kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {

struct RowBand {
  enum class Kind : uint8_t {
    kNone,   // every row needs the whole product
    kCols,   // row i needs only C's columns [lo[i], hi[i]); the others are left unwritten
    kTerms,  // row i's entries of A are zero outside k in [lo[i], hi[i]): those terms are skipped
  };
  Kind kind = Kind::kNone;
  const int64_t* lo = nullptr;  // per row of C
  const int64_t* hi = nullptr;

  // The union [*begin, *end) of rows [i, i + rows)'s ranges, clamped to [0, limit); false
  // (nothing to compute) where it is empty.
  bool rows_range(int64_t i, int rows, int64_t limit, int64_t* begin, int64_t* end) const {
    int64_t b = limit, e = 0;
    for (int r = 0; r < rows; ++r) {
      if (hi[i + r] <= lo[i + r]) continue;
      b = std::min(b, lo[i + r]);
      e = std::max(e, hi[i + r]);
    }
    *begin = std::max<int64_t>(b, 0);
    *end = std::min(e, limit);
    return *begin < *end;
  }

  // Narrows the product of rows [i, i + rows) of C over its columns [*n_lo, *n_hi) (of N) and
  // the terms [*k_lo, *k_hi) (of K) to these rows' ranges; *n_lo stays a multiple of panel.
  // False where nothing is left to compute: no column of the rows' ranges, or no term with add
  // (C stays). With no term and no add the terms come back empty, and the product writes zeros.
  bool narrow(int64_t i, int rows, int64_t N, int64_t K, bool add, int64_t panel, int64_t* n_lo,
              int64_t* n_hi, int64_t* k_lo, int64_t* k_hi) const {
    int64_t lo, hi;
    if (kind == Kind::kCols) {
      if (!rows_range(i, rows, N, &lo, &hi)) return false;
      *n_lo = std::max(*n_lo, lo / panel * panel);
      *n_hi = std::min(*n_hi, hi);
      return *n_lo < *n_hi;
    }
    if (kind == Kind::kTerms) {
      const bool any = rows_range(i, rows, K, &lo, &hi);
      if (any) {
        *k_lo = std::max(*k_lo, lo);
        *k_hi = std::min(*k_hi, hi);
      }
      if (!any || *k_hi <= *k_lo) {
        *k_hi = *k_lo;
        return !add;
      }
    }
    return true;
  }
};

}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
