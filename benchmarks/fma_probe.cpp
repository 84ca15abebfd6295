// This machine's fp32 FMA peak: per core, and for all threads running together.
//
// The roofline `aigc-ext bench` scales its fp32 rows by (and its bf16/fp16 rows, where the CPU
// has no hardware for them and the kernel computes in fp32): register-only FMAs on 12
// independent accumulators, in the widest vector width the CPU has, chosen at run time (the
// loops of csrc/cpu/fma_peak.h, the same the extension's aigc_ext::_fma_peak_gflops runs).
// GFLOP/s = 2 * lanes * FMAs / time; each figure is the best ~0.5 ms round within its time.
// The per-core line is printed for every width the CPU supports, so the widest can be seen to
// pay off.
//
// Build and run (any x86-64 or other 64-bit CPU, Linux, GCC 9+ or clang 10+; no torch needed):
//   g++ -O2 -pthread benchmarks/fma_probe.cpp -o /tmp/fma_probe && /tmp/fma_probe
// Arguments: [seconds per figure, default 1] [threads, default: the CPUs this process may use].

#include <sched.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "../csrc/cpu/fma_peak.h"

namespace {

namespace fp = aigc_ext::fma_peak;

int usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

bool parse_double(const char* text, double* out) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text, &end);
  if (end == text || *end != '\0' || errno != 0 || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

bool parse_int(const char* text, long* out) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || errno != 0) return false;
  *out = v;
  return true;
}

int usage(const char* message) {
  std::fprintf(stderr, "fma_probe: %s\nusage: fma_probe [seconds (0 < s <= 60)] [threads >= 1]\n",
               message);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 1.0;
  long threads = usable_cpus();
  if (argc > 3) return usage("too many arguments");
  if (argc > 1 && (!parse_double(argv[1], &seconds) || seconds <= 0 || seconds > 60)) {
    return usage("seconds must be a number in (0, 60]");
  }
  if (argc > 2 && (!parse_int(argv[2], &threads) || threads < 1 || threads > 4096)) {
    return usage("threads must be an integer in [1, 4096]");
  }

  const fp::CpuFeatures f = fp::detect_cpu();
  const fp::Isa widest = fp::widest_isa(f);
  std::printf("fma_probe: widest FMA %s (%d fp32 lanes, %d accumulators), %.2f s per figure\n",
              fp::isa_name(widest), fp::isa_lanes(widest), fp::kAccumulators, seconds);
  std::printf("cpu: avx2_fma=%d avx512f=%d avx512_bf16=%d avx512_fp16=%d amx_bf16=%d amx_fp16=%d\n",
              f.avx2_fma, f.avx512f, f.avx512_bf16, f.avx512_fp16, f.amx_bf16, f.amx_fp16);
  for (fp::Isa isa : {fp::Isa::kScalar, fp::Isa::kAvx2, fp::Isa::kAvx512}) {
    if (!fp::isa_supported(isa, f)) continue;
    // Narrower widths only for comparison: a quarter of the time each.
    const double t = isa == widest ? seconds : seconds / 4;
    const fp::Measurement m = fp::measure(isa, 1, t);
    std::printf("per core, %s: %.1f GFLOP/s\n", fp::isa_name(isa), m.gflops);
  }
  if (fp::isa_supported(fp::Isa::kAvx512Bf16, f)) {
    // The ceiling of bf16 products on vdpbf16ps (4 FLOPs per fp32 lane: two bf16 products).
    const fp::Measurement m = fp::measure(fp::Isa::kAvx512Bf16, 1, seconds / 4);
    std::printf("per core, vdpbf16ps (avx512_bf16, bf16 pairs into fp32): %.1f GFLOP/s\n",
                m.gflops);
  }
  const fp::Measurement all = fp::measure(widest, static_cast<int>(threads), seconds);
  std::printf("%ld thread%s, %s: %.1f GFLOP/s (%ld probes run together, best of %lld rounds)\n",
              threads, threads == 1 ? "" : "s", fp::isa_name(widest), all.gflops, threads,
              static_cast<long long>(all.rounds));
  return 0;
}
