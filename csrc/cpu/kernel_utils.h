// The building blocks every part of the per-ISA CPU kernel uses: element and accumulator types,
// cache-aligned scratch, per-thread buffers, the task scheduler, NaN-aware maxima and row
// conversions between bf16/fp16 and fp32.
//
// The kernel is compiled once per instruction set (see CMakeLists.txt): csrc/cpu/kernels.cpp,
// with AIGC_ISA_NAMESPACE and CPU_CAPABILITY_<ISA> set by the build, includes the headers of
// its parts (gemm.h, amx.h, softmax_rows.h, decode.h, forward.h, backward.h), each of which
// sees ATen's Vectorized<T> for that instruction set. Their code sits in an unnamed namespace
// within aigc_ext::cpu::<isa>: private to that translation unit, as one file would have it, so
// that every copy is self-contained and the compiler inlines as it would within one file.
//
// Part of the per-ISA CPU kernel: included by csrc/cpu/kernels.cpp only, inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE (see cpu/kernel_utils.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/attention.h"

#ifndef AIGC_ISA_NAMESPACE
#error "AIGC_ISA_NAMESPACE must be defined by the build (one of default_, avx2, avx512)"
#endif

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {

using at::vec::Vectorized;

template <typename T>
constexpr bool kReduced = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Allocator for the kernel's scratch and packed operands: 64-byte (cache line) alignment. With
// malloc's 16-byte alignment every 64-byte row of an AMX tile, and every 64-byte vector load or
// store, would straddle two cache lines; on AMX that makes a tile load several times slower
// (benchmarks/amx_probe.cpp measures both).
template <typename T>
struct CacheAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const {
    return false;
  }
};
template <typename T>
using AlignedVector = std::vector<T, CacheAligned<T>>;

// Tuning knobs read once from the environment (documented in README.md).
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  const int64_t x = v ? std::atoll(v) : 0;
  return x > 0 ? x : fallback;
}

template <typename A>
constexpr A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// max(a, b), NaN when either is: a NaN score must reach its row's output, as in torch's softmax
// (std::max(a, NaN) is a, which would drop it).
template <typename A>
inline A max_nan(A a, A b) {
  return (a > b || a != a) ? a : b;
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 elements as fp32, lanes past the mask read as 0. Widening is exact: bf16 is the top half of
// an fp32; fp16 has a hardware conversion.
inline __m512 load16_f32(const float* v, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, v); }
inline __m512 load16_f32(const c10::BFloat16* v, __mmask16 mk) {
  const __m256i h = _mm256_maskz_loadu_epi16(mk, v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16_f32(const c10::Half* v, __mmask16 mk) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, v));
}
#endif

template <typename S, typename D>
inline void convert_row(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(dst, src, sizeof(S) * n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<D, float> && kReduced<S>) {
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mk = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - i)) - 1);
        _mm512_mask_storeu_ps(dst + i, mk, load16_f32(src + i, mk));
      }
      return;
    }
#endif
    at::vec::convert(src, dst, n);
  }
}

// A per-thread buffer of at least n elements that survives across calls, so that steady-state
// calls neither allocate nor page-fault. Distinct kSlot values give distinct buffers; the buffer
// may be larger than asked, so callers always pass explicit lengths. Slots are shared between
// element types that coincide (T = float = A), so every use needs its own slot number.
template <typename X, int kSlot>
X* thread_buffer(int64_t n) {
  thread_local AlignedVector<X> v;
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// Runs fn(begin, end) on every thread, handing out tasks [0, n) one at a time from a shared
// counter, so uneven tasks (causal attention) balance across cores.
template <typename Fn>
void parallel_tasks(int64_t n, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n, 1));
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) { fn(next); });
}

}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
