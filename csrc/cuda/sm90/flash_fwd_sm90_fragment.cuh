// Register-fragment helpers of the Hopper forward: the (row, column) view of a wgmma
// accumulator, its reuse as the register A operand of the next wgmma, a warpgroup GEMM with
// the fences in place, and the fast exp2.
#pragma once

#include <cutlass/numeric_conversion.h>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <type_traits>

namespace aigc_ext {
namespace cuda {
namespace sm90 {

// A 64xN wgmma accumulator fragment is ((2, 2, N/8), MMA_M, MMA_N): two adjacent columns, two
// rows eight apart, N/8 column groups of eight. As (rows, columns): ((2, MMA_M), (2, N/8, MMA_N)).
template <class Layout>
CUTE_HOST_DEVICE auto acc_rowcol(Layout l) {
  using namespace cute;
  static_assert(rank(Layout{}) == 3 && rank<0>(Layout{}) == 3);
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same registers as the A operand of a 16-bit register-A wgmma: two neighbouring groups of
// eight columns form one k-block of 16, ((2, 2, 2), MMA_M, K/16).
template <class Layout>
CUTE_HOST_DEVICE auto acc_as_a_operand(Layout l) {
  using namespace cute;
  static_assert(rank(Layout{}) == 3 && rank<0>(Layout{}) == 3);
  static_assert(size<0, 0>(Layout{}) == 2 && size<0, 1>(Layout{}) == 2);
  static_assert(size<0, 2>(Layout{}) % 2 == 0 && size<2>(Layout{}) == 1);
  constexpr int kGroups = decltype(size<0, 2>(Layout{}))::value;  // N/8
  static_assert(decltype(rank<0, 2>(Layout{}))::value == 1);
  const auto g = stride<0, 2>(l);
  // (2, N/16): the group within a k-block, then the k-block.
  auto k = make_layout(make_shape(_2{}, Int<kGroups / 2>{}), make_stride(g, g * _2{}));
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0>(k)), get<1>(l), get<1>(k));
}

// C (+)= A * B over all k-blocks on one warpgroup, asynchronously issued then waited for down to
// `kWaitPending` outstanding batches (-1: no wait). kZeroInit overwrites C.
template <bool kZeroInit, int kWaitPending, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, TA& a, TB const& b, TC& c) {
  using namespace cute;
  // A from registers (P of O = P V), or GMMA descriptors of shared memory (Q of S = Q K^T).
  constexpr bool kARegs = !std::is_same_v<typename TA::iterator, GMMA::DescriptorIterator>;
  if constexpr (kARegs) warpgroup_fence_operand(a);
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWaitPending >= 0) warpgroup_wait<kWaitPending>();
  warpgroup_fence_operand(c);
  if constexpr (kARegs) warpgroup_fence_operand(a);
}

// 2^x on the special-function unit (2^-inf = +0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Maximum / sum over the four threads of a quad (the threads that share an accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// x = softcap * tanh(scale * s / softcap) on every raw score (accurate tanh: the scores feed
// an exponential).
template <class TensorS>
__device__ __forceinline__ void apply_softcap(TensorS& S, float prescale, float softcap) {
  CUTE_UNROLL
  for (int i = 0; i < cute::size(S); ++i) S(i) = softcap * tanhf(S(i) * prescale);
}

// dst = src converted to dst's element type (both compact register fragments of one size).
template <class TensorDst, class TensorSrc>
__device__ __forceinline__ void convert_fragment(TensorDst& dst, const TensorSrc& src) {
  using namespace cute;
  using To = typename TensorDst::value_type;
  using From = typename TensorSrc::value_type;
  constexpr int N = decltype(size(src))::value;
  static_assert(decltype(size(dst))::value == N);
  static_assert(decltype(cosize(src.layout()))::value == N, "a compact fragment");
  static_assert(decltype(cosize(dst.layout()))::value == N, "a compact fragment");
  cutlass::NumericArrayConverter<To, From, N> convert;
  *reinterpret_cast<cutlass::Array<To, N>*>(dst.data()) =
      convert(*reinterpret_cast<const cutlass::Array<From, N>*>(src.data()));
}

// One step of the online softmax on the raw scores S_rc (rows, cols) of a key block:
// x = scale * s and exp(x - max) = 2^(s * scale_log2 - max * scale_log2). Updates the running
// row maxima and sums, replaces the scores by the unnormalised probabilities, and returns in
// `correction` the factor by which the rows of O accumulated so far must be multiplied.
template <int kRows, class TensorS>
__device__ __forceinline__ void online_softmax(TensorS& S_rc, float (&row_max)[kRows],
                                               float (&row_sum)[kRows], float (&correction)[kRows],
                                               float scale_log2) {
  using namespace cute;
  static_assert(decltype(size<0>(S_rc))::value == kRows);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    float m = row_max[r];
    CUTE_UNROLL
    for (int c = 0; c < size<1>(S_rc); ++c) m = fmaxf(m, S_rc(r, c));
    m = quad_max(m);
    // A row with no visible key so far keeps max -inf: subtract 0 so that 2^-inf = 0, no NaN.
    const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
    correction[r] = fast_exp2(row_max[r] * scale_log2 - m_scaled);
    row_max[r] = m;
    float sum = 0.f;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(S_rc); ++c) {
      const float p = fast_exp2(fmaf(S_rc(r, c), scale_log2, -m_scaled));
      S_rc(r, c) = p;
      sum += p;
    }
    row_sum[r] = row_sum[r] * correction[r] + sum;
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace aigc_ext
