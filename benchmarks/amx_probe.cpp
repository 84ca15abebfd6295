// Throughput of the AMX tile instructions the bf16 forward kernel is built from.
//
// The bf16 attention forward spends most of its time in AMX tile code (Q K^T and P V on 16 x 16
// fp32 result tiles). How fast that code can go depends on three instructions: TILELOADD
// (operands into tiles), TDPBF16PS (the tile multiply) and TILESTORED (results out). This
// program times each on its own, then a 2 x 2 register-blocked kernel of the shape the forward
// uses (64 query rows x 512 keys x E), with and without its result stores. If loads cost more
// than multiplies, a kernel that issues one load per multiply (the best 8 tile registers allow
// with 2 x 2 blocking) is bound by the loads, not by the multiplier.
//
// Build and run (x86-64 with AMX-BF16, Linux, GCC 11+ or clang 12+; no torch needed):
//   g++ -O2 -mamx-tile -mamx-bf16 benchmarks/amx_probe.cpp -o /tmp/amx_probe && /tmp/amx_probe
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
#include <functional>
#include <string>
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

// C[M x N] = A[M x K] B with 32 x 32 blocks in tiles 0-3, A rows in 4-5, B panels in 6-7. B is
// in VNNI panels of 16 columns (K/2 x 16 x 2 each), as the attention kernel packs K^T and V.
template <bool kStore>
__attribute__((noinline)) void blocked_gemm(int M, int N, int K, const bf16* a, const bf16* b,
                                            float* c, int ldc) {
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
        _tile_loadd(6, bj + 16 * k, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, bj + panel + 16 * k, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, ai + 16 * K + k, sa);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
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
  std::vector<bf16> small(4096, 0x3f80);  // bf16 1.0
  std::vector<float> out(16 * 1024);
  std::vector<bf16> a(M * 128, 0x3f80), b(N * 128, 0x3f80);
  std::vector<float> c(M * ldc);

  std::vector<Probe> probes;
  probes.emplace_back("TILELOADD (L1)", 4.0 * kIters, false, [&] { tile_loads(small.data()); });
  probes.emplace_back("TDPBF16PS", 4.0 * kIters, false, [&] { tile_multiplies(); });
  probes.emplace_back("TILESTORED", 4.0 * kIters, false, [&] { tile_stores(out.data()); });
  for (int K : {64, 128}) {
    const double flop = 2.0 * M * N * K;
    const std::string shape = std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K);
    probes.emplace_back("2x2 GEMM " + shape, flop, true,
                        [&, K] { blocked_gemm<true>(M, N, K, a.data(), b.data(), c.data(), ldc); });
    probes.emplace_back("  same, no stores", flop, true, [&, K] {
      blocked_gemm<false>(M, N, K, a.data(), b.data(), c.data(), ldc);
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
  _tile_release();

  std::printf("%d interleaved rounds; min and median\n\n", rounds);
  std::printf("%-26s %22s %22s\n", "", "TSC ticks / instr", "ns / instr");
  for (auto& p : probes) {
    std::sort(p.ticks.begin(), p.ticks.end());
    std::sort(p.ns.begin(), p.ns.end());
    const double tmin = p.ticks.front(), tmed = p.ticks[p.ticks.size() / 2];
    const double nmin = p.ns.front(), nmed = p.ns[p.ns.size() / 2];
    if (!p.gflops) {
      std::printf("%-26s %10.1f %10.1f  %10.2f %10.2f\n", p.name.c_str(), tmin / p.ops,
                  tmed / p.ops, nmin / p.ops, nmed / p.ops);
    } else {
      std::printf("%-26s %10.0f %10.0f  GFLOP/s (max, median), FLOP/tick %.0f\n", p.name.c_str(),
                  p.ops / nmin, p.ops / nmed, p.ops / tmin);
    }
  }
  return 0;
}
