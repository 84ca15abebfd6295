// The fp32 FMA peak probe as operators: aigc_ext::_fma_peak_gflops and aigc_ext::_fma_peak_info.
//
// `aigc-ext bench` scales its rows by the arithmetic ceiling of the path each row's kernel takes;
// for fp32 math (and bf16/fp16 converted to fp32) that is this probe's figure, measured in the
// benchmark's own process with its thread count (csrc/cpu/fma_peak.h has the method). The
// operators register from this file as a fragment of the aigc_ext library, so csrc/ops.cpp does
// not know about them.

#include "cpu/fma_peak.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

namespace aigc_ext {
namespace {

namespace fp = aigc_ext::fma_peak;

constexpr double kMaxSeconds = 60.0;
constexpr int64_t kMaxThreads = 4096;

fp::Isa parse_isa(const std::string& isa) {
  if (isa == "auto") return fp::widest_isa();
  fp::Isa want = fp::Isa::kScalar;
  if (isa == "avx512_bf16") {
    want = fp::Isa::kAvx512Bf16;
  } else if (isa == "avx512") {
    want = fp::Isa::kAvx512;
  } else if (isa == "avx2") {
    want = fp::Isa::kAvx2;
  } else {
    TORCH_CHECK(isa == "scalar",
                "_fma_peak_gflops: isa must be one of auto, scalar, avx2, avx512, avx512_bf16; ",
                "got '", isa, "'");
  }
  TORCH_CHECK(fp::isa_supported(want), "_fma_peak_gflops: isa='", isa,
              "' is not supported by this CPU (the widest it has is ",
              fp::isa_name(fp::widest_isa()), ")");
  return want;
}

// GFLOP/s of `threads` threads (0: torch's intra-op thread count) running the fp32 FMA loop of
// `isa` (or, for avx512_bf16, the vdpbf16ps loop) together for about `seconds`.
double fma_peak_gflops(double seconds, int64_t threads, const std::string& isa) {
  TORCH_CHECK(std::isfinite(seconds) && seconds > 0 && seconds <= kMaxSeconds,
              "_fma_peak_gflops: seconds must be a finite number in (0, ", kMaxSeconds, "], got ",
              seconds);
  TORCH_CHECK(threads >= 0 && threads <= kMaxThreads, "_fma_peak_gflops: threads must be in [0, ",
              kMaxThreads, "] (0: torch's thread count), got ", threads);
  const fp::Isa chosen = parse_isa(isa);
  const int n = threads == 0 ? at::get_num_threads() : static_cast<int>(threads);
  return fp::measure(chosen, n, seconds).gflops;
}

// "isa=avx512 lanes=16 accumulators=12 avx2_fma=1 avx512f=1 avx512_bf16=1 avx512_fp16=0
// amx_bf16=0 amx_fp16=0": the loop _fma_peak_gflops runs by default and what the CPU has.
std::string fma_peak_info() {
  const fp::CpuFeatures f = fp::detect_cpu();
  const fp::Isa isa = fp::widest_isa(f);
  std::ostringstream os;
  os << "isa=" << fp::isa_name(isa) << " lanes=" << fp::isa_lanes(isa)
     << " accumulators=" << fp::kAccumulators << " avx2_fma=" << f.avx2_fma
     << " avx512f=" << f.avx512f << " avx512_bf16=" << f.avx512_bf16
     << " avx512_fp16=" << f.avx512_fp16 << " amx_bf16=" << f.amx_bf16
     << " amx_fp16=" << f.amx_fp16;
  return os.str();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(aigc_ext, m) {
  m.def("_fma_peak_gflops(float seconds, int threads=0, str isa='auto') -> float",
        &fma_peak_gflops);
  m.def("_fma_peak_info() -> str", &fma_peak_info);
}

}  // namespace aigc_ext
