// Register-level helpers of the sm80 kernels: views of an mma.sync accumulator as (rows, cols),
// the accumulator-to-A-operand relayout (P and dS feed the next product from registers), the
// shared->register->tensor-core product loops, conversions and quad reductions.
//
// The m16n8k16 accumulator of a thread holds, per 16 x 8 tile, values (c0, c1) at row
// lane / 4 and columns 2 * (lane % 4) + {0, 1}, and (c2, c3) eight rows below; its A operand per
// 16 x 16 tile is two such accumulator tiles side by side. So an fp32 accumulator of shape
// ((2, 2), MMA_M, MMA_N) is, value for value, an A operand of shape ((2, 2, 2), MMA_M, MMA_N / 2)
// once converted to 16 bits.
#pragma once

#include <cute/tensor.hpp>

namespace aigc_ext {
namespace cuda {
namespace sm80 {

using namespace cute;

// ((2, 2), MMA_M, MMA_N) -> ((2, MMA_M), (2, MMA_N)): mode 0 the rows a thread holds, mode 1 its
// columns.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto rowcol_layout(Layout l) {
  static_assert(decltype(rank(l))::value == 3 && decltype(size<0>(l))::value == 4);
  auto d = logical_divide(l, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(d), get<1>(d)), make_layout(get<0, 0>(d), get<2>(d)));
}

template <class Tensor_>
CUTE_HOST_DEVICE auto rowcol(Tensor_&& t) {
  return make_tensor(t.data(), rowcol_layout(t.layout()));
}

// ((2, 2), MMA_M, MMA_N) accumulator -> ((2, 2, 2), MMA_M, MMA_N / 2) A operand (m16n8k16).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_to_a_layout(Layout l) {
  static_assert(decltype(size<0>(l))::value == 4 && decltype(size<2>(l))::value % 2 == 0);
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // ((2,2), M, (2, N/2))
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// The fp32 accumulator `acc` converted to Element, laid out as an A operand.
template <typename Element, class Acc>
__device__ __forceinline__ auto acc_to_a_operand(const Acc& acc) {
  Tensor r = make_tensor<Element>(acc_to_a_layout(acc.layout()));
  static_assert(decltype(size(r))::value % 2 == 0);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) r(i) = static_cast<Element>(acc(i));
  return r;
}

// acc += A B^T with both operands in shared memory (A: M x K, B: N x K, K contiguous), loaded
// slice by slice through ldmatrix, the next slice in flight while the current one multiplies.
template <class TiledMma, class Acc, class RA, class RB, class SA, class SB, class CopyA,
          class CopyB>
__device__ __forceinline__ void gemm_ss(TiledMma& mma, Acc& acc, RA& rA, RB& rB, const SA& sA,
                                        const SB& sB, const CopyA& copy_a, const CopyB& copy_b,
                                        int tid) {
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor rA_view = thr_a.retile_D(rA);
  Tensor rB_view = thr_b.retile_D(rB);
  static_assert(decltype(size<1>(rA))::value == decltype(size<1>(acc))::value);
  static_assert(decltype(size<1>(rB))::value == decltype(size<2>(acc))::value);
  static_assert(decltype(size<2>(rA))::value == decltype(size<2>(rB))::value);
  copy(copy_a, sA(_, _, 0), rA_view(_, _, 0));
  copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B^T with A in registers (an A-operand fragment) and B in shared memory.
template <class TiledMma, class Acc, class RA, class RB, class SB, class CopyB>
__device__ __forceinline__ void gemm_rs(TiledMma& mma, Acc& acc, const RA& rA, RB& rB, const SB& sB,
                                        const CopyB& copy_b, int tid) {
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor rB_view = thr_b.retile_D(rB);
  static_assert(decltype(size<1>(rA))::value == decltype(size<1>(acc))::value);
  static_assert(decltype(size<1>(rB))::value == decltype(size<2>(acc))::value);
  static_assert(decltype(size<2>(rA))::value == decltype(size<2>(rB))::value);
  copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// Max and sum over the four lanes of a quad (the lanes that share accumulator rows).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
