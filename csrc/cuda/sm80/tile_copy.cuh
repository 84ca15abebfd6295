// Global <-> shared tile copies with bounds: a (kRows x kCols) tile of rows `ld` elements apart,
// of which rows [0, rows) and columns [0, cols) exist; everything else is zero-filled on loads
// and left alone on stores.
//
// Loads go through cp.async (16 bytes, zero-fill for chunks out of range) when the tile is
// vector-friendly: cols and every stride a multiple of 8 elements (the base pointers are
// 16-byte aligned by contract). Otherwise each element is read on its own (synchronously; a
// __syncthreads before use makes it visible like the asynchronous ones).
#pragma once

#include <cstdint>
#include <cute/tensor.hpp>

namespace aigc_ext {
namespace cuda {
namespace sm80 {

using namespace cute;

template <class GmemCopy, typename Element, class SmemTensor>
__device__ __forceinline__ void load_tile(const Element* g, int64_t ld, int rows, int cols,
                                          bool vec, SmemTensor& s, int tid) {
  auto thr = GmemCopy{}.get_thread_slice(tid);
  Tensor gT =
      make_tensor(make_gmem_ptr(g), make_shape(size<0>(s), size<1>(s)), make_stride(ld, Int<1>{}));
  Tensor cT = make_identity_tensor(make_shape(size<0>(s), size<1>(s)));
  Tensor tS = thr.partition_S(gT);
  Tensor tD = thr.partition_D(s);
  Tensor tC = thr.partition_S(cT);
  static_assert(decltype(size<0>(tD))::value == 8);
  // The vector test outside the loops: one branch per tile, not one per chunk (a per-chunk
  // branch keeps both paths' addresses and predicates live).
  if (vec) {
    CUTE_UNROLL
    for (int m = 0; m < size<1>(tD); ++m) {
      const bool row_ok = get<0>(tC(0, m, 0)) < rows;
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tD); ++k) {
        const bool ok = row_ok && get<1>(tC(0, m, k)) < cols;
        // An out-of-range chunk reads nothing (size 0) but needs a valid address: the base.
        const Element* src = ok ? &tS(0, m, k) : g;
        SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
            *reinterpret_cast<const cute::uint128_t*>(src),
            *reinterpret_cast<cute::uint128_t*>(&tD(0, m, k)), ok);
      }
    }
  } else {
    // The rare unaligned case, rolled: its addresses are computed as it goes rather than held.
#pragma unroll 1
    for (int m = 0; m < size<1>(tD); ++m) {
      const bool row_ok = get<0>(tC(0, m, 0)) < rows;
#pragma unroll 1
      for (int k = 0; k < size<2>(tD); ++k) {
        const int c = get<1>(tC(0, m, k));
        CUTE_UNROLL
        for (int v = 0; v < 8; ++v) {
          tD(v, m, k) = row_ok && c + v < cols ? (&tS(0, m, k))[v] : Element(0.f);
        }
      }
    }
  }
}

// Rows [0, rows) x columns [0, cols) of the shared tile to global memory.
template <class GmemCopy, typename Element, class SmemTensor>
__device__ __forceinline__ void store_tile(Element* g, int64_t ld, int rows, int cols, bool vec,
                                           const SmemTensor& s, int tid) {
  auto thr = GmemCopy{}.get_thread_slice(tid);
  Tensor gT =
      make_tensor(make_gmem_ptr(g), make_shape(size<0>(s), size<1>(s)), make_stride(ld, Int<1>{}));
  Tensor cT = make_identity_tensor(make_shape(size<0>(s), size<1>(s)));
  Tensor tS = thr.partition_S(s);
  Tensor tD = thr.partition_D(gT);
  Tensor tC = thr.partition_S(cT);
  if (vec) {
    CUTE_UNROLL
    for (int m = 0; m < size<1>(tS); ++m) {
      if (get<0>(tC(0, m, 0)) >= rows) continue;
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tS); ++k) {
        if (get<1>(tC(0, m, k)) < cols) {
          *reinterpret_cast<cute::uint128_t*>(&tD(0, m, k)) =
              *reinterpret_cast<const cute::uint128_t*>(&tS(0, m, k));
        }
      }
    }
  } else {
#pragma unroll 1
    for (int m = 0; m < size<1>(tS); ++m) {
      if (get<0>(tC(0, m, 0)) >= rows) continue;
#pragma unroll 1
      for (int k = 0; k < size<2>(tS); ++k) {
        const int c = get<1>(tC(0, m, k));
        CUTE_UNROLL
        for (int v = 0; v < 8; ++v) {
          if (c + v < cols) (&tD(0, m, k))[v] = tS(v, m, k);
        }
      }
    }
  }
}

// An fp32 accumulator (partitioned by the tiled MMA over a tile of the shared tensor's shape)
// converted to Element and written into the shared tensor.
template <class TiledMma, class Acc, class SmemTensor>
__device__ __forceinline__ void acc_to_smem(const TiledMma& mma, const Acc& acc, SmemTensor& s,
                                            int tid) {
  using Element = typename SmemTensor::value_type;
  auto thr = mma.get_thread_slice(tid);
  Tensor cT = thr.partition_C(make_identity_tensor(make_shape(size<0>(s), size<1>(s))));
  static_assert(decltype(size(cT))::value == decltype(size(acc))::value);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    s(get<0>(cT(i)), get<1>(cT(i))) = static_cast<Element>(acc(i));
  }
}

// Whether a tile of rows `stride_l` apart starting at `p` suits 16-byte accesses (base pointers
// are 16-byte aligned by contract; the batch and head offsets are checked with the strides).
__device__ __forceinline__ bool vec_ok(int cols, int64_t sb, int64_t sh, int64_t sl) {
  return cols % 8 == 0 && sb % 8 == 0 && sh % 8 == 0 && sl % 8 == 0;
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
