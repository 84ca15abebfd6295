// Throughput of the AMX tile instructions the bf16 forward kernel is built from.
//
// The bf16 attention forward spends most of its time in AMX tile code (Q K^T and P V on 16 x 16
// fp32 result tiles). How fast that code can go depends on three instructions: TILELOADD
// (operands into tiles), TDPBF16PS (the tile multiply) and TILESTORED (results out). This
// program times each on its own, then a 2 x 2 register-blocked kernel of the shape the forward
// uses (64 query rows x 512 keys x E), with and without its result stores. If loads cost more
// than multiplies, a kernel that issues one load per multiply (the best 8 tile registers allow
// with 2 x 2 blocking) is bound by the loads, not by the multiplier. Last, it puts vector work
// of three kinds (FMAs on registers, loads, stores) between the GEMM's tile instructions and
// reports how much of that work's own time the tile code hides: what a kernel can expect from
// running its softmax between the tile steps of a GEMM.
//
// Build and run (x86-64 with AMX-BF16, Linux, GCC 11+ or clang 12+; no torch needed):
//   g++ -O2 -mavx512f -mamx-tile -mamx-bf16 benchmarks/amx_probe.cpp -o /tmp/amx_probe &&
//   /tmp/amx_probe
//
// Times are in TSC ticks (the constant-rate time stamp counter) and nanoseconds: min and median
// over interleaved rounds, since a shared machine's speed changes while it runs.

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <x86intrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../csrc/cpu/amx_tiles.h"

namespace {

using bf16 = uint16_t;

bool has_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return ((d >> 24) & 1u) && ((d >> 22) & 1u);
}

// Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM for XTILEDATA).
bool request_tile_state() { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

constexpr int kIters = 4096;

// Four loads per iteration into four tiles, from a few L1-resident KiB.
__attribute__((noinline)) void tile_loads(const bf16* a) {
  for (int i = 0; i < kIters; ++i) {
    _tile_loadd(4, a, 64);
    _tile_loadd(5, a + 512, 64);
    _tile_loadd(6, a + 1024, 64);
    _tile_loadd(7, a + 1536, 64);
  }
}

// Four independent accumulators: the multiplier's throughput, not its latency.
__attribute__((noinline)) void tile_multiplies() {
  for (int i = 0; i < kIters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

__attribute__((noinline)) void tile_stores(float* c) {
  for (int i = 0; i < kIters; ++i) {
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
}

// Units of vector work after each tile instruction: about a third of the GEMM's own time in all.
constexpr int kUnitsPerSlot = 4;

// Vector work of one kind, one unit per call of one(): FMAs on registers only, a 64-byte load, or a
// 64-byte store, the last two streaming over 16 KiB (L1-resident).
enum class Work { kNone, kRegisters, kLoads, kStores };

struct VectorWork {
  __m512 x0 = _mm512_set1_ps(1.0001f), x1 = x0, x2 = x0;
  float* buf = nullptr;
  int off = 0;

  template <Work W>
  inline void unit() {
    for (int u = 0; u < kUnitsPerSlot; ++u) one<W>();
  }

  template <Work W>
  inline void one() {
    const __m512 c = _mm512_set1_ps(0.999f), d = _mm512_set1_ps(1e-4f);
    if constexpr (W == Work::kRegisters) {
      x0 = _mm512_fmadd_ps(x0, c, d);
      x1 = _mm512_fmadd_ps(x1, c, d);
      x2 = _mm512_fmadd_ps(x2, c, d);
    } else if constexpr (W == Work::kLoads) {
      x0 = _mm512_fmadd_ps(_mm512_loadu_ps(buf + off), c, x0);
      off = (off + 16) & 4095;
    } else if constexpr (W == Work::kStores) {
      _mm512_storeu_ps(buf + off, x0);
      off = (off + 16) & 4095;
    }
  }
  float sum() const { return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(x0, x1), x2)); }
};

// C[M x N] = A[M x K] B with 32 x 32 blocks in tiles 0-3, A rows in 4-5, B panels in 6-7. B is
// in VNNI panels of 16 columns (K/2 x 16 x 2 each), as the attention kernel packs K^T and V.
// With W other than kNone, kUnitsPerSlot units of vector work follow every tile instruction, as
// a fused kernel would put its softmax between the tile steps of a GEMM.
template <bool kStore, Work W = Work::kNone>
__attribute__((noinline)) float blocked_gemm(int M, int N, int K, const bf16* a, const bf16* b,
                                             float* c, int ldc, float* buf = nullptr) {
  VectorWork w;
  w.buf = buf;
  const int64_t sa = 2 * K, panel = 16 * static_cast<int64_t>(K), sc = 4 * ldc;
  for (int i = 0; i < M; i += 32) {
    for (int j = 0; j < N; j += 32) {
      const bf16* ai = a + static_cast<int64_t>(i) * K;
      const bf16* bj = b + (j / 16) * panel;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int k = 0; k < K; k += 32) {
        _tile_loadd(4, ai + k, sa);
        w.unit<W>();
        _tile_loadd(6, bj + 16 * k, 64);
        w.unit<W>();
        _tile_dpbf16ps(0, 4, 6);
        w.unit<W>();
        _tile_loadd(7, bj + panel + 16 * k, 64);
        w.unit<W>();
        _tile_dpbf16ps(1, 4, 7);
        w.unit<W>();
        _tile_loadd(5, ai + 16 * K + k, sa);
        w.unit<W>();
        _tile_dpbf16ps(2, 5, 6);
        w.unit<W>();
        _tile_dpbf16ps(3, 5, 7);
        w.unit<W>();
      }
      if (kStore) {
        float* cb = c + static_cast<int64_t>(i) * ldc + j;
        _tile_stored(0, cb, sc);
        _tile_stored(1, cb + 16, sc);
        _tile_stored(2, cb + 16 * ldc, sc);
        _tile_stored(3, cb + 16 * ldc + 16, sc);
      }
    }
  }
  return w.sum();
}

// The same vector work as blocked_gemm<true, W> issues, without the GEMM.
template <Work W>
__attribute__((noinline)) float work_alone(int64_t units, float* buf) {
  VectorWork w;
  w.buf = buf;
  for (int64_t u = 0; u < units; ++u) w.one<W>();
  return w.sum();
}

struct Probe {
  Probe(std::string n, double o, bool g, std::function<void()> f)
      : name(std::move(n)), ops(o), gflops(g), fn(std::move(f)) {}
  std::string name;
  double ops;   // instructions, or FLOPs, per call
  bool gflops;  // report GFLOP/s instead of time per instruction
  std::function<void()> fn;
  std::vector<double> ticks, ns;
};

// The probe's buffers inside one page-aligned block, all starting `offset` bytes past a
// 64-byte boundary. Filled with bf16 1.0 (the bit pattern also reads as a small fp32 number).
struct Arena {
  explicit Arena(int off) : offset(off) {
    constexpr size_t kBytes = 1 << 22;
    base = static_cast<char*>(std::aligned_alloc(4096, kBytes));
    for (size_t i = 0; i < kBytes / 2; ++i) reinterpret_cast<bf16*>(base)[i] = 0x3f80;
    small = reinterpret_cast<bf16*>(base + offset);
    a = reinterpret_cast<bf16*>(base + (64 << 10) + offset);
    b = reinterpret_cast<bf16*>(base + (128 << 10) + offset);
    c = reinterpret_cast<float*>(base + (1 << 20) + offset);
    out = reinterpret_cast<float*>(base + (2 << 20) + offset);
    work = reinterpret_cast<float*>(base + (3 << 20) + offset);
  }
  ~Arena() { std::free(base); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  int offset;
  char* base;
  bf16 *small, *a, *b;
  float *c, *out, *work;
};

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::max(1, std::atoi(argv[1])) : 200;
  if (!has_amx_bf16()) {
    std::puts("amx_probe: this CPU has no AMX-BF16");
    return 1;
  }
  if (!request_tile_state()) {
    std::puts("amx_probe: the kernel refused the AMX tile state (ARCH_REQ_XCOMP_PERM)");
    return 1;
  }
  aigc_ext::cpu::amx_load_config(aigc_ext::cpu::amx_full_tiles());

  const int M = 64, N = 512, ldc = N + 16;
  // Every operand twice: at a 64-byte (cache line) boundary, and 16 bytes past one, which is
  // what malloc and std::vector give. Then each 64-byte row of a tile spans two cache lines.
  Arena aligned(0), shifted(16);

  std::vector<Probe> probes;
  const auto where = [](const Arena* m) {
    return std::string(m->offset ? ", 16-byte aligned" : ", 64-byte aligned");
  };
  for (Arena* m : {&aligned, &shifted}) {
    probes.emplace_back("TILELOADD" + where(m), 4.0 * kIters, false, [m] { tile_loads(m->small); });
  }
  probes.emplace_back("TDPBF16PS", 4.0 * kIters, false, [] { tile_multiplies(); });
  for (Arena* m : {&aligned, &shifted}) {
    probes.emplace_back("TILESTORED" + where(m), 4.0 * kIters, false, [m] { tile_stores(m->out); });
  }
  for (int K : {64, 128}) {
    const double flop = 2.0 * M * N * K;
    const std::string shape = std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K);
    probes.emplace_back("GEMM " + shape + ", 64-byte", flop, true, [&, K] {
      blocked_gemm<true>(M, N, K, aligned.a, aligned.b, aligned.c, ldc);
    });
    probes.emplace_back("  same, no result stores", flop, true, [&, K] {
      blocked_gemm<false>(M, N, K, aligned.a, aligned.b, aligned.c, ldc);
    });
    probes.emplace_back("  same, 16-byte aligned", flop, true, [&, K] {
      blocked_gemm<true>(M, N, K, shifted.a, shifted.b, shifted.c, ldc);
    });
  }

  for (auto& p : probes) p.fn();  // warm up
  for (int r = 0; r < rounds; ++r) {
    for (auto& p : probes) {
      const auto t0 = std::chrono::steady_clock::now();
      const uint64_t c0 = __rdtsc();
      p.fn();
      const uint64_t c1 = __rdtsc();
      const auto t1 = std::chrono::steady_clock::now();
      p.ticks.push_back(static_cast<double>(c1 - c0));
      p.ns.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count());
    }
  }
  std::printf("%d interleaved rounds; min and median\n\n", rounds);
  std::printf("%-30s %22s %22s\n", "", "TSC ticks / instr", "ns / instr");
  for (auto& p : probes) {
    std::sort(p.ticks.begin(), p.ticks.end());
    std::sort(p.ns.begin(), p.ns.end());
    const double tmin = p.ticks.front(), tmed = p.ticks[p.ticks.size() / 2];
    const double nmin = p.ns.front(), nmed = p.ns[p.ns.size() / 2];
    if (!p.gflops) {
      std::printf("%-30s %10.1f %10.1f  %10.2f %10.2f\n", p.name.c_str(), tmin / p.ops,
                  tmed / p.ops, nmin / p.ops, nmed / p.ops);
    } else {
      std::printf("%-30s %10.0f %10.0f  GFLOP/s (max, median), FLOP/tick %.0f\n", p.name.c_str(),
                  p.ops / nmin, p.ops / nmed, p.ops / tmin);
    }
  }

  // Vector work between tile instructions: how much of it the tile code hides.
  const int K = 128;
  const int64_t units = static_cast<int64_t>(M / 32) * (N / 32) * (K / 32) * 8 * kUnitsPerSlot;
  float* buf = aligned.work;
  volatile float sink = 0;
  struct Pair {
    const char* name;
    std::function<float()> both, alone;
    std::vector<double> t_both, t_alone;
  };
  std::vector<Pair> pairs;
  // The GEMM with work W between its tile instructions, and the same work on its own.
  const auto add_pair = [&](const char* name, auto work) {
    constexpr Work W = decltype(work)::value;
    pairs.push_back(
        {name,
         [&] { return blocked_gemm<true, W>(M, N, K, aligned.a, aligned.b, aligned.c, ldc, buf); },
         [&] { return W == Work::kNone ? 0.f : work_alone<W>(units, buf); },
         {},
         {}});
  };
  add_pair("none", std::integral_constant<Work, Work::kNone>{});
  add_pair("FMAs on registers", std::integral_constant<Work, Work::kRegisters>{});
  add_pair("64-byte loads", std::integral_constant<Work, Work::kLoads>{});
  add_pair("64-byte stores", std::integral_constant<Work, Work::kStores>{});
  for (int r = 0; r < rounds; ++r) {
    for (auto& p : pairs) {
      auto t0 = std::chrono::steady_clock::now();
      sink = sink + p.both();
      auto t1 = std::chrono::steady_clock::now();
      sink = sink + p.alone();
      auto t2 = std::chrono::steady_clock::now();
      p.t_both.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      p.t_alone.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
    }
  }
  _tile_release();
  std::printf(
      "\nvector work after every tile instruction of the %dx%dx%d GEMM (%lld units; us, min)\n", M,
      N, K, static_cast<long long>(units));
  std::printf("%-26s %10s %10s %10s %8s\n", "work", "GEMM+work", "work alone", "GEMM alone",
              "hidden");
  const double gemm_alone = *std::min_element(pairs[0].t_both.begin(), pairs[0].t_both.end());
  for (auto& p : pairs) {
    const double both = *std::min_element(p.t_both.begin(), p.t_both.end());
    const double alone = *std::min_element(p.t_alone.begin(), p.t_alone.end());
    if (&p == &pairs[0]) {
      std::printf("%-26s %10.1f %10s %10.1f %8s\n", p.name, both, "-", gemm_alone, "-");
      continue;
    }
    // The share of the work's own time that running it inside the GEMM did not add.
    const double hidden = 100.0 * (gemm_alone + alone - both) / alone;
    std::printf("%-26s %10.1f %10.1f %10.1f %7.0f%%\n", p.name, both, alone, gemm_alone, hidden);
  }
  return 0;
}
