// The GEMM layer of the CPU kernel: every product of the forward and backward goes through
// Gemm<T>. fp32 through the build's register-blocked micro-kernels (AVX2, AVX-512), or the BLAS
// torch links (MKL on x86), which also serves fp64, or opt-in oneDNN's brgemm; bf16/fp16 through
// torch's brgemm (oneDNN, AMX tiles where the CPU has them) with B packed to VNNI layout, bf16 also
// through amx.h's micro-kernel, or, where brgemm is unavailable, through this build's AVX512_BF16
// micro-kernel (AVX-512 CPUs with vdpbf16ps) or fp32 BLAS on converted tiles. Also the operand
// preparation: packing, transposes and zero padding.
//
// Part of the per-ISA CPU kernel: included by csrc/cpu/kernels.cpp only, inside
// aigc_ext::cpu::AIGC_ISA_NAMESPACE (see cpu/kernel_utils.h).
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <string>

#include "cpu/amx.h"
#include "cpu/kernel_utils.h"
#include "cpu/row_band.h"
#include "cpu/softmax_rows.h"
// The fp32 micro-kernels: AVX2's (6 x 16 tiles) and AVX-512's (6 x 64 tiles, on the same
// packed panels).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define AIGC_EXT_MICROKERNEL 1
#include "cpu/microkernel_avx2.h"
#else
#define AIGC_EXT_MICROKERNEL 0
#endif
#if defined(CPU_CAPABILITY_AVX512)
#include "cpu/microkernel_avx512.h"
#include "cpu/microkernel_avx512_bf16.h"
#endif

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {
namespace {

#if defined(CPU_CAPABILITY_AVX512)
namespace mk = avx512_micro;
#elif AIGC_EXT_MICROKERNEL
namespace mk = avx2_micro;
#endif

constexpr int64_t kPackN = 64;  // GEMM outputs (C) are padded to a multiple of this many columns

// fp32 forward GEMMs through oneDNN's brgemm (JIT AVX-512) instead of the micro-kernels: opt-in
// with AIGC_EXT_CPU_F32_BRGEMM=1, AVX-512 build only. The micro-kernels measured as fast in the
// forward, and they compute the backward's recomputed scores with the forward's own rounding.
inline bool use_f32_brgemm() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool on = [] {
    const char* v = std::getenv("AIGC_EXT_CPU_F32_BRGEMM");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
#else
  return false;
#endif
}

// fp32 GEMMs, and bf16/fp16 ones where brgemm is unavailable, through this build's own
// register-blocked micro-kernels (microkernel_avx2.h, microkernel_avx512.h) rather than BLAS: B
// packed once per block into panels and no per-call packing of A. In the AVX2 and AVX-512
// builds; AIGC_EXT_CPU_MICROKERNEL=0 opts out (to BLAS, or fp32 BLAS on converted tiles).
inline bool use_microkernel() {
#if AIGC_EXT_MICROKERNEL
  static const bool on = [] {
    const char* v = std::getenv("AIGC_EXT_CPU_MICROKERNEL");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
#else
  return false;
#endif
}

// What serves the bf16/fp16 products whose B is packed in VNNI pairs (the brgemm layout).
enum class VnniEngine {
  kNone,    // none: bf16/fp16 products are widened to fp32
  kBrgemm,  // torch's brgemm (oneDNN; AMX tiles where the CPU has them)
  kDpbf16,  // bf16 on this build's vdpbf16ps micro-kernel (microkernel_avx512_bf16.h)
};

// The engine for T under opt: torch's brgemm where it is on and can pack T, else, for bf16 in
// the AVX-512 build on a CPU with AVX512_BF16, vdpbf16ps (opt.use_avx512_bf16), else none.
template <typename T>
VnniEngine vnni_engine(const KernelOptions& opt) {
  if constexpr (!kReduced<T>) {
    return VnniEngine::kNone;
  } else {
    if (opt.use_brgemm && at::native::cpublas::could_pack(c10::CppTypeToScalarType<T>::value))
      return VnniEngine::kBrgemm;
#if defined(CPU_CAPABILITY_AVX512)
    if (std::is_same_v<T, c10::BFloat16> && opt.use_avx512_bf16 && cpu_has_avx512_bf16())
      return VnniEngine::kDpbf16;
#endif
    return VnniEngine::kNone;
  }
}

// ------------------------------------------------------------------------------------------
// GEMM layer
// ------------------------------------------------------------------------------------------

// Row-major C[M x N] = op(A)[M x K] * op(B)[K x N] + beta * C through column-major BLAS:
// C^T = op(B)^T op(A)^T.
template <typename A>
void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const A* a, int64_t lda,
               const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) c[i * ldc + j] = beta == A(0) ? A(0) : c[i * ldc + j] * beta;
    return;
  }
  const char transa = tb ? 'T' : 'N';
  const char transb = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const A alpha = 1;
  if constexpr (std::is_same_v<A, float>) {
    sgemm_(&transa, &transb, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else {
    dgemm_(&transa, &transb, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
  }
}

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols: a transpose, done in 16 x 16
// blocks so that both the reads and the writes stay within a few cache lines at a time.
template <typename T>
void transpose_into(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  constexpr int64_t kB = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kB) {
    const int64_t i1 = std::min(rows, i0 + kB);
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      // 16 source rows at a time: one gather per destination row segment.
      if (i1 - i0 == kB && lds * rows < (int64_t(1) << 31)) {
        const __m512i idx = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(static_cast<int>(lds)));
        const float* base = src + i0 * lds;
        for (int64_t j = 0; j < cols; ++j)
          _mm512_storeu_ps(dst + j * ldd + i0, _mm512_i32gather_ps(idx, base + j, 4));
        continue;
      }
    }
#endif
    for (int64_t j0 = 0; j0 < cols; j0 += kB) {
      const int64_t j1 = std::min(cols, j0 + kB);
      for (int64_t i = i0; i < i1; ++i) {
        const T* s = src + i * lds;
        for (int64_t j = j0; j < j1; ++j) dst[j * ldd + i] = s[j];
      }
    }
  }
}

// The B operand of a GEMM, prepared once and reused for several A operands.
template <typename T>
struct PackedB {
  int64_t K = 0, N = 0;
  // BLAS path: the source itself.
  const T* src = nullptr;
  int64_t ld = 0;
  bool trans = false;
  // brgemm path: VNNI layout, K padded to even and N to a multiple of 16.
  AlignedVector<T> vnni;
  int64_t k_even = 0, n_pad = 0;
  // fallback path for bf16/fp16 without brgemm: fp32 copy, row-major K x N; micro-kernel path:
  // fp32 panels of 16 columns (microkernel_avx2.h).
  AlignedVector<float> f32;
};

// All GEMMs of the kernels go through this class. C always has fp32 (fp64) elements and must
// have room for round_up(N, 64) columns: the brgemm path writes N rounded up to 16.
template <typename T>
class Gemm {
 public:
  using acc_t = acc_type<T>;
  // kBlas: fp32/fp64 BLAS (MKL); kBrgemmF32: fp32 through oneDNN's brgemm (JIT AVX-512);
  // kBrgemm: bf16/fp16 VNNI brgemm (AMX); kConvert: bf16/fp16 converted to fp32 BLAS;
  // kAmx: bf16 through this file's AMX micro-kernel (run() only, padded operands); kMicro:
  // fp32 (bf16/fp16 widened) through the AVX2 or AVX-512 build's micro-kernels; kDpbf16: bf16
  // through the AVX-512 build's vdpbf16ps micro-kernel, on brgemm's operand layouts.
  enum class Path { kBlas, kBrgemmF32, kBrgemm, kConvert, kAmx, kMicro, kDpbf16 };

  explicit Gemm(VnniEngine vnni = VnniEngine::kNone, bool f32_brgemm = false) {
    configure(vnni, f32_brgemm);
  }
  ~Gemm() { release(); }

  // micro: whether the micro-kernels may serve (where use_microkernel() allows them).
  void configure(VnniEngine vnni, bool f32_brgemm, bool amx = false, bool micro = true) {
    micro = micro && use_microkernel();
    if constexpr (kReduced<T>) {
      path_ = vnni == VnniEngine::kBrgemm   ? Path::kBrgemm
              : vnni == VnniEngine::kDpbf16 ? Path::kDpbf16
              : micro                       ? Path::kMicro
                                            : Path::kConvert;
      if (std::is_same_v<T, c10::BFloat16> && amx) path_ = Path::kAmx;
    } else if constexpr (std::is_same_v<T, float>) {
      path_ = f32_brgemm ? Path::kBrgemmF32 : micro ? Path::kMicro : Path::kBlas;
    } else {
      path_ = Path::kBlas;
    }
  }

  // Gives back the AMX tile state brgemm configured; call before leaving a parallel region.
  void release() {
    if (used_brgemm_) at::native::cpublas::brgemm_release(path_ == Path::kBrgemm);
    used_brgemm_ = false;
#if AIGC_EXT_AMX
    if (amx_configured_) amx_release();
#endif
    amx_configured_ = false;
  }

  // A operands need a zero-padded number of columns that is a multiple of this.
  int64_t k_align() const {
    return path_ == Path::kAmx ? 32 : path_ == Path::kBrgemm || path_ == Path::kDpbf16 ? 2 : 1;
  }

  // Columns per panel of a packed VNNI B (see pack), 0 for the unpanelled brgemm layout.
  int64_t panel_width() const { return path_ == Path::kAmx ? 16 : path_ == Path::kDpbf16 ? 64 : 0; }

  // Whether products run on this build's micro-kernels (see use_microkernel).
  bool micro() const { return path_ == Path::kMicro; }

  // B is logical K x N: element (k, n) is src[k * ld + n], or src[n * ld + k] when trans.
  void pack(PackedB<T>& pb, bool trans, int64_t K, int64_t N, const T* src, int64_t ld) {
    pb.K = K;
    pb.N = N;
#if AIGC_EXT_MICROKERNEL
    if constexpr (!std::is_same_v<T, double>) {
      if (path_ == Path::kMicro) {
        pb.f32.resize(std::max<int64_t>(mk::panels_size(K, N), 1));
        mk::pack_panels(trans, K, N, src, ld, pb.f32.data());
        return;
      }
    }
#endif
    if (path_ == Path::kBlas || (path_ == Path::kBrgemmF32 && !trans)) {
      pb.src = src;
      pb.ld = ld;
      pb.trans = trans;
      return;
    }
    if (path_ == Path::kBrgemmF32) {
      // brgemm takes B row-major: materialise the transpose once.
      pb.n_pad = round_up(N, 16);
      pb.f32.resize(std::max<int64_t>(K * pb.n_pad, 1));
      float* dst = pb.f32.data();
      if constexpr (std::is_same_v<T, float>) transpose_into(src, ld, N, K, dst, pb.n_pad);
      pb.src = reinterpret_cast<const T*>(dst);
      pb.ld = pb.n_pad;
      pb.trans = false;
      return;
    }
    if (path_ == Path::kConvert) {
      pb.f32.resize(std::max<int64_t>(K * N, 1));
      for (int64_t k = 0; k < K; ++k) {
        if (!trans) {
          convert_row(src + k * ld, pb.f32.data() + k * N, N);
        } else {
          for (int64_t n = 0; n < N; ++n) pb.f32[k * N + n] = static_cast<float>(src[n * ld + k]);
        }
      }
      return;
    }
    // VNNI layout for brgemm and AMX: pairs of consecutive k rows interleaved, [K/2][n_pad][2];
    // rows past K are zero. The AMX and vdpbf16ps paths cut it further into panels of W
    // columns, [n_pad/W][K/2][W][2] (W = panel_width()), so that the part of B one tile reads
    // is contiguous: 1 KiB per AMX tile.
    const int64_t W = panel_width();
    pb.k_even = round_up(K, k_align());
    pb.n_pad = round_up(N, W > 0 ? W : 16);
    const int64_t np = pb.n_pad;
    const int64_t panel = pb.k_even * W;
    // Offset of the pair (2 kp, 2 kp + 1) of column n; n % 16 == 0 starts 16 contiguous pairs.
    const auto off = [=](int64_t kp, int64_t n) {
      return W > 0 ? (n / W) * panel + kp * 2 * W + 2 * (n % W) : kp * 2 * np + 2 * n;
    };
    pb.vnni.resize(std::max<int64_t>(pb.k_even * np, 1));
    T* dst = pb.vnni.data();
    if (K != pb.k_even || N != np) std::memset(dst, 0, sizeof(T) * pb.k_even * np);
    if (!trans) {
      for (int64_t kp = 0; kp < K / 2; ++kp) {
        const T* r0 = src + (2 * kp) * ld;
        const T* r1 = r0 + ld;
        int64_t n = 0;
#if defined(CPU_CAPABILITY_AVX512)
        // Interleave 32 elements of each row: permutes pick a[j], b[j] alternately.
        const __m512i lo =
            _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                             38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
        for (; n + 32 <= N; n += 32) {
          const __m512i a = _mm512_loadu_si512(r0 + n);
          const __m512i b = _mm512_loadu_si512(r1 + n);
          _mm512_storeu_si512(dst + off(kp, n), _mm512_permutex2var_epi16(a, lo, b));
          _mm512_storeu_si512(dst + off(kp, n + 16), _mm512_permutex2var_epi16(a, hi, b));
        }
#endif
        for (; n < N; ++n) {
          dst[off(kp, n)] = r0[n];
          dst[off(kp, n) + 1] = r1[n];
        }
      }
      if (K % 2) {
        const T* r0 = src + (K - 1) * ld;
        for (int64_t n = 0; n < N; ++n) dst[off(K / 2, n)] = r0[n];
      }
    } else {
      // B(k, n) = src[n * ld + k]: each source row holds the k pairs for one column n.
      int64_t n_done = 0;
#if defined(CPU_CAPABILITY_AVX512)
      // Gather one k pair from 16 consecutive rows at a time.
      const __m512i rows =
          _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                             _mm512_set1_epi32(static_cast<int>(ld)));
      // Consecutive output rows (k pairs) of one 16-column group are this many elements apart.
      const int64_t out_step = off(1, 0) - off(0, 0);
      for (; n_done + 16 <= N && ld * N < (int64_t(1) << 30); n_done += 16) {
        const T* base = src + n_done * ld;
        int64_t kp = 0;
        // Whole 16 x 16 blocks of pairs: a register transpose of 32-bit words.
        if constexpr (sizeof(T) == 2) {
          for (; kp + 16 <= K / 2; kp += 16)
            avx512_micro::transpose16x16_words(base + 2 * kp, ld, dst + off(kp, n_done), out_step);
        }
        for (; kp < K / 2; ++kp) {
          const __m512i idx = _mm512_add_epi32(rows, _mm512_set1_epi32(static_cast<int>(2 * kp)));
          _mm512_storeu_si512(dst + off(kp, n_done), _mm512_i32gather_epi32(idx, base, 2));
        }
        if (K % 2) {
          for (int64_t j = 0; j < 16; ++j) dst[off(K / 2, n_done + j)] = base[j * ld + K - 1];
        }
      }
#endif
      for (int64_t n = n_done; n < N; ++n) {
        const T* row = src + n * ld;
        for (int64_t kp = 0; kp < K / 2; ++kp) {
          uint32_t pair;
          std::memcpy(&pair, row + 2 * kp, sizeof(pair));
          std::memcpy(dst + off(kp, n), &pair, sizeof(pair));
        }
        if (K % 2) dst[off(K / 2, n)] = row[K - 1];
      }
    }
  }

  // C[M x N] (+)= A[M x K] * B. A is row-major with leading dimension lda; on the brgemm path
  // it must have round_up(K, 2) readable columns, the extra one zero.
  //
  // n_use / k_use (when >= 0) restrict the product to the first columns / rows of B, e.g. the
  // keys a causal query block can see; n_off / k_off (multiples of 32) skip the first columns /
  // rows of B (and the matching columns of C / A), e.g. the keys before a window: only C's
  // columns [n_off, n_use) are written. band (row_band.h; its ranges counted from n_off /
  // k_off) lets the micro-kernels skip what each block of rows does not need; the other paths
  // compute everything.
  void run(int64_t M, const T* a, int64_t lda, const PackedB<T>& pb, acc_t* c, int64_t ldc,
           bool add, int64_t n_use = -1, int64_t k_use = -1, int64_t n_off = 0, int64_t k_off = 0,
           const RowBand& band = {}) {
    int64_t N = n_use < 0 ? pb.N : n_use, K = k_use < 0 ? pb.K : k_use;
    if (n_off > 0 || k_off > 0) {
      n_off = std::min(n_off, N);
      k_off = std::min(k_off, K);
      N -= n_off;
      K -= k_off;
      a += k_off;
      c += n_off;
    }
    if (M == 0 || N == 0) return;
#if AIGC_EXT_MICROKERNEL
    if constexpr (!std::is_same_v<T, double>) {
      if (path_ == Path::kMicro) {
        // Panels of 16 columns, K rows of 16 floats each (n_off is a multiple of 32).
        const float* b = pb.f32.data() + (n_off / mk::kNR) * pb.K * mk::kNR + k_off * mk::kNR;
        return micro_run(M, false, a, lda, K, b, pb.K, N, c, ldc, add, band);
      }
    }
#endif
    if constexpr (!kReduced<T>) {
      if constexpr (std::is_same_v<T, float>) {
        if (path_ == Path::kBrgemmF32 && K > 0) {
          used_brgemm_ = true;
          const T* b = pb.src + k_off * pb.ld + n_off;  // row-major K x N
          at::native::cpublas::brgemm(M, N, K, lda, pb.ld, ldc, add, a, b, c, false);
          return;
        }
      }
      const T* b = pb.trans ? pb.src + n_off * pb.ld + k_off : pb.src + k_off * pb.ld + n_off;
      blas_gemm<acc_t>(false, pb.trans, M, N, K, a, lda, b, pb.ld, add ? 1 : 0, c, ldc);
    } else {
      if (path_ == Path::kConvert) {
        a32_.resize(std::max<int64_t>(M * K, 1));
        for (int64_t i = 0; i < M; ++i) convert_row(a + i * lda, a32_.data() + i * K, K);
        blas_gemm<float>(false, false, M, N, K, a32_.data(), K,
                         pb.f32.data() + k_off * pb.N + n_off, pb.N, add ? 1.f : 0.f, c, ldc);
        return;
      }
      if (K == 0) {
        if (!add)
          for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + N, 0.f);
        return;
      }
#if AIGC_EXT_AMX
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (path_ == Path::kAmx) {
          if (!amx_configured_) {
            // torch's brgemm may have left its own tile configuration on this thread.
            at::native::cpublas::brgemm_release(true);
            amx_configure();
            amx_configured_ = true;
          }
          // Panels of 16 columns, k pairs 32 elements apart within one.
          amx_gemm(round_up(M, 16), std::min(round_up(N, 16), pb.n_pad - n_off), ceil_div(K, 32), a,
                   lda, pb.vnni.data() + (n_off / 16) * pb.k_even * 16 + k_off * 16, pb.k_even * 16,
                   c, ldc, add);
          return;
        }
      }
#endif
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (path_ == Path::kDpbf16) {
          // Panels of 64 columns, k pairs 128 elements apart within one.
          dpbf16::gemm(M, std::min(round_up(N, 16), pb.n_pad - n_off), ceil_div(K, 2), a, lda,
                       pb.vnni.data() + (k_off / 2) * dpbf16::kPairStride,
                       pb.k_even * dpbf16::kPanel, n_off / 16, c, ldc, add);
          return;
        }
      }
#endif
      used_brgemm_ = true;
      at::native::cpublas::brgemm(M, std::min(round_up(N, 16), pb.n_pad - n_off), round_up(K, 2),
                                  lda, pb.n_pad, ldc, add, a,
                                  pb.vnni.data() + k_off * pb.n_pad + 2 * n_off, c);
    }
  }

  // run() for a bf16/fp16 GEMM whose A is already fp32, on the micro-kernel path (micro()):
  // the forward's probabilities.
  void run_f32(int64_t M, const float* a, int64_t lda, const PackedB<T>& pb, acc_t* c, int64_t ldc,
               bool add, int64_t n_use = -1, int64_t k_use = -1, int64_t n_off = 0,
               int64_t k_off = 0, const RowBand& band = {}) {
    TORCH_CHECK(micro(), "aigc_ext: internal error: Gemm::run_f32 off the micro-kernel path");
#if AIGC_EXT_MICROKERNEL
    if constexpr (!std::is_same_v<T, double>) {
      int64_t N = n_use < 0 ? pb.N : n_use, K = k_use < 0 ? pb.K : k_use;
      n_off = std::min(n_off, N);
      k_off = std::min(k_off, K);
      N -= n_off;
      K -= k_off;
      if (M == 0 || N == 0) return;
      const float* b = pb.f32.data() + (n_off / mk::kNR) * pb.K * mk::kNR + k_off * mk::kNR;
      mk::gemm(M, N, K, false, a + k_off, lda, b, pb.K * mk::kNR, c + n_off, ldc, add, band);
    }
#endif
  }

  // C[M x N] (+)= op(A) op(B) for operands used once. Not on the kAmx path.
  void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,
          int64_t ldb, acc_t* c, int64_t ldc, bool add) {
    TORCH_CHECK(path_ != Path::kAmx, "aigc_ext: internal error: Gemm::mm on the AMX path");
#if AIGC_EXT_MICROKERNEL
    if constexpr (!std::is_same_v<T, double>) {
      if (path_ == Path::kMicro) {
        if (M == 0 || N == 0) return;
        pack(scratch_, tb, K, N, b, ldb);
        return micro_run(M, ta, a, lda, K, scratch_.f32.data(), K, N, c, ldc, add);
      }
    }
#endif
    if (path_ == Path::kBlas) {
      if constexpr (!kReduced<T>) {
        blas_gemm<acc_t>(ta, tb, M, N, K, a, lda, b, ldb, add ? 1 : 0, c, ldc);
      }
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (path_ == Path::kBrgemmF32 && ta) {
        a32_.resize(std::max<int64_t>(M * K, 1));
        for (int64_t k = 0; k < K; ++k)
          for (int64_t i = 0; i < M; ++i) a32_[i * K + k] = a[k * lda + i];
        a = a32_.data();
        lda = K;
        ta = false;
      }
    }
    pack(scratch_, tb, K, N, b, ldb);
    const int64_t ke = round_up(K, k_align());
    if (path_ != Path::kBrgemmF32 && (ta || ke != K)) {
      if (static_cast<int64_t>(a_copy_.size()) < M * ke) a_copy_.resize(M * ke);
      T* dst = a_copy_.data();
      if (ta) {
        transpose_into(a, lda, K, M, dst, ke);
      } else {
        for (int64_t i = 0; i < M; ++i) std::memcpy(dst + i * ke, a + i * lda, sizeof(T) * K);
      }
      for (int64_t i = 0; i < M; ++i)
        for (int64_t k = K; k < ke; ++k) dst[i * ke + k] = T(0);
      a = dst;
      lda = ke;
    }
    run(M, a, lda, scratch_, c, ldc, add);
  }

 private:
#if AIGC_EXT_MICROKERNEL
  // C[M x N] (+)= op(A)[M x K] * B on the micro-kernels: b points into panels packed by pack()
  // for a B of panel_k rows, at its first row and column used. A bf16/fp16 operand is widened
  // into one fp32 copy first, in its own layout.
  void micro_run(int64_t M, bool ta, const T* a, int64_t lda, int64_t K, const float* b,
                 int64_t panel_k, int64_t N, acc_t* c, int64_t ldc, bool add,
                 const RowBand& band = {}) {
    const float* af;
    int64_t ldf;
    if constexpr (std::is_same_v<T, float>) {
      af = a;
      ldf = lda;
    } else {
      // ta: A is stored as K rows of M elements.
      const int64_t rows = ta ? K : M, cols = ta ? M : K;
      a32_.resize(std::max<int64_t>(rows * cols, 1));
      for (int64_t i = 0; i < rows; ++i) mk::widen_row(a + i * lda, a32_.data() + i * cols, cols);
      af = a32_.data();
      ldf = cols;
    }
    mk::gemm(M, N, K, ta, af, ldf, b, panel_k * mk::kNR, c, ldc, add, band);
  }
#endif

  Path path_;
  bool used_brgemm_ = false;
  bool amx_configured_ = false;
  AlignedVector<T> a_copy_;
  AlignedVector<float> a32_;
  PackedB<T> scratch_;
};

// Copies rows [0, m) of a (ld) into dst with width k_even, zero-padding column k.
template <typename T>
void copy_padded(const T* a, int64_t ld, int64_t m, int64_t k, int64_t k_even, T* dst) {
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(dst + i * k_even, a + i * ld, sizeof(T) * k);
    for (int64_t j = k; j < k_even; ++j) dst[i * k_even + j] = T(0);
  }
}

}  // namespace
}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
