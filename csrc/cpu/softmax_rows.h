// Row operations of the online softmax, vectorised over keys: row maxima that keep NaN,
// vectorised exponentials (AVX-512 polynomials, ATen's elsewhere), fused exp-sum-convert passes,
// row scaling and down-conversion, and the application of the scale and the user mask.
//
// Part of the per-ISA CPU kernel: included by csrc/cpu/kernels.cpp only, inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE (see cpu/kernel_utils.h).
#pragma once

#include <cmath>

#include "cpu/kernel_utils.h"

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {

// A running maximum m beyond this magnitude is subtracted exactly: the fused exponential
// passes compute s * scale - m with one FMA, which differs from fl(s * scale) - m by up to
// about |m| * eps; below the bound that is a few hundredths (a common factor, cancelled by the
// normalisation), far above it the exponentials overflow or underflow. 2^17 for fp32.
template <typename A>
constexpr A kExactShift = A(1) / (64 * std::numeric_limits<A>::epsilon());

// tanh(x) ~= x P(x^2) / Q(x^2) for |x| <= kTanhClamp (where tanh rounds to 1 in fp32; beyond, x is
// clamped): a rational fit of degree 4 over 4 in x^2, minimising the relative error (5.7e-9 in
// exact arithmetic, 3 ulp evaluated in fp32). Unlike 1 - 2 / (e^(2x) + 1) it keeps its relative
// accuracy for small |x|, where a softcap far above the scores puts them. Q has no zero on the
// real line's positive half (its roots are at x^2 < 0).
constexpr float kTanhClamp = 7.90531110763549805f;
constexpr float kTanhP[5] = {1.f, 0.134502917528152f, 3.57859418727457523e-3f, 2.20163110498106e-5f,
                             1.541727456810804e-8f};
constexpr float kTanhQ[5] = {1.f, 0.467836201190948f, 2.619074285030365e-2f, 3.4229850280098617e-4f,
                             8.59465615121735e-7f};
// For |x| <= 1/2 (x^2 <= kTanhSmallSq), where a softcap well above the scores puts nearly all of
// them: tanh(x) ~= x + x^3 R(x^2), R of degree 3 fitted to the relative error (under 1 ulp in
// fp32, at every x in the range). Half the instructions of the rational fit, no division; the
// vector versions take it when all their lanes are in range.
constexpr float kTanhSmallSq = 0.25f;
constexpr float kTanhSmall[4] = {-0.333331794f, 0.133269161f, -0.0531272739f, 0.0174319521f};

// One polynomial tier of the fused softcap: where s^2 <= bound for every score s of a pass, the
// base-2 exponent softcap * log2e * tanh(s * scale / softcap) is s * (scale * log2e + s^2 P(s^2))
// within the tier's accuracy, P of degree kTerms - 1 (coefficients p, lowest first), folded into
// the exponent's FMA. x_bound = scale * sqrt(bound) bounds |s * scale| on the tier.
struct SoftcapTier {
  float p[4] = {};     // unused terms stay 0 (the bf16 tier has two)
  float bound = -1.f;  // < 0: never taken; finite, so that infinite scores fail the test
  float x_bound = -1.f;

  // The tier's base-2 exponent for one score s on the tier, scale2 = scale * log2e and shift2 =
  // shift * log2e (the vector passes' scalar twin).
  float exponent2(float s, float scale2, float shift2) const {
    const float t = s * s;
    const float poly = ((p[3] * t + p[2]) * t + p[1]) * t + p[0];
    return s * (scale2 + t * poly) - shift2;
  }
};

// The softcap as the forward's fused row pass takes it: softcap * tanh(s * scale / softcap),
// prepared once per call, y = s * scale / softcap. Two polynomial tiers (SoftcapTier):
// - bf16 probabilities: tanh's Taylor polynomial y - y^3 / 3 + 2 y^5 / 15, whose error is at most
//   17 |y|^7 / 315 for |y| <= 1/2 (the series alternates with shrinking terms), kept to where the
//   exponent's error stays under 2^-12 (a relative error of p under 2^-12 ln 2, a sixteenth of
//   bf16's rounding): |s * scale| <= 8.1 for softcap 30 and scale 1/sqrt(64);
// - fp32 probabilities: y + y^3 R(y^2) with the fit kTanhSmall (under 1 ulp for |y| <= 1/2).
// Other passes take the full tanh (tanh_avx512, tanh_avx2).
struct FusedSoftcap {
  float cap = 0.f;  // 0: no softcap
  SoftcapTier bf16, f32;
  // The caller's lazy-rescaling bound: a pass whose bound on max(x) exceeds it reports the true
  // maximum instead (see row_exp_sum_tier_avx512).
  float lazy_max = 0.f;

  FusedSoftcap() = default;
  FusedSoftcap(float scale, float softcap, float lazy) : cap(softcap), lazy_max(lazy) {
    if (!(softcap > 0) || !(scale > 0)) return;
    constexpr double kTol = 1.0 / 4096, kLog2eD = 1.44269504088896341;
    const double c = softcap, sc = scale, r = sc / c, r2 = r * r;
    const auto finish = [&](SoftcapTier& tier, double y_max) {
      const double s_max = y_max * c / sc;
      tier.bound =
          static_cast<float>(std::min<double>(s_max * s_max, std::numeric_limits<float>::max()));
      tier.x_bound = static_cast<float>(y_max * c);
    };
    // softcap * log2e * y^3 * a_i y^(2i) = s^3 * (log2e * scale * r^2 * a_i r^(2i)) s^(2i).
    const double k3 = kLog2eD * sc * r2;
    bf16.p[0] = static_cast<float>(-k3 / 3);
    bf16.p[1] = static_cast<float>(k3 * r2 * 2 / 15);
    finish(bf16, std::min(0.5, std::pow(kTol * 315 / (17 * c * kLog2eD), 1.0 / 7)));
    double ri = 1;
    for (int t = 0; t < 4; ++t, ri *= r2) f32.p[t] = static_cast<float>(k3 * kTanhSmall[t] * ri);
    finish(f32, 0.5);
  }

  // softcap * tanh(x / softcap) for a scaled score x (a row's maximum): the bf16 tier's
  // polynomial where it holds (the row maximum is a shift: its accuracy is immaterial), libm's
  // tanh elsewhere (NaN stays NaN, -inf gives -softcap).
  float capped(float x) const {
    if (std::abs(x) <= bf16.x_bound) {
      const float y2 = x * x / (cap * cap);
      return x * (1.f + y2 * (-1.f / 3 + y2 * (2.f / 15)));
    }
    return cap * std::tanh(x / cap);
  }
};

// ------------------------------------------------------------------------------------------
// Row operations of the online softmax (vectorised over keys)
// ------------------------------------------------------------------------------------------

// The maximum of s[0, n): NaN if any s[i] is NaN, -inf for n = 0 or a row of -inf (all hidden).
// A NaN maximum keeps a row whose other scores are all masked from being skipped as empty.
template <typename A>
inline A row_max(const A* s, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    // Four independent maxima: one chain would wait out vmaxps's latency at every vector.
    // vmaxps drops NaN, so NaN is tracked beside it: an unordered compare is true where either
    // operand is NaN, one compare for two vectors.
    const __m512 lowest = _mm512_set1_ps(neg_inf<float>());
    __m512 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
      const __m512 x0 = _mm512_loadu_ps(s + i), x1 = _mm512_loadu_ps(s + i + 16);
      const __m512 x2 = _mm512_loadu_ps(s + i + 32), x3 = _mm512_loadu_ps(s + i + 48);
      m0 = _mm512_max_ps(m0, x0);
      m1 = _mm512_max_ps(m1, x1);
      m2 = _mm512_max_ps(m2, x2);
      m3 = _mm512_max_ps(m3, x3);
      nan |= _mm512_cmp_ps_mask(x0, x1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x2, x3, _CMP_UNORD_Q);
    }
    for (; i < n; i += 16) {
      const __mmask16 k = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - i)) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(k, s + i);
      m0 = _mm512_mask_max_ps(m0, k, m0, x);
      nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    }
    if (nan) return std::numeric_limits<float>::quiet_NaN();
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  }
#endif
  using Vec = Vectorized<A>;
  A m = neg_inf<A>();
  int64_t i = 0;
  if (n >= Vec::size()) {
    Vec vm(neg_inf<A>());
    for (; i + Vec::size() <= n; i += Vec::size()) {
      vm = at::vec::maximum(vm, Vec::loadu(s + i));
    }
    m = at::vec::vec_reduce_all<A>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vm);
  }
  for (; i < n; ++i) m = max_nan(m, s[i]);
  return m;
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// The end of a softcap tier's pass (row_exp_sum_tier_avx512, row_exp_sum_tier_avx2), given the
// largest s^2 of its n scores s: false where a score lies beyond the tier (or is infinite),
// else true with *xmax the pass's max(x) in nats. The exponent at sqrt(max s^2) bounds it (x is
// increasing in s on the tier) and stands for it, unless it exceeds lazy_max, where the caller
// redoes the row against the new maximum: then the true maximum is taken.
inline bool tier_top_exponent(const SoftcapTier& tier, float t_top, float scale, float shift,
                              const float* s, int64_t n, float lazy_max, float* xmax) {
  if (!(t_top <= tier.bound)) return false;
  const auto nats = [&](float x) {
    return tier.exponent2(x, scale * kLog2e, shift * kLog2e) * kLn2;
  };
  float x_top = nats(std::sqrt(t_top));
  if (x_top > lazy_max) x_top = nats(row_max(s, n));  // the true maximum: the new shift
  *xmax = x_top;
  return true;
}

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) for 16 floats: x = n*ln2 + r with |r| <= ln2/2 (ln2 split in two for the reduction),
// e^r by its Taylor polynomial of degree 6 (relative error ~1e-7), 2^n applied with vscalefps.
// Inputs at or below -87 give exactly 0 (-inf included), never a denormal (see exp2_avx512); NaN
// propagates. Used where the exponentials are stored in fp32 outside the forward's fused row
// pass.
inline __m512 exp_avx512(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_NLE_UQ);
  x = _mm512_min_ps(_mm512_set1_ps(88.5f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 720), r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

inline bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// 2^x for 16 floats: x = n + f with |f| <= 1/2, 2^f by a minimax polynomial of degree kDegree
// (4: relative error 2.7e-6, for probabilities rounded to bf16 next, far below half an ulp;
// 5: 2.3e-7 evaluated in fp32, for fp32 probabilities), 2^n applied with vscalefps. Inputs at or
// below -125.5 give exactly 0 (-inf included), never a denormal: denormal probabilities would
// send every FMA of the P V product that reads them through a microcode assist (a window's
// hidden keys, -inf, made the forward 4x slower). NaN propagates (the unordered compare keeps its
// lane); large inputs give +inf (the caller redoes such rows against a larger maximum).
// kFlush = false leaves out the flush for callers whose inputs are known to stay above -120.
template <int kDegree, bool kFlush = true>
inline __m512 exp2_avx512(__m512 x) {
  static_assert(kDegree == 4 || kDegree == 5);
  const __mmask16 normal =
      kFlush ? _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.5f), _CMP_NLE_UQ) : __mmask16(0xFFFF);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p;
  if constexpr (kDegree == 4) {
    p = _mm512_fmadd_ps(_mm512_set1_ps(0.00957008265f), f, _mm512_set1_ps(0.0559178442f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240247443f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693121791f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999999285f));
  } else {
    p = _mm512_fmadd_ps(_mm512_set1_ps(0.0013276462f), f, _mm512_set1_ps(0.00967554003f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0555071346f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240221202f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693146944f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000012f));
  }
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// tanh for 16 floats on the rational fit above; the division as vrcp14ps and one Newton step
// (relative error ~2^-23; vdivps would cost more than the rest of the softcap). The clamp keeps
// NaN (vminps/vmaxps return their second operand when one is NaN).
inline __m512 tanh_avx512(__m512 x) {
  {
    const __m512 t = _mm512_mul_ps(x, x);  // NaN and +-inf fail the test: the full fit below
    if (_mm512_cmp_ps_mask(t, _mm512_set1_ps(kTanhSmallSq), _CMP_LE_OQ) == 0xFFFF) {
      __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(kTanhSmall[3]), t, _mm512_set1_ps(kTanhSmall[2]));
      r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kTanhSmall[1]));
      r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kTanhSmall[0]));
      return _mm512_fmadd_ps(_mm512_mul_ps(x, t), r, x);
    }
  }
  x = _mm512_max_ps(_mm512_set1_ps(-kTanhClamp), _mm512_min_ps(_mm512_set1_ps(kTanhClamp), x));
  // Estrin's scheme in x^2 and x^4: shorter dependency chains than Horner's.
  const __m512 x2 = _mm512_mul_ps(x, x), x4 = _mm512_mul_ps(x2, x2);
  const auto poly = [&](const float* c) {
    const __m512 lo = _mm512_fmadd_ps(_mm512_set1_ps(c[1]), x2, _mm512_set1_ps(c[0]));
    const __m512 hi = _mm512_fmadd_ps(_mm512_set1_ps(c[3]), x2, _mm512_set1_ps(c[2]));
    return _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(c[4]), x4, hi), x4, lo);
  };
  const __m512 p = poly(kTanhP), q = poly(kTanhQ);
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(1.f)), r);
  return _mm512_mul_ps(_mm512_mul_ps(x, p), r);
}

// Probabilities of the fused row passes stored as T (bf16, by the hardware conversion, or fp32):
// 32 from two vectors, or the lanes k of one.
template <typename T>
__attribute__((target("avx512bf16"))) inline void store_probs32(T* out, __m512 e0, __m512 e1) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
  } else {
    _mm512_storeu_ps(out, e0);
    _mm512_storeu_ps(out + 16, e1);
  }
}
template <typename T>
__attribute__((target("avx512bf16"))) inline void store_probs_tail(T* out, __mmask16 k, __m512 e) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm256_mask_storeu_epi16(out, k, (__m256i)_mm512_cvtneps_pbh(e));
  } else {
    _mm512_mask_storeu_ps(out, k, e);
  }
}

// The fused row pass of the forward for bf16 (hardware conversion) and fp32 probabilities:
// out[i] = exp(x[i]) rounded to T, the fp32 sum returned, max(x[i]) in *xmax, where x[i] =
// s[i] * scale - shift, or softcap * tanh(s[i] * scale / softcap) - shift when softcap > 0.
// Computed in base 2, 2^(x * log2e), which saves the range reduction's multiply. Marked
// avx512bf16 for the bf16 conversion; the fp32 instantiation contains no bf16 instruction and
// runs on any AVX-512 CPU.
template <typename T, bool kCap>
__attribute__((target("avx512bf16"))) inline float row_exp_sum_avx512(const float* s, int64_t n,
                                                                      float scale, float shift,
                                                                      float softcap, T* out,
                                                                      float* xmax) {
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  static_assert(kBf16 || std::is_same_v<T, float>);
  constexpr int kDegree = kBf16 ? 4 : 5;
  const __m512 vscale = _mm512_set1_ps(scale * kLog2e), vshift = _mm512_set1_ps(shift * kLog2e);
  const __m512 vinv = _mm512_set1_ps(kCap ? scale / softcap : 0.f);
  const __m512 vcap = _mm512_set1_ps(softcap * kLog2e);
  const auto exponent = [&](__m512 x) {
    if constexpr (kCap) {
      return _mm512_fmsub_ps(tanh_avx512(_mm512_mul_ps(x, vinv)), vcap, vshift);
    } else {
      return _mm512_fmsub_ps(x, vscale, vshift);
    }
  };
  // Two sums and two maxima: independent chains for the two halves of each step.
  __m512 vsum = _mm512_setzero_ps(), vsum1 = _mm512_setzero_ps();
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vmax1 = vmax;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 x0 = exponent(_mm512_loadu_ps(s + i));
    const __m512 x1 = exponent(_mm512_loadu_ps(s + i + 16));
    vmax = _mm512_max_ps(vmax, x0);
    vmax1 = _mm512_max_ps(vmax1, x1);
    const __m512 e0 = exp2_avx512<kDegree>(x0);
    const __m512 e1 = exp2_avx512<kDegree>(x1);
    vsum = _mm512_add_ps(vsum, e0);
    vsum1 = _mm512_add_ps(vsum1, e1);
    store_probs32(out + i, e0, e1);
  }
  for (; i < n; i += 16) {
    const int64_t r = std::min<int64_t>(16, n - i);
    const __mmask16 k = static_cast<__mmask16>((1u << r) - 1);
    const __m512 x = exponent(_mm512_maskz_loadu_ps(k, s + i));
    vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
    const __m512 e = _mm512_maskz_mov_ps(k, exp2_avx512<kDegree>(x));
    vsum = _mm512_add_ps(vsum, e);
    store_probs_tail(out + i, k, e);
  }
  *xmax = _mm512_reduce_max_ps(_mm512_max_ps(vmax, vmax1)) * kLn2;
  return _mm512_reduce_add_ps(_mm512_add_ps(vsum, vsum1));
}

// A softcap tier's pass (SoftcapTier, FusedSoftcap) for bf16 or fp32 probabilities:
// row_exp_sum_avx512's contract with x[i] = s[i] * (scale' + s[i]^2 P(s[i]^2)) - shift, in base
// 2: 1 + kTerms instructions a vector over the pass without a softcap (s^2 and the FMAs of the
// slope), against 9 or more for tanh. The maximum of s^2 it tracks instead of max(x) both tests
// the tier and bounds the exponents (x is increasing in s on the tier, so x(sqrt(max s^2)) >=
// max(x)). That bound stands for max(x) unless it exceeds fcap.lazy_max, where the caller redoes
// the row against the new maximum: then the true maximum is taken (a pass of row_max; such rows
// are rare). Returns false, with out partly written, where a score lies beyond the tier (or is
// infinite): the caller takes the full pass instead. kFlush = false leaves out the underflow
// flush, for callers whose tier keeps the exponents above -120.
template <typename T, bool kFlush>
__attribute__((target("avx512bf16"))) inline bool row_exp_sum_tier_avx512(const float* s, int64_t n,
                                                                          float scale, float shift,
                                                                          const SoftcapTier& tier,
                                                                          float lazy_max, T* out,
                                                                          float* xmax, float* sum) {
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  static_assert(kBf16 || std::is_same_v<T, float>);
  constexpr int kTerms = kBf16 ? 2 : 4, kDegree = kBf16 ? 4 : 5;
  const __m512 vscale = _mm512_set1_ps(scale * kLog2e), vshift = _mm512_set1_ps(shift * kLog2e);
  __m512 vp[kTerms];
  for (int c = 0; c < kTerms; ++c) vp[c] = _mm512_set1_ps(tier.p[c]);
  const auto exponent = [&](__m512 x, __m512 t) {
    __m512 poly = vp[kTerms - 1];
    for (int c = kTerms - 2; c >= 0; --c) poly = _mm512_fmadd_ps(poly, t, vp[c]);
    return _mm512_fmsub_ps(x, _mm512_fmadd_ps(poly, t, vscale), vshift);
  };
  // vmaxps returns its second operand where one is NaN: with the new value first, the running
  // maxima of s^2 never turn NaN and keep an infinite score's +inf (NaN scores give NaN either
  // way).
  __m512 vsum = _mm512_setzero_ps(), vsum1 = vsum, tmax = vsum, tmax1 = vsum;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 s0 = _mm512_loadu_ps(s + i), s1 = _mm512_loadu_ps(s + i + 16);
    const __m512 t0 = _mm512_mul_ps(s0, s0), t1 = _mm512_mul_ps(s1, s1);
    tmax = _mm512_max_ps(t0, tmax);
    tmax1 = _mm512_max_ps(t1, tmax1);
    const __m512 e0 = exp2_avx512<kDegree, kFlush>(exponent(s0, t0));
    const __m512 e1 = exp2_avx512<kDegree, kFlush>(exponent(s1, t1));
    vsum = _mm512_add_ps(vsum, e0);
    vsum1 = _mm512_add_ps(vsum1, e1);
    store_probs32(out + i, e0, e1);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(k, s + i), t = _mm512_mul_ps(x, x);
    tmax = _mm512_max_ps(t, tmax);
    const __m512 e = _mm512_maskz_mov_ps(k, exp2_avx512<kDegree, kFlush>(exponent(x, t)));
    vsum = _mm512_add_ps(vsum, e);
    store_probs_tail(out + i, k, e);
  }
  const float t_top = _mm512_reduce_max_ps(_mm512_max_ps(tmax, tmax1));
  if (!tier_top_exponent(tier, t_top, scale, shift, s, n, lazy_max, xmax)) return false;
  *sum = _mm512_reduce_add_ps(_mm512_add_ps(vsum, vsum1));
  return true;
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// 2^x for 8 floats: x = n + f with |f| <= 1/2, 2^f by the degree-5 minimax polynomial of
// exp2_avx512 (relative error 2.3e-7), 2^n built in the exponent field. One addition rounds x
// to n and biases it at once: t = x + (1.5 * 2^23 + 127) holds n + 127 in its low mantissa
// bits, which a shift moves into the exponent field (AVX2 has no vscalefps). Inputs below -127
// give 0 (-inf included); NaN propagates (vmaxps returns its second operand for NaN). Inputs
// must stay below 128: the forward's callers redo any row whose exponents reach kLazyMax.
inline __m256 exp2_avx2(__m256 x) {
  const __m256 magic = _mm256_set1_ps(12583039.f);  // 1.5 * 2^23 + 127
  x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);
  const __m256 t = _mm256_add_ps(x, magic);
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(0.0013276462f), f, _mm256_set1_ps(0.00967554003f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.0555071346f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.240221202f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.693146944f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.00000012f));
  // 2^n: the biased exponent n + 127, in [0, 254] for n in [-127, 127], 0 flushing to zero.
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// tanh for 8 floats on the rational fit above (vdivps ymm is cheap enough here). The clamp keeps
// NaN (vminps/vmaxps return their second operand when one is NaN).
inline __m256 tanh_avx2(__m256 x) {
  {
    const __m256 t = _mm256_mul_ps(x, x);  // NaN and +-inf fail the test: the full fit below
    if (_mm256_movemask_ps(_mm256_cmp_ps(t, _mm256_set1_ps(kTanhSmallSq), _CMP_LE_OQ)) == 0xFF) {
      __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(kTanhSmall[3]), t, _mm256_set1_ps(kTanhSmall[2]));
      r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(kTanhSmall[1]));
      r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(kTanhSmall[0]));
      return _mm256_fmadd_ps(_mm256_mul_ps(x, t), r, x);
    }
  }
  x = _mm256_max_ps(_mm256_set1_ps(-kTanhClamp), _mm256_min_ps(_mm256_set1_ps(kTanhClamp), x));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kTanhP[4]), x2, _mm256_set1_ps(kTanhP[3]));
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(kTanhQ[4]), x2, _mm256_set1_ps(kTanhQ[3]));
  for (int c = 2; c >= 0; --c) {
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kTanhP[c]));
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(kTanhQ[c]));
  }
  return _mm256_div_ps(_mm256_mul_ps(x, p), q);
}

// The forward's fused row pass on AVX2 (row_exp_sum_to's contract, softcap included): out[i] =
// exp(x[i]) rounded to T, the fp32 sum returned, max(x[i]) in *xmax. Computed as
// 2^(x * log2e), one FMA for the exponent without a softcap; 16 scores a step, two independent
// sums and maxima.
template <typename T, bool kCap>
inline float row_exp_sum_avx2(const float* s, int64_t n, float scale, float shift, float softcap,
                              T* out, float* xmax) {
  const __m256 vscale = _mm256_set1_ps(scale * kLog2e);
  const __m256 vshift = _mm256_set1_ps(shift * kLog2e);
  const __m256 vinv = _mm256_set1_ps(kCap ? scale / softcap : 0.f);
  const __m256 vcap = _mm256_set1_ps(softcap * kLog2e);
  const auto exponent = [&](__m256 x) {
    if constexpr (kCap) {
      return _mm256_fmsub_ps(tanh_avx2(_mm256_mul_ps(x, vinv)), vcap, vshift);
    } else {
      return _mm256_fmsub_ps(x, vscale, vshift);
    }
  };
  const __m256 lowest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vsum = _mm256_setzero_ps(), vsum1 = vsum, vmax = lowest, vmax1 = lowest;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = exponent(_mm256_loadu_ps(s + i));
    const __m256 x1 = exponent(_mm256_loadu_ps(s + i + 8));
    vmax = _mm256_max_ps(vmax, x0);
    vmax1 = _mm256_max_ps(vmax1, x1);
    const __m256 e0 = exp2_avx2(x0), e1 = exp2_avx2(x1);
    vsum = _mm256_add_ps(vsum, e0);
    vsum1 = _mm256_add_ps(vsum1, e1);
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(out + i, e0);
      _mm256_storeu_ps(out + i + 8, e1);
    } else {
      at::vec::convert_from_float<T>(Vectorized<float>(e0), Vectorized<float>(e1)).store(out + i);
    }
  }
  for (; i < n; i += 8) {
    // The last (up to 8) scores: lanes past n count as -inf, whose exponential is 0.
    const int64_t r = std::min<int64_t>(8, n - i);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep =
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)), lane));
    const __m256 x = _mm256_blendv_ps(
        lowest, exponent(_mm256_maskload_ps(s + i, _mm256_castps_si256(keep))), keep);
    vmax = _mm256_max_ps(vmax, x);
    const __m256 e = exp2_avx2(x);
    vsum = _mm256_add_ps(vsum, e);
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, e);
    for (int64_t j = 0; j < r; ++j) out[i + j] = static_cast<T>(tmp[j]);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(vmax, vmax1));
  float mx = lanes[0];
  for (int j = 1; j < 8; ++j) mx = std::max(mx, lanes[j]);
  _mm256_store_ps(lanes, _mm256_add_ps(vsum, vsum1));
  float total = 0;
  for (int j = 0; j < 8; ++j) total += lanes[j];
  *xmax = mx * kLn2;
  return total;
}

// The fp32 softcap tier's pass on AVX2 (row_exp_sum_tier_avx512's contract and test; fp32
// probabilities, as the AVX2 micro-kernels take them).
inline bool row_exp_sum_tier_avx2(const float* s, int64_t n, float scale, float shift,
                                  const SoftcapTier& tier, float lazy_max, float* out, float* xmax,
                                  float* sum) {
  const __m256 vscale = _mm256_set1_ps(scale * kLog2e);
  const __m256 vshift = _mm256_set1_ps(shift * kLog2e);
  const __m256 p0 = _mm256_set1_ps(tier.p[0]), p1 = _mm256_set1_ps(tier.p[1]);
  const __m256 p2 = _mm256_set1_ps(tier.p[2]), p3 = _mm256_set1_ps(tier.p[3]);
  const auto exponent = [&](__m256 x, __m256 t) {
    __m256 poly = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_fmadd_ps(p3, t, p2), t, p1), t, p0);
    return _mm256_fmsub_ps(x, _mm256_fmadd_ps(poly, t, vscale), vshift);
  };
  const auto exponent2 = [&](float x) {  // base 2, one score
    return tier.exponent2(x, scale * kLog2e, shift * kLog2e);
  };
  // New values first in vmaxps: the maxima of s^2 never turn NaN (see the AVX-512 pass).
  __m256 vsum = _mm256_setzero_ps(), vsum1 = vsum, tmax = vsum, tmax1 = vsum;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 s0 = _mm256_loadu_ps(s + i), s1 = _mm256_loadu_ps(s + i + 8);
    const __m256 t0 = _mm256_mul_ps(s0, s0), t1 = _mm256_mul_ps(s1, s1);
    tmax = _mm256_max_ps(t0, tmax);
    tmax1 = _mm256_max_ps(t1, tmax1);
    const __m256 e0 = exp2_avx2(exponent(s0, t0)), e1 = exp2_avx2(exponent(s1, t1));
    vsum = _mm256_add_ps(vsum, e0);
    vsum1 = _mm256_add_ps(vsum1, e1);
    _mm256_storeu_ps(out + i, e0);
    _mm256_storeu_ps(out + i + 8, e1);
  }
  float total = 0, t_top = 0;
  for (; i < n; ++i) {  // the last (up to 15) scores one by one
    const float x = s[i], t = x * x;
    if (t > t_top) t_top = t;  // NaN leaves t_top as it is
    const float x2 = exponent2(x);
    const float e = x2 < -126.f ? 0.f : std::exp2(x2);  // no denormals (see exp2_avx2)
    out[i] = e;
    total += e;
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(tmax, tmax1));
  for (int j = 0; j < 8; ++j) t_top = std::max(t_top, lanes[j]);
  if (!tier_top_exponent(tier, t_top, scale, shift, s, n, lazy_max, xmax)) return false;
  _mm256_store_ps(lanes, _mm256_add_ps(vsum, vsum1));
  for (int j = 0; j < 8; ++j) total += lanes[j];
  *sum = total;
  return true;
}
#endif

// exp(x), NaN for NaN x.
template <typename A>
inline Vectorized<A> vexp(const Vectorized<A>& x) {
  if constexpr (std::is_same_v<A, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    return Vectorized<float>(exp_avx512(x));
#elif defined(CPU_CAPABILITY_AVX2)
    // ATen's AVX2 exp_u20 clamps its input with vminps, which turns NaN into e^88.7: put NaN
    // back (unordered compare and blend, two instructions).
    const __m256 v = x;
    return Vectorized<float>(_mm256_blendv_ps(x.exp_u20(), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
#else
    return x.exp_u20();
#endif
  } else {
    return x.exp();
  }
}

// tanh(x) (the softcap): the rational fit on AVX-512 and AVX2 for fp32, ATen's elsewhere.
template <typename A>
inline Vectorized<A> vtanh(const Vectorized<A>& x) {
  if constexpr (std::is_same_v<A, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    return Vectorized<float>(tanh_avx512(x));
#elif defined(CPU_CAPABILITY_AVX2)
    return Vectorized<float>(tanh_avx2(x));
#endif
  }
  return x.tanh();
}

// s[i] = exp(s[i] * scale - shift) for i < n; returns the sum.
template <typename A>
inline A row_exp_sum(A* s, int64_t n, A scale, A shift) {
  using Vec = Vectorized<A>;
  const Vec vscale(scale), vshift(shift);
  Vec vsum(A(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = vexp(at::vec::fmsub(Vec::loadu(s + i), vscale, vshift));
    e.store(s + i);
    vsum = vsum + e;
  }
  A total = at::vec::vec_reduce_all<A>([](Vec& x, Vec& y) { return x + y; }, vsum);
  for (; i < n; ++i) {
    const A e = std::exp(s[i] * scale - shift);
    s[i] = e;
    total += e;
  }
  return total;
}

// out[i] = exp(x[i]) rounded to T (fp32, bf16 or fp16), for i < n, where x[i] = s[i] * scale -
// shift, or softcap * tanh(s[i] * scale / softcap) - shift when fcap.cap > 0 (the softcap fused
// into the pass instead of a pass of its own; fcap built for this scale); returns the fp32 sum
// and, in *xmax, max(x[i]).
// Fuses the score modification, the exponential, the row sum, the row maximum and the
// down-conversion into one pass over the scores.
template <typename T>
inline float row_exp_sum_to(const float* s, int64_t n, float scale, float shift, T* out,
                            float* xmax, const FusedSoftcap& fcap = {}) {
  const float softcap = fcap.cap;
  const bool cap = softcap > 0;
#if defined(CPU_CAPABILITY_AVX512)
  constexpr bool kFast = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
  if constexpr (kFast) {
    if (std::is_same_v<T, float> || cpu_has_avx512_bf16()) {
      if (cap) {
        // On the tier, x >= -(x_bound + shift): far from the exponentials' underflow where that
        // is above -80 (-115 in base 2), and the flush is left out.
        const SoftcapTier& tier = std::is_same_v<T, float> ? fcap.f32 : fcap.bf16;
        float sum;
        if (tier.bound >= 0 &&
            (tier.x_bound + shift <= 80.f
                 ? row_exp_sum_tier_avx512<T, false>(s, n, scale, shift, tier, fcap.lazy_max, out,
                                                     xmax, &sum)
                 : row_exp_sum_tier_avx512<T, true>(s, n, scale, shift, tier, fcap.lazy_max, out,
                                                    xmax, &sum))) {
          return sum;
        }
      }
      return cap ? row_exp_sum_avx512<T, true>(s, n, scale, shift, softcap, out, xmax)
                 : row_exp_sum_avx512<T, false>(s, n, scale, shift, softcap, out, xmax);
    }
  }
#endif
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    float sum;
    if (cap && fcap.f32.bound >= 0 &&
        row_exp_sum_tier_avx2(s, n, scale, shift, fcap.f32, fcap.lazy_max, out, xmax, &sum)) {
      return sum;
    }
  }
  return cap ? row_exp_sum_avx2<T, true>(s, n, scale, shift, softcap, out, xmax)
             : row_exp_sum_avx2<T, false>(s, n, scale, shift, softcap, out, xmax);
#endif
  using fVec = Vectorized<float>;
  using rVec = Vectorized<T>;
  const fVec vscale(scale), vshift(shift), vinv(cap ? scale / softcap : 0.f), vcap(softcap);
  const auto arg = [&](const fVec& x) {
    return cap ? vcap * vtanh(x * vinv) - vshift : at::vec::fmsub(x, vscale, vshift);
  };
  fVec vsum(0.f), vmax(neg_inf<float>());
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + fVec::size() <= n; i += fVec::size()) {
      const fVec x = arg(fVec::loadu(s + i));
      vmax = at::vec::maximum(vmax, x);
      const fVec e = vexp(x);
      vsum = vsum + e;
      e.store(out + i);
    }
  } else {
    static_assert(rVec::size() == 2 * fVec::size());
    for (; i + rVec::size() <= n; i += rVec::size()) {
      const fVec x0 = arg(fVec::loadu(s + i));
      const fVec x1 = arg(fVec::loadu(s + i + fVec::size()));
      vmax = at::vec::maximum(vmax, at::vec::maximum(x0, x1));
      const fVec e0 = vexp(x0);
      const fVec e1 = vexp(x1);
      vsum = vsum + e0 + e1;
      at::vec::convert_from_float<T>(e0, e1).store(out + i);
    }
  }
  float total = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, vsum);
  float mx =
      at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return at::vec::maximum(x, y); }, vmax);
  for (; i < n; ++i) {
    const float x =
        cap ? softcap * std::tanh(s[i] * scale / softcap) - shift : s[i] * scale - shift;
    mx = std::max(mx, x);
    const float e = std::exp(x);
    out[i] = static_cast<T>(e);
    total += e;
  }
  *xmax = mx;
  return total;
}

template <typename A>
inline void row_scale(A* s, int64_t n, A f) {
  using Vec = Vectorized<A>;
  const Vec vf(f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(s + i) * vf).store(s + i);
  for (; i < n; ++i) s[i] *= f;
}

// Before exp(s * scale - shift) over s[0, n) with a huge shift (|shift| > kExactShift, see
// there): scales s in place and sets scale to 1, so that the exponent is fl(s * scale) - shift,
// which is <= 0 when shift is the maximum of the scaled scores (rounding is monotonic).
template <typename A>
inline void exact_scores(A* s, int64_t n, A shift, A& scale) {
  if (std::abs(shift) > kExactShift<A> && scale != A(1)) {
    row_scale(s, n, scale);
    scale = 1;
  }
}

// One block of the online softmax for a row with state (m, l) and accumulator acc (Ev):
// m_new = max(m, max(s * scale)), acc and l scaled by exp(m - m_new), s[0, valid) replaced by
// exp(s * scale - m_new) and their sum added to l. Returns false, state unchanged, when no score
// is visible (all -inf). A NaN score makes m_new, hence l and the row's output, NaN; scale > 0.
template <typename A>
inline bool online_softmax_block(A* s, int64_t valid, A scale, A& m, A& l, A* acc, int64_t Ev) {
  const A bmax = valid > 0 ? row_max(s, valid) * scale : neg_inf<A>();
  const A m_new = max_nan(m, bmax);
  if (m_new == neg_inf<A>()) return false;
  const A alpha = std::exp(m - m_new);
  exact_scores(s, valid, m_new, scale);
  const A sum = row_exp_sum(s, valid, scale, m_new);
  if (alpha != A(1)) row_scale(acc, Ev, alpha);
  l = l * alpha + sum;
  m = m_new;
  return true;
}

#if defined(CPU_CAPABILITY_AVX512)
__attribute__((target("avx512bf16"))) inline void scale_to_bf16_avx512(const float* s, int64_t n,
                                                                       float f,
                                                                       c10::BFloat16* out) {
  const __m512 vf = _mm512_set1_ps(f);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 x0 = _mm512_mul_ps(_mm512_loadu_ps(s + i), vf);
    const __m512 x1 = _mm512_mul_ps(_mm512_loadu_ps(s + i + 16), vf);
    _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
  }
  for (; i < n; i += 16) {
    const __mmask16 k = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - i)) - 1);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + i), vf);
    _mm256_mask_storeu_epi16(out + i, k, (__m256i)_mm512_cvtneps_pbh(x));
  }
}
#endif

// out[i] = s[i] * f rounded to T, for i < n: the forward's final normalisation and down-conversion
// in one pass (s may be overwritten).
template <typename A, typename T>
inline void scale_convert_row(A* s, int64_t n, A f, T* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    if (cpu_has_avx512_bf16()) return scale_to_bf16_avx512(s, n, f, out);
  }
#endif
  if constexpr (std::is_same_v<A, T>) {
    using Vec = Vectorized<A>;
    const Vec vf(f);
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(s + i) * vf).store(out + i);
    for (; i < n; ++i) out[i] = s[i] * f;
  } else {
    row_scale(s, n, f);
    convert_row(s, out, n);
  }
}

// Applies scale and the user mask to one row of raw scores: s = s*scale + mask, a bool mask
// counting as 0 where true and -inf where false. Adding rather than selecting keeps a NaN score
// at a hidden key NaN (NaN + -inf = NaN), so that it reaches its row as in torch, at the same
// cost; -inf from the mask alone stays -inf, and a row of them is skipped as empty.
template <typename T, typename A>
inline void apply_mask_row(A* s, int64_t n, A scale, const AttentionForwardParams& p,
                           const char* mask_row) {
  const int64_t ms = p.mask_stride_s;
  switch (p.mask_kind) {
    case MaskKind::kBool: {
      const bool* m = reinterpret_cast<const bool*>(mask_row);
      for (int64_t j = 0; j < n; ++j) s[j] = s[j] * scale + (m[j * ms] ? A(0) : neg_inf<A>());
      break;
    }
    case MaskKind::kSameAsInput: {
      const T* m = reinterpret_cast<const T*>(mask_row);
      for (int64_t j = 0; j < n; ++j) s[j] = s[j] * scale + static_cast<A>(m[j * ms]);
      break;
    }
    case MaskKind::kFloat32: {
      const float* m = reinterpret_cast<const float*>(mask_row);
      for (int64_t j = 0; j < n; ++j) s[j] = s[j] * scale + static_cast<A>(m[j * ms]);
      break;
    }
    case MaskKind::kNone:
      row_scale(s, n, scale);
      break;
  }
}

inline size_t mask_elem_size(const AttentionForwardParams& p, size_t input_elem) {
  switch (p.mask_kind) {
    case MaskKind::kBool:
      return sizeof(bool);
    case MaskKind::kSameAsInput:
      return input_elem;
    case MaskKind::kFloat32:
      return sizeof(float);
    default:
      return 0;
  }
}

// Pointer to mask element (b, h, i, n0) in bytes.
inline const char* mask_ptr(const AttentionForwardParams& p, size_t esize, int64_t b, int64_t h,
                            int64_t i, int64_t n0) {
  return static_cast<const char*>(p.mask) + esize * (b * p.mask_stride_b + h * p.mask_stride_h +
                                                     i * p.mask_stride_l + n0 * p.mask_stride_s);
}

}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
