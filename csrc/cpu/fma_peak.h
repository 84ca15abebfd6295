// The machine's fp32 FMA peak, measured with register-only multiply-adds, and the peak of
// AVX512_BF16's vdpbf16ps where the CPU has it.
//
// A roofline needs the arithmetic ceiling of the path a kernel takes. For fp32 (and for bf16 or
// fp16 where the CPU has no hardware for them and a kernel converts to fp32) that ceiling is the
// fp32 FMA rate: the widest FMA instruction the CPU has, issued on independent accumulator
// chains so that neither latency nor memory limits it. GFLOP/s = 2 * lanes * FMAs / time.
// For bf16 on the vdpbf16ps micro-kernel it is that instruction's rate: each of its 16 fp32
// lanes adds two bf16 products, 4 FLOPs a lane (twice an FMA's on AMD Zen 4, the same as an
// FMA's where it issues at half the FMA rate, as on Sapphire Rapids).
//
// Shared by the extension (csrc/cpu/fma_peak.cpp, the operator aigc_ext::_fma_peak_gflops) and
// the standalone program benchmarks/fma_probe.cpp, so this header includes no torch header.
// The vector loops are compiled with __attribute__((target(...))) and chosen at run time from
// cpuid and XCR0: the file builds with no -m flags, and no instruction the CPU (or the OS, for
// the wider registers' state) lacks is ever executed.
//
// With several threads, every thread runs the same loop in rounds that start together (a spin
// barrier); a round's rate is all threads' FLOPs over the round's wall time, and the figure is
// the best round. That is the rate the threads sustain together, including any sharing of
// FMA units between SMT siblings or of cores between more threads than there are.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define AIGC_FMA_PEAK_X86 1
#else
#define AIGC_FMA_PEAK_X86 0
#endif

namespace aigc_ext::fma_peak {

// The instruction sets the probe has a loop for: fp32 FMAs narrowest first, then vdpbf16ps
// (bf16 pairs into fp32 accumulators), which widest_isa() never picks.
enum class Isa { kScalar, kAvx2, kAvx512, kAvx512Bf16 };

// What the CPU (and the OS, for the register state) supports.
struct CpuFeatures {
  bool avx2_fma = false;  // AVX2 + FMA3, ymm state enabled
  bool avx512f = false;   // AVX-512 F, zmm and opmask state enabled
  bool avx512_bf16 = false;
  bool avx512_fp16 = false;
  bool amx_bf16 = false;  // AMX-TILE + AMX-BF16, tile state enabled in XCR0
  bool amx_fp16 = false;  // AMX-TILE + AMX-FP16, tile state enabled in XCR0
};

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

// fp32 lanes (accumulators) per instruction.
inline int isa_lanes(Isa isa) {
  return isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16 ? 16 : isa == Isa::kAvx2 ? 8 : 1;
}

// FLOPs per instruction: a multiply and an add per lane, two of each for vdpbf16ps.
inline int isa_flop_per_instruction(Isa isa) {
  return 2 * isa_lanes(isa) * (isa == Isa::kAvx512Bf16 ? 2 : 1);
}

// Independent accumulator chains per loop: FMA latency (4-5 cycles) times throughput (up to 2 a
// cycle) needs at least 10 in flight. The scalar loop counts a multiply and an add per chain.
constexpr int kAccumulators = 12;

#if AIGC_FMA_PEAK_X86
namespace detail {

inline uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

inline CpuFeatures detect_x86() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = (c >> 12) & 1u, osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u;
  if (!osxsave || !avx) return f;  // without XSAVE enabled by the OS, no ymm/zmm state
  const uint64_t xcr = xcr0();
  const bool ymm_state = (xcr & 0x6) == 0x6;
  const bool zmm_state = ymm_state && (xcr & 0xe0) == 0xe0;
  const bool tile_state = (xcr & 0x60000) == 0x60000;
  unsigned max_sub = 0, b7 = 0, c7 = 0, d7 = 0;
  if (!__get_cpuid_count(7, 0, &max_sub, &b7, &c7, &d7)) return f;
  unsigned a71 = 0, b71 = 0, c71 = 0, d71 = 0;
  if (max_sub >= 1) __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71);
  const bool avx2 = (b7 >> 5) & 1u, avx512f = (b7 >> 16) & 1u;
  const bool amx_tile = (d7 >> 24) & 1u;
  f.avx2_fma = ymm_state && avx2 && fma;
  f.avx512f = zmm_state && avx512f;
  f.avx512_bf16 = f.avx512f && ((a71 >> 5) & 1u);
  f.avx512_fp16 = f.avx512f && ((d7 >> 23) & 1u);
  f.amx_bf16 = tile_state && amx_tile && ((d7 >> 22) & 1u);
  f.amx_fp16 = tile_state && amx_tile && ((a71 >> 21) & 1u);
  return f;
}

}  // namespace detail
#endif

inline CpuFeatures detect_cpu() {
#if AIGC_FMA_PEAK_X86
  static const CpuFeatures features = detail::detect_x86();
  return features;
#else
  return CpuFeatures{};
#endif
}

inline bool isa_supported(Isa isa, const CpuFeatures& f = detect_cpu()) {
  switch (isa) {
    case Isa::kAvx512Bf16:
      return f.avx512_bf16;
    case Isa::kAvx512:
      return f.avx512f;
    case Isa::kAvx2:
      return f.avx2_fma;
    default:
      return true;
  }
}

// The widest FMA this CPU can run.
inline Isa widest_isa(const CpuFeatures& f = detect_cpu()) {
  return f.avx512f ? Isa::kAvx512 : f.avx2_fma ? Isa::kAvx2 : Isa::kScalar;
}

// ---------------------------------------------------------------------------------------------
// The loops: `iters` iterations of kAccumulators independent chains x = x * a + b. With a just
// below 1 the chains converge to b / (1 - a) = 1 and stay normal numbers (no denormal slow
// path, no overflow). Each returns a value that depends on every chain, so none is dead code.
// ---------------------------------------------------------------------------------------------

// The twelve chains are named variables, not an array: an array of vectors indexed in a loop
// may be kept in memory at -O2, which turns the probe into a store-forwarding benchmark.
static_assert(kAccumulators == 12, "the loops below spell out 12 chains");

#define AIGC_FMA_PEAK_CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

#if AIGC_FMA_PEAK_X86
// The zmm loops' body, around AIGC_STEP(i) (one instruction on chain x##i): 12 chains from
// about 1, then their sum.
#define AIGC_ZMM_CHAINS_BODY            \
  AIGC_FMA_PEAK_CHAINS(AIGC_INIT)       \
  for (int64_t n = 0; n < iters; ++n) { \
    AIGC_FMA_PEAK_CHAINS(AIGC_STEP)     \
  }                                     \
  __m512 s = _mm512_setzero_ps();       \
  AIGC_FMA_PEAK_CHAINS(AIGC_SUM)        \
  alignas(64) float out[16];            \
  _mm512_store_ps(out, s);              \
  float total = 0.f;                    \
  for (float v : out) total += v;       \
  return total;
#define AIGC_INIT(i) __m512 x##i = _mm512_set1_ps(seed + 0.01f * i);
#define AIGC_SUM(i) s = _mm512_add_ps(s, x##i);

__attribute__((target("avx512f"), noinline)) inline float run_avx512(int64_t iters, float seed) {
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(0.001f);
#define AIGC_STEP(i) x##i = _mm512_fmadd_ps(x##i, a, b);
  AIGC_ZMM_CHAINS_BODY
#undef AIGC_STEP
}

// x = x + a0 * b0 + a1 * b1 per fp32 lane with bf16 pairs a = b = (2^-10, 2^-10): the chains
// grow by 2^-19 a step from about 1, so they stay normal numbers and finite at any length.
__attribute__((target("avx512f,avx512bf16"), noinline)) inline float run_avx512_bf16(int64_t iters,
                                                                                     float seed) {
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3A80);  // bf16 2^-10
#define AIGC_STEP(i) x##i = _mm512_dpbf16_ps(x##i, a, a);
  AIGC_ZMM_CHAINS_BODY
#undef AIGC_STEP
}
#undef AIGC_INIT
#undef AIGC_SUM
#undef AIGC_ZMM_CHAINS_BODY

__attribute__((target("avx2,fma"), noinline)) inline float run_avx2(int64_t iters, float seed) {
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(0.001f);
#define AIGC_INIT(i) __m256 x##i = _mm256_set1_ps(seed + 0.01f * i);
#define AIGC_STEP(i) x##i = _mm256_fmadd_ps(x##i, a, b);
#define AIGC_SUM(i) s = _mm256_add_ps(s, x##i);
  AIGC_FMA_PEAK_CHAINS(AIGC_INIT)
  for (int64_t n = 0; n < iters; ++n) {
    AIGC_FMA_PEAK_CHAINS(AIGC_STEP)
  }
  __m256 s = _mm256_setzero_ps();
  AIGC_FMA_PEAK_CHAINS(AIGC_SUM)
#undef AIGC_INIT
#undef AIGC_STEP
#undef AIGC_SUM
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  float total = 0.f;
  for (float v : out) total += v;
  return total;
}
#endif

__attribute__((noinline)) inline float run_scalar(int64_t iters, float seed) {
#define AIGC_INIT(i) float x##i = seed + 0.01f * i;
#define AIGC_STEP(i) x##i = x##i * 0.999f + 0.001f;
#define AIGC_SUM(i) total += x##i;
  AIGC_FMA_PEAK_CHAINS(AIGC_INIT)
  for (int64_t n = 0; n < iters; ++n) {
    AIGC_FMA_PEAK_CHAINS(AIGC_STEP)
  }
  float total = 0.f;
  AIGC_FMA_PEAK_CHAINS(AIGC_SUM)
#undef AIGC_INIT
#undef AIGC_STEP
#undef AIGC_SUM
  return total;
}

#undef AIGC_FMA_PEAK_CHAINS

// One chunk of the loop for `isa`; the caller has checked isa_supported(isa).
inline float run_chunk(Isa isa, int64_t iters, float seed) {
#if AIGC_FMA_PEAK_X86
  if (isa == Isa::kAvx512Bf16) return run_avx512_bf16(iters, seed);
  if (isa == Isa::kAvx512) return run_avx512(iters, seed);
  if (isa == Isa::kAvx2) return run_avx2(iters, seed);
#endif
  return run_scalar(iters, seed);
}

// FLOPs one thread does in one chunk of `iters` iterations.
inline double chunk_flop(Isa isa, int64_t iters) {
  return static_cast<double>(isa_flop_per_instruction(isa)) * kAccumulators *
         static_cast<double>(iters);
}

// ---------------------------------------------------------------------------------------------
// Timing
// ---------------------------------------------------------------------------------------------

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Iterations for one chunk of about `target_s` seconds on one thread (at least 256).
inline int64_t calibrate_iters(Isa isa, double target_s) {
  int64_t iters = 256;
  volatile float sink = 0.f;
  while (iters < (int64_t{1} << 26)) {
    const auto t0 = Clock::now();
    sink = sink + run_chunk(isa, iters, 1.0f);
    if (seconds_since(t0) >= target_s) break;
    iters *= 2;
  }
  return iters;
}

struct Measurement {
  double gflops = 0.0;  // best round: all threads' FLOPs over the round's wall time
  int threads = 1;
  int64_t rounds = 0;
  Isa isa = Isa::kScalar;
};

namespace detail {

inline void cpu_relax() {
#if AIGC_FMA_PEAK_X86
  _mm_pause();
#endif
}

// Rounds that start together on every thread. The last thread to arrive at the barrier closes
// the round (its end is the next one's start), records the rate and releases the others.
class Rounds {
 public:
  Rounds(int threads, double seconds, double flop_per_round)
      : threads_(threads), seconds_(seconds), flop_(flop_per_round) {}

  // Waits for every thread; false when the measurement is over.
  bool arrive() {
    const int64_t gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == threads_) {
      close_round();
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(gen + 1, std::memory_order_release);
    } else {
      for (int spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
        if (spins < 2000) {
          cpu_relax();
        } else {
          std::this_thread::yield();  // a shared machine: let the thread we wait for run
        }
      }
    }
    return !stop_.load(std::memory_order_acquire);
  }

  double best_gflops() const { return best_; }
  int64_t rounds() const { return rounds_; }

 private:
  void close_round() {
    const auto now = Clock::now();
    if (started_) {
      const double dt = std::chrono::duration<double>(now - round_start_).count();
      if (dt > 0) best_ = std::max(best_, threads_ * flop_ / dt / 1e9);
      ++rounds_;
      const double total = std::chrono::duration<double>(now - first_start_).count();
      if (total >= seconds_ || rounds_ >= kMaxRounds) stop_.store(true, std::memory_order_release);
    } else {
      started_ = true;
      first_start_ = now;
    }
    round_start_ = now;
  }

  static constexpr int64_t kMaxRounds = 1 << 20;
  const int threads_;
  const double seconds_, flop_;
  std::atomic<int> arrived_{0};
  std::atomic<int64_t> generation_{0};
  std::atomic<bool> stop_{false};
  // Written only by the thread closing a round, between the barrier's acquire and release.
  bool started_ = false;
  Clock::time_point first_start_{}, round_start_{};
  double best_ = 0.0;
  int64_t rounds_ = 0;
};

}  // namespace detail

// The fp32 FMA rate of `threads` threads running `isa`'s loop together for about `seconds`
// (plus a calibration of a few milliseconds). Requires isa_supported(isa), threads >= 1 and
// seconds > 0. When a thread cannot be created, the others are stopped and joined and the
// error (std::system_error) is rethrown.
inline Measurement measure(Isa isa, int threads, double seconds) {
  // Chunks of ~0.5 ms: short enough that many rounds fit between other processes' time slices
  // on a shared machine (the best round is the one no thread was preempted in), long enough that
  // the barrier costs nothing.
  const int64_t iters = calibrate_iters(isa, 5e-4);
  detail::Rounds rounds(threads, seconds, chunk_flop(isa, iters));
  std::atomic<float> sink{0.f};
  // Threads start only once all of them exist; a thread that cannot be created stops the
  // others before they reach the barrier (they would wait there for it forever).
  enum : int { kWait, kGo, kAbort };
  std::atomic<int> gate{kWait};
  auto work = [&](int t) {
    while (gate.load(std::memory_order_acquire) == kWait) std::this_thread::yield();
    if (gate.load(std::memory_order_acquire) == kAbort) return;
    float acc = 0.f;
    while (rounds.arrive()) acc += run_chunk(isa, iters, 1.0f + 0.001f * t);
    sink.store(acc, std::memory_order_relaxed);
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  } catch (...) {
    gate.store(kAbort, std::memory_order_release);
    for (auto& th : pool) th.join();
    throw;
  }
  gate.store(kGo, std::memory_order_release);
  work(0);
  for (auto& th : pool) th.join();
  Measurement m;
  m.gflops = rounds.best_gflops();
  m.threads = threads;
  m.rounds = rounds.rounds();
  m.isa = isa;
  return m;
}

}  // namespace aigc_ext::fma_peak
