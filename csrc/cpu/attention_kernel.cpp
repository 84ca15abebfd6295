// Fused attention on CPUs: FlashAttention-2 style tiling with an online softmax.
//
// This file is compiled once per instruction set (see CMakeLists.txt). Each copy lives in its
// own namespace, aigc_ext::cpu::<isa>, and sees ATen's Vectorized<T> for that instruction set.
//
// Forward, per task = (batch, query head, chunk of query rows):
//   for each key/value block (BK keys):      pack K^T and V once, reused by every query block
//     for each query block (BQ rows):        S = Q K^T          (GEMM, fp32 accumulate)
//                                            online softmax     (running max m, running sum l)
//                                            acc = acc*alpha + P V   (GEMM)
//   out = acc / l,  lse = m + log(l)
// Nothing of size L x S is ever stored; the working set per thread is one BQ x BK score tile
// plus the chunk's accumulator.
//
// Backward, per task = (batch, KV head, chunk of key blocks), probabilities recomputed from lse:
//   P = exp(scale*S - lse), dV += P^T dO, dP = dO V^T, dS = P*(dP - D) with D = rowsum(dO*O),
//   dK += scale * dS^T Q, dQ += scale * dS K.
// dK and dV are owned by the task (all query heads of a GQA group are visited inside it), so
// they need no reduction; dQ is accumulated per key chunk in fp32 and summed at the end, which
// lets a single (batch, head) use every core.
//
// GEMMs: fp32/fp64 through the BLAS torch links (MKL on x86); bf16/fp16 through torch's brgemm
// (oneDNN, AMX tiles where the CPU has them) with B packed to VNNI layout, or, where brgemm is
// unavailable, through fp32 BLAS on converted tiles.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "cpu/amx_tiles.h"
#include "cpu/attention.h"

// The AMX tile code needs the compiler's AMX intrinsics (GCC 11, clang 12 and later); without
// them bf16 GEMMs go through torch's brgemm only.
#if defined(CPU_CAPABILITY_AVX512) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define AIGC_EXT_AMX 1
#else
#define AIGC_EXT_AMX 0
#endif

#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/cpu/Utils.h>
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#ifndef AIGC_ISA_NAMESPACE
#error "AIGC_ISA_NAMESPACE must be defined by the build (one of default_, avx2, avx512)"
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

using at::vec::Vectorized;

template <typename T>
constexpr bool kReduced = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kPackN = 64;  // GEMM outputs (C) are padded to a multiple of this many columns

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

// fp32 GEMMs through oneDNN's brgemm (JIT AVX-512) rather than BLAS: faster for the small,
// fixed-shape tiles of this kernel. Only in the AVX-512 build; AIGC_EXT_CPU_F32_BRGEMM=0 opts out.
inline bool use_f32_brgemm() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool on = [] {
    const char* v = std::getenv("AIGC_EXT_CPU_F32_BRGEMM");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
#else
  return false;
#endif
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

// A running maximum m beyond this magnitude is subtracted exactly: the fused exponential
// passes compute s * scale - m with one FMA, which differs from fl(s * scale) - m by up to
// about |m| * eps; below the bound that is a few hundredths (a common factor, cancelled by the
// normalisation), far above it the exponentials overflow or underflow. 2^17 for fp32.
template <typename A>
constexpr A kExactShift = A(1) / (64 * std::numeric_limits<A>::epsilon());

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

#if AIGC_EXT_AMX
// ------------------------------------------------------------------------------------------
// AMX bf16 micro-kernel
// ------------------------------------------------------------------------------------------
//
// The attention GEMMs are small and fixed-shape (a 128 x 64 query tile against 512 keys, then
// 128 x 512 probabilities against a 512 x 64 value tile), so a general GEMM library spends a
// large share of their time on per-call dispatch and tile reconfiguration. Here one tile
// configuration serves both products for a whole forward call: every tile register is
// 16 rows x 64 bytes, i.e. 16 x 32 bf16 for A, 16 pairs x 16 columns (VNNI) for B and
// 16 x 16 fp32 for C. A 32 x 32 block of C lives in tiles 0-3 across the whole K loop; tiles
// 4-5 hold two A row tiles and 6-7 two B column tiles.
//
// Operands must be padded by the caller: M and N to multiples of 16 (rows of A and columns of
// B beyond the real ones are read, their products are discarded), K to a multiple of 32 with
// zeros (those products are added).

inline bool cpu_has_amx_bf16() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
    // The kernel must also be allowed to use the tile state; torch asks the OS for it.
    return tile && bf16 && at::cpu::init_amx();
  }();
  return has;
}

__attribute__((target("amx-tile"))) void amx_configure() {
  const AmxTileConfig cfg = amx_full_tiles();
  amx_load_config(cfg);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// C[16*MT x 16*NT] (+)= A[16*MT x 32*ksteps] * B, B in VNNI panels of 16 columns
// ([k/2][16][2] each, the next panel `panel` elements further). Strides in elements.
template <int MT, int NT>
__attribute__((target("amx-tile,amx-bf16"))) void amx_block(const c10::BFloat16* a, int64_t lda,
                                                            const c10::BFloat16* b, int64_t panel,
                                                            int64_t ksteps, float* c, int64_t ldc,
                                                            bool add) {
  const int64_t sa = lda * 2, sb = 64, sc = ldc * 4;
  if (add) {
    _tile_loadd(0, c, sc);
    if constexpr (NT > 1) _tile_loadd(1, c + 16, sc);
    if constexpr (MT > 1) _tile_loadd(2, c + 16 * ldc, sc);
    if constexpr (MT > 1 && NT > 1) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (MT > 1) _tile_zero(2);
    if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  }
  for (int64_t ks = 0; ks < ksteps; ++ks) {
    const c10::BFloat16* ak = a + 32 * ks;
    const c10::BFloat16* bk = b + 512 * ks;  // 16 pairs x 16 columns x 2
    _tile_loadd(4, ak, sa);
    _tile_loadd(6, bk, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) {
      _tile_loadd(7, bk + panel, sb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MT > 1) {
      _tile_loadd(5, ak + 16 * lda, sa);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if constexpr (NT > 1) _tile_stored(1, c + 16, sc);
  if constexpr (MT > 1) _tile_stored(2, c + 16 * ldc, sc);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, c + 16 * ldc + 16, sc);
}

// C[M x N] (+)= A[M x 32*ksteps] * B for M, N multiples of 16; the tiles must be configured.
void amx_gemm(int64_t M, int64_t N, int64_t ksteps, const c10::BFloat16* a, int64_t lda,
              const c10::BFloat16* b, int64_t panel, float* c, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; i += 32) {
    const bool two_m = i + 16 < M;
    const c10::BFloat16* ai = a + i * lda;
    float* ci = c + i * ldc;
    for (int64_t j = 0; j < N; j += 32) {
      const bool two_n = j + 16 < N;
      const c10::BFloat16* bj = b + (j / 16) * panel;
      if (two_m && two_n) {
        amx_block<2, 2>(ai, lda, bj, panel, ksteps, ci + j, ldc, add);
      } else if (two_m) {
        amx_block<2, 1>(ai, lda, bj, panel, ksteps, ci + j, ldc, add);
      } else if (two_n) {
        amx_block<1, 2>(ai, lda, bj, panel, ksteps, ci + j, ldc, add);
      } else {
        amx_block<1, 1>(ai, lda, bj, panel, ksteps, ci + j, ldc, add);
      }
    }
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// The transpose of a 16 x 16 block of 32-bit words (pairs of 16-bit elements): word j of
// source row i (16 rows of T, ld elements apart, starting at src) goes to word i of output
// row j (16 rows, out_step elements apart). Unpacks and lane shuffles, no memory round trip.
template <typename T>
inline void transpose16x16_words(const T* src, int64_t ld, T* out, int64_t out_step) {
  static_assert(sizeof(T) == 2);
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ld);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // Now 128-bit lane L of r[4 g + j] holds rows 4g..4g+3 of word column 4 L + j.
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);           // lanes 0 and 2 of groups 0, 1
    t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);       // lanes 1 and 3
    t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);  // same for groups 2, 3
    t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    _mm512_storeu_si512(out + j * out_step, _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88));
    _mm512_storeu_si512(out + (4 + j) * out_step, _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88));
    _mm512_storeu_si512(out + (8 + j) * out_step, _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD));
    _mm512_storeu_si512(out + (12 + j) * out_step, _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xDD));
  }
}
#endif

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
  // fallback path for bf16/fp16 without brgemm: fp32 copy, row-major K x N.
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
  // kAmx: bf16 through this file's AMX micro-kernel (run() only, padded operands).
  enum class Path { kBlas, kBrgemmF32, kBrgemm, kConvert, kAmx };

  explicit Gemm(bool use_brgemm = false, bool f32_brgemm = false) {
    configure(use_brgemm, f32_brgemm);
  }
  ~Gemm() { release(); }

  void configure(bool use_brgemm, bool f32_brgemm, bool amx = false) {
    if constexpr (kReduced<T>) {
      path_ = use_brgemm ? Path::kBrgemm : Path::kConvert;
      if (std::is_same_v<T, c10::BFloat16> && amx) path_ = Path::kAmx;
    } else if constexpr (std::is_same_v<T, float>) {
      path_ = f32_brgemm ? Path::kBrgemmF32 : Path::kBlas;
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
  int64_t k_align() const { return path_ == Path::kAmx ? 32 : path_ == Path::kBrgemm ? 2 : 1; }

  // B is logical K x N: element (k, n) is src[k * ld + n], or src[n * ld + k] when trans.
  void pack(PackedB<T>& pb, bool trans, int64_t K, int64_t N, const T* src, int64_t ld) {
    pb.K = K;
    pb.N = N;
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
    // rows past K are zero. The AMX path cuts it further into panels of 16 columns,
    // [n_pad/16][K/2][16][2], so that one B tile is 1 KiB of contiguous memory.
    pb.k_even = round_up(K, k_align());
    pb.n_pad = round_up(N, 16);
    const int64_t np = pb.n_pad;
    const bool panels = path_ == Path::kAmx;
    const int64_t panel = pb.k_even * 16;
    // Offset of the pair (2 kp, 2 kp + 1) of column n; n % 16 == 0 starts 16 contiguous pairs.
    const auto off = [=](int64_t kp, int64_t n) {
      return panels ? (n / 16) * panel + kp * 32 + 2 * (n % 16) : kp * 2 * np + 2 * n;
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
            transpose16x16_words(base + 2 * kp, ld, dst + off(kp, n_done), out_step);
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
  // keys a causal query block can see.
  void run(int64_t M, const T* a, int64_t lda, const PackedB<T>& pb, acc_t* c, int64_t ldc,
           bool add, int64_t n_use = -1, int64_t k_use = -1) {
    const int64_t N = n_use < 0 ? pb.N : n_use, K = k_use < 0 ? pb.K : k_use;
    if (M == 0 || N == 0) return;
    if constexpr (!kReduced<T>) {
      if constexpr (std::is_same_v<T, float>) {
        if (path_ == Path::kBrgemmF32 && K > 0) {
          used_brgemm_ = true;
          at::native::cpublas::brgemm(M, N, K, lda, pb.ld, ldc, add, a, pb.src, c, false);
          return;
        }
      }
      blas_gemm<acc_t>(false, pb.trans, M, N, K, a, lda, pb.src, pb.ld, add ? 1 : 0, c, ldc);
    } else {
      if (path_ == Path::kConvert) {
        a32_.resize(std::max<int64_t>(M * K, 1));
        for (int64_t i = 0; i < M; ++i) convert_row(a + i * lda, a32_.data() + i * K, K);
        blas_gemm<float>(false, false, M, N, K, a32_.data(), K, pb.f32.data(), pb.N,
                         add ? 1.f : 0.f, c, ldc);
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
          amx_gemm(round_up(M, 16), std::min(round_up(N, 16), pb.n_pad), ceil_div(K, 32), a, lda,
                   pb.vnni.data(), pb.k_even * 16, c, ldc, add);
          return;
        }
      }
#endif
      used_brgemm_ = true;
      at::native::cpublas::brgemm(M, std::min(round_up(N, 16), pb.n_pad), round_up(K, 2), lda,
                                  pb.n_pad, ldc, add, a, pb.vnni.data(), c);
    }
  }

  // C[M x N] (+)= op(A) op(B) for operands used once. Not on the kAmx path.
  void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,
          int64_t ldb, acc_t* c, int64_t ldc, bool add) {
    TORCH_CHECK(path_ != Path::kAmx, "aigc_ext: internal error: Gemm::mm on the AMX path");
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
  Path path_;
  bool used_brgemm_ = false;
  bool amx_configured_ = false;
  AlignedVector<T> a_copy_;
  AlignedVector<float> a32_;
  PackedB<T> scratch_;
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

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) for 16 floats: x = n*ln2 + r with |r| <= ln2/2 (ln2 split in two for the reduction),
// e^r by its Taylor polynomial of degree 6 (relative error ~1e-7), 2^n applied with vscalefps.
// Inputs below -126.5 give exactly 0 (-inf included); NaN propagates. Used where the
// exponentials are stored in fp32 outside the forward's fused row pass.
inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-126.5f), x);  // NaN in x is returned as is
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
  return _mm512_scalef_ps(p, n);
}

inline bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// 2^x for 16 floats: x = n + f with |f| <= 1/2, 2^f by a minimax polynomial of degree kDegree
// (4: relative error 2.7e-6, for probabilities rounded to bf16 next, far below half an ulp;
// 5: 2.3e-7 evaluated in fp32, for fp32 probabilities), 2^n applied with vscalefps. Inputs
// below -127 give 0 or a denormal (-inf included); NaN propagates; large inputs give +inf (the
// caller redoes such rows against a larger maximum).
template <int kDegree>
inline __m512 exp2_avx512(__m512 x) {
  static_assert(kDegree == 4 || kDegree == 5);
  x = _mm512_max_ps(_mm512_set1_ps(-127.f), x);  // NaN in x is returned as is
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
  return _mm512_scalef_ps(p, n);
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// The fused row pass of the forward for bf16 (hardware conversion) and fp32 probabilities:
// out[i] = exp(s[i] * scale - shift) rounded to T, the fp32 sum returned, max(s[i] * scale -
// shift) in *xmax. Computed as 2^(s * scale * log2e - shift * log2e), which saves the range
// reduction's multiply. Marked avx512bf16 for the bf16 conversion; the fp32 instantiation
// contains no bf16 instruction and runs on any AVX-512 CPU.
template <typename T>
__attribute__((target("avx512bf16"))) inline float row_exp_sum_avx512(const float* s, int64_t n,
                                                                      float scale, float shift,
                                                                      T* out, float* xmax) {
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  static_assert(kBf16 || std::is_same_v<T, float>);
  constexpr int kDegree = kBf16 ? 4 : 5;
  const __m512 vscale = _mm512_set1_ps(scale * kLog2e), vshift = _mm512_set1_ps(shift * kLog2e);
  // Two sums and two maxima: independent chains for the two halves of each step.
  __m512 vsum = _mm512_setzero_ps(), vsum1 = _mm512_setzero_ps();
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vmax1 = vmax;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 x0 = _mm512_fmsub_ps(_mm512_loadu_ps(s + i), vscale, vshift);
    const __m512 x1 = _mm512_fmsub_ps(_mm512_loadu_ps(s + i + 16), vscale, vshift);
    vmax = _mm512_max_ps(vmax, x0);
    vmax1 = _mm512_max_ps(vmax1, x1);
    const __m512 e0 = exp2_avx512<kDegree>(x0);
    const __m512 e1 = exp2_avx512<kDegree>(x1);
    vsum = _mm512_add_ps(vsum, e0);
    vsum1 = _mm512_add_ps(vsum1, e1);
    if constexpr (kBf16) {
      _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    } else {
      _mm512_storeu_ps(out + i, e0);
      _mm512_storeu_ps(out + i + 16, e1);
    }
  }
  for (; i < n; i += 16) {
    const int64_t r = std::min<int64_t>(16, n - i);
    const __mmask16 k = static_cast<__mmask16>((1u << r) - 1);
    const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + i), vscale, vshift);
    vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
    const __m512 e = _mm512_maskz_mov_ps(k, exp2_avx512<kDegree>(x));
    vsum = _mm512_add_ps(vsum, e);
    if constexpr (kBf16) {
      _mm256_mask_storeu_epi16(out + i, k, (__m256i)_mm512_cvtneps_pbh(e));
    } else {
      _mm512_mask_storeu_ps(out + i, k, e);
    }
  }
  *xmax = _mm512_reduce_max_ps(_mm512_max_ps(vmax, vmax1)) * kLn2;
  return _mm512_reduce_add_ps(_mm512_add_ps(vsum, vsum1));
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

// out[i] = exp(s[i] * scale - shift) rounded to T (bf16/fp16), for i < n; returns the fp32 sum
// and, in *xmax, max(s[i] * scale - shift). Fuses the exponential, the row sum, the row maximum
// and the down-conversion into one pass over the scores.
template <typename T>
inline float row_exp_sum_to(const float* s, int64_t n, float scale, float shift, T* out,
                            float* xmax) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (cpu_has_avx512_bf16()) return row_exp_sum_avx512(s, n, scale, shift, out, xmax);
  }
  if constexpr (std::is_same_v<T, float>) return row_exp_sum_avx512(s, n, scale, shift, out, xmax);
#endif
  using fVec = Vectorized<float>;
  using rVec = Vectorized<T>;
  const fVec vscale(scale), vshift(shift);
  fVec vsum(0.f), vmax(neg_inf<float>());
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + fVec::size() <= n; i += fVec::size()) {
      const fVec x = at::vec::fmsub(fVec::loadu(s + i), vscale, vshift);
      vmax = at::vec::maximum(vmax, x);
      const fVec e = vexp(x);
      vsum = vsum + e;
      e.store(out + i);
    }
  } else {
    static_assert(rVec::size() == 2 * fVec::size());
    for (; i + rVec::size() <= n; i += rVec::size()) {
      const fVec x0 = at::vec::fmsub(fVec::loadu(s + i), vscale, vshift);
      const fVec x1 = at::vec::fmsub(fVec::loadu(s + i + fVec::size()), vscale, vshift);
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
    const float x = s[i] * scale - shift;
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

// Applies scale and the user mask to one row of raw scores: s = s*scale + mask (float masks),
// or s*scale where the bool mask is true and -inf where it is false.
template <typename T, typename A>
inline void apply_mask_row(A* s, int64_t n, A scale, const AttentionForwardParams& p,
                           const char* mask_row) {
  const int64_t ms = p.mask_stride_s;
  switch (p.mask_kind) {
    case MaskKind::kBool: {
      const bool* m = reinterpret_cast<const bool*>(mask_row);
      for (int64_t j = 0; j < n; ++j) s[j] = m[j * ms] ? s[j] * scale : neg_inf<A>();
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

// Copies rows [0, m) of a (ld) into dst with width k_even, zero-padding column k.
template <typename T>
void copy_padded(const T* a, int64_t ld, int64_t m, int64_t k, int64_t k_even, T* dst) {
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(dst + i * k_even, a + i * ld, sizeof(T) * k);
    for (int64_t j = k; j < k_even; ++j) dst[i * k_even + j] = T(0);
  }
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

constexpr int64_t kFwdBlockQ = 128;
// With AMX the GEMMs are fast enough that the score tile's trip through the cache matters:
// 64 rows (a 64 x 512 fp32 score tile) measured best here.
constexpr int64_t kFwdBlockQAmx = 64;
constexpr int64_t kFwdBlockKV = 512;
// fp32 through the JIT brgemm: the GEMMs run near the FMA peak and the score tile's trips
// through the cache dominate the rest, so 128 x 128 tiles (64 KiB of scores) measured best.
constexpr int64_t kFwdBlockKVF32 = 128;
constexpr int64_t kFwdMaxChunkRows = 4096;
constexpr float kLazyMax = 8.f;

// ------------------------------------------------------------------------------------------
// Forward for short queries (decoding with a KV cache): split-KV
// ------------------------------------------------------------------------------------------
//
// With L <= kDecodeMaxLen the query tiles are too short to amortise packing K and V, and
// batch x heads may be smaller than the number of cores. So: one task per (batch, KV head,
// key split). A task takes every query row of the GQA group at once (group * L rows), so each
// key and value is read once per group, streams its keys in blocks (converted to fp32 when
// needed), keeps a partial online-softmax state (m, l, acc) per row, and the partial states
// of the splits are merged at the end through their logsumexps.

#if defined(CPU_CAPABILITY_AVX512)
// Lane j of the result is the sum of the 16 lanes of v[j]: a transpose-and-add tree, 45
// shuffles and adds for 16 sums instead of a separate horizontal reduction per vector.
inline __m512 sum16_avx512(const __m512* v) {
  __m512 w[8], y[4];
  for (int k = 0; k < 8; ++k) {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for a = v[2k], b = v[2k+1].
    w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                         _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  }
  for (int k = 0; k < 4; ++k) {
    // Per 128-bit lane: that lane's partial sums of v[4k], ..., v[4k+3].
    y[k] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Add the four 128-bit lanes: first in pairs, then the pairs.
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The 16 fp32 lanes whose sum is dot(a, b) for rows of length n: fp32 by FMAs, bf16 by
// vdpbf16ps (pairs multiplied and accumulated in fp32).
inline __m512 dot_row(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 mk = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - c)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + c), _mm512_maskz_loadu_ps(mk, b + c), acc);
  }
  return acc;
}
__attribute__((target("avx512bf16"))) inline __m512 dot_row(const c10::BFloat16* a,
                                                            const c10::BFloat16* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + c),
                           (__m512bh)_mm512_loadu_si512(b + c));
  }
  if (c < n) {
    const __mmask32 tail = static_cast<__mmask32>((1ull << (n - c)) - 1);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(tail, a + c),
                           (__m512bh)_mm512_maskz_loadu_epi16(tail, b + c));
  }
  return acc;
}

// s[g * lds + j] = dot(q_g, k_j) for fp32 rows, or bf16 rows straight from bf16 (no conversion
// pass over the keys). Keys go 16 at a time, their 16 dot products summed together by
// sum16_avx512. Marked avx512bf16 for the bf16 dot product; the fp32 instantiation contains no
// bf16 instruction.
template <typename T>
__attribute__((target("avx512bf16"))) void qk_dot(const T* q, int64_t G, int64_t E, const T* k,
                                                  int64_t ldk, int64_t nb, float* s, int64_t lds) {
  int64_t j0 = 0;
  for (; j0 + 16 <= nb; j0 += 16) {
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc[16];
      for (int u = 0; u < 16; ++u) acc[u] = dot_row(q + g * E, k + (j0 + u) * ldk, E);
      _mm512_storeu_ps(s + g * lds + j0, sum16_avx512(acc));
    }
  }
  for (int64_t j = j0; j < nb; ++j) {
    for (int64_t g = 0; g < G; ++g)
      s[g * lds + j] = _mm512_reduce_add_ps(dot_row(q + g * E, k + j * ldk, E));
  }
}
#endif

constexpr int64_t kDecodeMaxLen = 16;
constexpr int64_t kDecodeMaxRows = 128;  // group * L
constexpr int64_t kDecodeBlock = 512;    // keys per block
constexpr int64_t kDecodeDotRows = 8;    // bf16 scores by dot products up to this many rows

#if defined(CPU_CAPABILITY_AVX512)
// acc[g * Ev + e] += sum_j s[g * lds + j] * v[j * ldv + e] for G <= 2 rows of probabilities and
// fp32 or bf16 values (widened on the fly). Each 64-column chunk of the rows' accumulators stays
// in registers across all keys, and bf16 values need no fp32 copy written and read back: a
// decoding step is bound by memory traffic.
template <typename T>
void pv_rows(const float* s, int64_t lds, int64_t G, const T* v, int64_t ldv, int64_t nb,
             float* acc, int64_t Ev) {
  for (int64_t c0 = 0; c0 < Ev; c0 += 64) {
    __mmask16 mk[4];
    for (int u = 0; u < 4; ++u) {
      const int64_t left = std::clamp<int64_t>(Ev - c0 - 16 * u, 0, 16);
      mk[u] = static_cast<__mmask16>((1u << left) - 1);
    }
    __m512 a0[4], a1[4];
    for (int u = 0; u < 4; ++u) {
      a0[u] = _mm512_maskz_loadu_ps(mk[u], acc + c0 + 16 * u);
      a1[u] = G > 1 ? _mm512_maskz_loadu_ps(mk[u], acc + Ev + c0 + 16 * u) : _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < nb; ++j) {
      const T* vj = v + j * ldv + c0;
      const __m512 p0 = _mm512_set1_ps(s[j]);
      const __m512 p1 = _mm512_set1_ps(G > 1 ? s[lds + j] : 0.f);
      for (int u = 0; u < 4; ++u) {
        if (!mk[u]) break;
        const __m512 x = load16_f32(vj + 16 * u, mk[u]);
        a0[u] = _mm512_fmadd_ps(p0, x, a0[u]);
        if (G > 1) a1[u] = _mm512_fmadd_ps(p1, x, a1[u]);
      }
    }
    for (int u = 0; u < 4; ++u) {
      _mm512_mask_storeu_ps(acc + c0 + 16 * u, mk[u], a0[u]);
      if (G > 1) _mm512_mask_storeu_ps(acc + Ev + c0 + 16 * u, mk[u], a1[u]);
    }
  }
}

#endif

template <typename T>
void decode_impl(const AttentionForwardParams& p) {
  using A = acc_type<T>;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, L = p.len_q, S = p.len_kv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v, group = Hq / Hkv, G = group * L;
  T* out = static_cast<T*>(p.out);
  A* lse = static_cast<A*>(p.lse);
  const size_t mesize = mask_elem_size(p, sizeof(T));
  const A scale = static_cast<A>(p.scale);
  const int64_t nthreads = at::get_num_threads();
  const int64_t nblocks = ceil_div(S, kDecodeBlock);
  int64_t splits = std::min(nblocks, std::max<int64_t>(1, ceil_div(4 * nthreads, B * Hkv)));
  const int64_t blocks_per_split = ceil_div(nblocks, splits);
  splits = ceil_div(nblocks, blocks_per_split);
  const int64_t ntasks = B * Hkv * splits;
  // Partial states: (B, Hkv, splits, G) rows of m, l and acc (Ev).
  std::vector<A> part_m(ntasks * G), part_l(ntasks * G), part_acc(ntasks * G * Ev);
  // One or two fp32 or bf16 rows: P V straight from the values (pv_rows).
  bool fused_pv = false;
#if defined(CPU_CAPABILITY_AVX512)
  fused_pv = (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>) && G <= 2;
#endif

  // Merges the splits of rows [begin, end) of (B, Hkv, G) into the output:
  // out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s.
  const auto merge_rows = [&](int64_t begin, int64_t end) {
    A* row = thread_buffer<A, 25>(Ev);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bhk = r / G, g = r % G;
      const int64_t b = bhk / Hkv, hk = bhk % Hkv, h = hk * group + g / L, i = g % L;
      A mx = neg_inf<A>();
      for (int64_t sp = 0; sp < splits; ++sp) mx = max_nan(mx, part_m[(bhk * splits + sp) * G + g]);
      T* o = out + ((b * Hq + h) * L + i) * Ev;
      A* lse_out = lse + (b * Hq + h) * L + i;
      if (mx == neg_inf<A>()) {
        std::fill(o, o + Ev, T(0));
        *lse_out = neg_inf<A>();
        continue;
      }
      std::fill(row, row + Ev, A(0));
      A total = 0;
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t t = bhk * splits + sp;
        const A ms = part_m[t * G + g];
        if (ms == neg_inf<A>()) continue;
        const A w = std::exp(ms - mx);
        total += w * part_l[t * G + g];
        const A* a = part_acc.data() + (t * G + g) * Ev;
        for (int64_t e = 0; e < Ev; ++e) row[e] += w * a[e];
      }
      row_scale(row, Ev, A(1) / total);
      convert_row(row, o, Ev);
      *lse_out = mx + std::log(total);
    }
  };

  parallel_tasks(ntasks, [&](std::atomic<int64_t>& next) {
    A* qf = thread_buffer<A, 20>(G * E);
    A* sbuf = thread_buffer<A, 21>(G * kDecodeBlock);
    A* kf = thread_buffer<A, 22>(kReduced<T> ? kDecodeBlock * E : 0);
    T* qb = thread_buffer<T, 24>(G * E);
    A* vf = thread_buffer<A, 23>(kReduced<T> && !fused_pv ? kDecodeBlock * Ev : 0);
    for (int64_t t = next++; t < ntasks; t = next++) {
      const int64_t sp = t % splits, bhk = t / splits;
      const int64_t b = bhk / Hkv, hk = bhk % Hkv;
      const T* kp = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
      const T* vp = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
      A* m = part_m.data() + t * G;
      A* l = part_l.data() + t * G;
      A* acc = part_acc.data() + t * G * Ev;
      std::fill(m, m + G, neg_inf<A>());
      std::fill(l, l + G, A(0));
      std::fill(acc, acc + G * Ev, A(0));
      // Row g is query row i = g % L of head h = hk * group + g / L.
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * group + g / L, i = g % L;
        const T* qrow =
            static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + i * p.q_stride_l;
        convert_row(qrow, qf + g * E, E);
        std::memcpy(qb + g * E, qrow, sizeof(T) * E);
      }
      const int64_t s0 = sp * blocks_per_split * kDecodeBlock;
      const int64_t s1 = std::min(S, s0 + blocks_per_split * kDecodeBlock);
      for (int64_t n0 = s0; n0 < s1; n0 += kDecodeBlock) {
        const int64_t nb = std::min(kDecodeBlock, s1 - n0);
        const A* kb;
        const A* vb;
        int64_t ldk, ldv;
        bool scores_done = false;
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          // Dot products pay a horizontal sum each: worth it for a few rows only; more rows
          // amortise converting the keys for a GEMM.
          if (G <= kDecodeDotRows && cpu_has_avx512_bf16()) {
            qk_dot(qb, G, E, kp + n0 * p.k_stride_l, p.k_stride_l, nb, sbuf, kDecodeBlock);
            scores_done = true;
          }
        }
        if constexpr (std::is_same_v<T, float>) {
          if (fused_pv) {
            qk_dot(qf, G, E, kp + n0 * p.k_stride_l, p.k_stride_l, nb, sbuf, kDecodeBlock);
            scores_done = true;
          }
        }
#endif
        if constexpr (kReduced<T>) {
          for (int64_t j = 0; j < nb; ++j) {
            if (!scores_done) convert_row(kp + (n0 + j) * p.k_stride_l, kf + j * E, E);
            if (!fused_pv) convert_row(vp + (n0 + j) * p.v_stride_l, vf + j * Ev, Ev);
          }
          kb = kf;
          vb = vf;
          ldk = E;
          ldv = Ev;
        } else {
          kb = kp + n0 * p.k_stride_l;
          vb = vp + n0 * p.v_stride_l;
          ldk = p.k_stride_l;
          ldv = p.v_stride_l;
        }
        if (!scores_done) {
          blas_gemm<A>(false, true, G, nb, E, qf, E, kb, ldk, A(0), sbuf, kDecodeBlock);
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * group + g / L, i = g % L;
          A* s = sbuf + g * kDecodeBlock;
          const int64_t valid = p.is_causal ? std::clamp<int64_t>(i + 1 - n0, 0, nb) : nb;
          A eff_scale = scale;
          if (p.mask_kind != MaskKind::kNone || !(scale > 0)) {
            apply_mask_row<T, A>(
                s, valid, scale, p,
                p.mask_kind == MaskKind::kNone ? nullptr : mask_ptr(p, mesize, b, h, i, n0));
            eff_scale = 1;
          }
          if (online_softmax_block(s, valid, eff_scale, m[g], l[g], acc + g * Ev, Ev)) {
            std::fill(s + valid, s + nb, A(0));
          } else {
            std::fill(s, s + nb, A(0));  // nothing visible: P = 0, state unchanged
          }
        }
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>) {
          if (fused_pv) {
            pv_rows(sbuf, kDecodeBlock, G, vp + n0 * p.v_stride_l, p.v_stride_l, nb, acc, Ev);
            continue;
          }
        }
#endif
        blas_gemm<A>(false, false, G, Ev, nb, sbuf, kDecodeBlock, vb, ldv, A(1), acc, Ev);
      }
      // A single split needs no merging pass: finish its rows here.
      if (splits == 1) merge_rows(bhk * G, bhk * G + G);
    }
  });

  if (splits > 1) {
    at::parallel_for(0, B * Hkv * G, 16, merge_rows);
  }
}

template <typename T>
void forward_impl(const AttentionForwardParams& p, const KernelOptions& opt) {
  using A = acc_type<T>;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, L = p.len_q, S = p.len_kv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v, group = Hkv > 0 ? Hq / Hkv : 1;
  T* out = static_cast<T*>(p.out);
  A* lse = static_cast<A*>(p.lse);
  if (B == 0 || Hq == 0 || L == 0) return;
  if (S == 0) {
    std::fill(out, out + B * Hq * L * Ev, T(0));
    std::fill(lse, lse + B * Hq * L, neg_inf<A>());
    return;
  }
  if (L <= kDecodeMaxLen && group * L <= kDecodeMaxRows) return decode_impl<T>(p);
  const bool brgemm = kReduced<T> && opt.use_brgemm &&
                      at::native::cpublas::could_pack(c10::CppTypeToScalarType<T>::value);
  const bool f32_brgemm = std::is_same_v<T, float> && use_f32_brgemm();
  bool amx = false;
#if AIGC_EXT_AMX
  amx = std::is_same_v<T, c10::BFloat16> && opt.use_amx && cpu_has_amx_bf16();
#endif
  // The AMX path computes whole 16-row tiles: blocks of query rows are multiples of 16.
  const int64_t BQ =
      round_up(env_int("AIGC_EXT_CPU_BLOCK_Q", amx ? kFwdBlockQAmx : kFwdBlockQ), amx ? 16 : 1);
  // Key blocks are multiples of 32 so that padded probability rows (to k_align) stay in a row.
  const int64_t BK =
      round_up(std::min(env_int("AIGC_EXT_CPU_BLOCK_KV", f32_brgemm ? kFwdBlockKVF32 : kFwdBlockKV),
                        round_up(S, kPackN)),
               32);
  const int64_t ev_pad = round_up(Ev, kPackN);
  const int64_t k_align = amx ? 32 : brgemm ? 2 : 1;
  const int64_t e_even = round_up(E, k_align);
  const size_t mesize = mask_elem_size(p, sizeof(T));

  const int64_t nthreads = at::get_num_threads();
  const int64_t nqb = ceil_div(L, BQ);
  // About 8 tasks per thread: enough that a core slowed down by another tenant (or a causal
  // chunk that is all diagonal) leaves little idle time at the end; each extra chunk of a head
  // packs that head's K and V once more.
  int64_t chunks = std::min(nqb, std::max<int64_t>(1, ceil_div(8 * nthreads, B * Hq)));
  chunks = std::max(chunks, ceil_div(L, kFwdMaxChunkRows));
  const int64_t blocks_per_chunk = ceil_div(nqb, chunks);
  chunks = ceil_div(nqb, blocks_per_chunk);
  const int64_t chunk_rows = blocks_per_chunk * BQ;
  const int64_t ntasks = B * Hq * chunks;
  const A scale = static_cast<A>(p.scale);

  parallel_tasks(ntasks, [&](std::atomic<int64_t>& next) {
    thread_local Gemm<T> gemm;
    thread_local PackedB<T> pk, pv;
    gemm.configure(brgemm, f32_brgemm, amx);
    // Row strides a little past BK: rows 2^k bytes apart would share a few cache sets.
    const int64_t lds = BK + 16, ldp = BK + 32;
    A* sbuf = thread_buffer<A, 0>(BQ * lds);
    A* acc = thread_buffer<A, 1>(chunk_rows * ev_pad);
    A* m = thread_buffer<A, 2>(chunk_rows);
    A* l = thread_buffer<A, 3>(chunk_rows);
    T* pbuf = thread_buffer<T, 4>(BQ * ldp);
    T* qpad = thread_buffer<T, 5>(e_even != E || amx ? BQ * e_even : 0);
    for (int64_t t = next++; t < ntasks; t = next++) {
      // Largest chunks first: with causal masking the last rows carry the most work.
      const int64_t c = chunks - 1 - t % chunks, bh = t / chunks;
      const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
      const int64_t r0 = c * chunk_rows, r1 = std::min(L, r0 + chunk_rows);
      const T* qp = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
      const T* kp = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
      const T* vp = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
      const int64_t kv_end = p.is_causal ? std::min(r1, S) : S;
      std::fill(m, m + (r1 - r0), neg_inf<A>());
      std::fill(l, l + (r1 - r0), A(0));
      // acc needs no clearing: the first key block (n0 = 0, which every query block visits)
      // writes it instead of adding to it.

      for (int64_t n0 = 0; n0 < kv_end; n0 += BK) {
        const int64_t bn = std::min(BK, kv_end - n0);
        gemm.pack(pk, /*trans=*/true, E, bn, kp + n0 * p.k_stride_l, p.k_stride_l);
        gemm.pack(pv, /*trans=*/false, bn, Ev, vp + n0 * p.v_stride_l, p.v_stride_l);
        for (int64_t q0 = r0; q0 < r1; q0 += BQ) {
          const int64_t q1 = std::min(q0 + BQ, r1), bq = q1 - q0;
          if (p.is_causal && q1 <= n0) continue;  // every row of this block precedes the keys
          const T* qa = qp + q0 * p.q_stride_l;
          int64_t lda = p.q_stride_l;
          // The AMX tiles read 16 whole rows: a ragged block goes through the padded copy too.
          const int64_t bq_pad = round_up(bq, amx ? 16 : 1);
          if (e_even != E || bq_pad != bq) {
            copy_padded(qa, lda, bq, E, e_even, qpad);
            std::fill(qpad + bq * e_even, qpad + bq_pad * e_even, T(0));
            qa = qpad;
            lda = e_even;
          }
          // With causal masking the keys at or beyond q1 are hidden from the whole block.
          const int64_t bn_q = p.is_causal ? std::min(bn, q1 - n0) : bn;
          const int64_t bn_q_even = round_up(bn_q, k_align);
          gemm.run(bq, qa, lda, pk, sbuf, lds, /*add=*/false, bn_q);
          // Probability rows past bq are read by the AMX tiles: keep them zero.
          if (bq_pad != bq) std::fill(pbuf + bq * ldp, pbuf + bq_pad * ldp, T(0));

          for (int64_t r = 0; r < bq; ++r) {
            const int64_t i = q0 + r, ri = i - r0;
            A* s = sbuf + r * lds;
            const int64_t valid = p.is_causal ? std::clamp<int64_t>(i + 1 - n0, 0, bn_q) : bn;
            A eff_scale = scale;
            if (p.mask_kind != MaskKind::kNone || !(scale > 0)) {
              apply_mask_row<T, A>(
                  s, valid, scale, p,
                  p.mask_kind == MaskKind::kNone ? nullptr : mask_ptr(p, mesize, b, h, i, n0));
              eff_scale = 1;
            }
            A* acc_row = acc + ri * ev_pad;
            if constexpr (!std::is_same_v<T, double>) {
              // Lazy rescaling: exponentiate against the running maximum m and track the block's
              // own maximum in the same pass; only when it exceeds m by more than kLazyMax
              // (probabilities up to e^kLazyMax are harmless in fp32/bf16/fp16) is the row
              // redone against the new maximum and the accumulator rescaled.
              T* pr = pbuf + r * ldp;
              A sum = 0;
              bool visible = valid > 0;
              if (visible && m[ri] == neg_inf<A>()) {
                const A bmax = row_max(s, valid) * eff_scale;
                visible = bmax != neg_inf<A>();
                if (visible) m[ri] = bmax;
              }
              if (visible) {
                // A NaN m (NaN among the first visible scores) makes every exponential, hence l
                // and the row's output, NaN; NaN scores in later blocks make their sum NaN.
                // Huge maxima (|m| > kExactShift) take the non-lazy update instead, which
                // subtracts them exactly; +inf scores end there too, as an infinite maximum
                // whose inf - inf makes the row NaN, as in torch's softmax.
                bool lazy = !(std::abs(m[ri]) > kExactShift<A>);
                if (lazy) {
                  float xmax;
                  sum = row_exp_sum_to(s, valid, eff_scale, m[ri], pr, &xmax);
                  if (xmax > kLazyMax) {
                    const A m_new = m[ri] + xmax;
                    lazy = !(std::abs(m_new) > kExactShift<A>);
                    if (lazy) {
                      const A alpha = std::exp(m[ri] - m_new);
                      sum = row_exp_sum_to(s, valid, eff_scale, m_new, pr, &xmax);
                      row_scale(acc_row, Ev, alpha);
                      l[ri] *= alpha;
                      m[ri] = m_new;
                    }
                  }
                }
                if (lazy) {
                  l[ri] += sum;
                } else {
                  online_softmax_block(s, valid, eff_scale, m[ri], l[ri], acc_row, Ev);
                  convert_row(s, pr, valid);
                }
                std::fill(pr + valid, pr + bn_q_even, T(0));
              } else {
                std::fill(pr, pr + bn_q_even, T(0));  // nothing visible: P = 0, state unchanged
              }
            } else {
              if (online_softmax_block(s, valid, eff_scale, m[ri], l[ri], acc_row, Ev)) {
                std::fill(s + valid, s + bn_q_even, A(0));
              } else {
                std::fill(s, s + bn_q_even, A(0));  // nothing visible: P = 0, state unchanged
              }
            }
          }
          const T* pa;
          int64_t ldpa;
          if constexpr (std::is_same_v<T, double>) {
            pa = sbuf;
            ldpa = lds;
          } else {
            pa = pbuf;
            ldpa = ldp;
          }
          gemm.run(bq, pa, ldpa, pv, acc + (q0 - r0) * ev_pad, ev_pad, /*add=*/n0 > 0, -1, bn_q);
        }
      }
      // Normalise and write out.
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t ri = i - r0;
        A* acc_row = acc + ri * ev_pad;
        T* o = out + ((b * Hq + h) * L + i) * Ev;
        if (l[ri] > A(0) || std::isnan(l[ri])) {  // a NaN l gives a NaN row and lse
          scale_convert_row(acc_row, Ev, A(1) / l[ri], o);
          lse[(b * Hq + h) * L + i] = m[ri] + std::log(l[ri]);
        } else {
          std::fill(o, o + Ev, T(0));  // no key to attend to: zeros, as torch does
          lse[(b * Hq + h) * L + i] = neg_inf<A>();
        }
      }
    }
    gemm.release();
  });
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockKV = 256;

template <typename T>
void backward_impl(const AttentionBackwardParams& bp, const KernelOptions& opt) {
  using A = acc_type<T>;
  const AttentionForwardParams& p = bp.fwd;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, L = p.len_q, S = p.len_kv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v, group = Hkv > 0 ? Hq / Hkv : 1;
  T* dq = static_cast<T*>(bp.grad_q);
  T* dk = static_cast<T*>(bp.grad_k);
  T* dv = static_cast<T*>(bp.grad_v);
  const T* dout = static_cast<const T*>(bp.grad_out);
  const T* out = static_cast<const T*>(p.out);
  const A* lse = static_cast<const A*>(p.lse);
  std::fill(dq, dq + B * Hq * L * E, T(0));
  std::fill(dk, dk + B * Hkv * S * E, T(0));
  std::fill(dv, dv + B * Hkv * S * Ev, T(0));
  if (B == 0 || Hq == 0 || L == 0 || S == 0) return;

  const bool brgemm = kReduced<T> && opt.use_brgemm &&
                      at::native::cpublas::could_pack(c10::CppTypeToScalarType<T>::value);
  const int64_t BQ = kBwdBlockQ;
  const int64_t BK = std::min(kBwdBlockKV, round_up(S, kPackN));
  const int64_t e_pad = round_up(E, kPackN), ev_pad = round_up(Ev, kPackN);
  const int64_t e_even = round_up(E, 2), ev_even = round_up(Ev, 2);
  const int64_t bq_cap = round_up(std::min(BQ, L), 2);
  const size_t mesize = mask_elem_size(p, sizeof(T));
  const A scale = static_cast<A>(p.scale);

  // D = rowsum(dO * O), one value per query row.
  std::vector<A> D(B * Hq * L);
  at::parallel_for(0, B * Hq * L, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      A s = 0;
      const T* a = dout + r * Ev;
      const T* o = out + r * Ev;
      for (int64_t e = 0; e < Ev; ++e) s += static_cast<A>(a[e]) * static_cast<A>(o[e]);
      D[r] = s;
    }
  });

  const int64_t nthreads = at::get_num_threads();
  const int64_t nkb = ceil_div(S, BK);
  int64_t chunks = std::min(nkb, std::max<int64_t>(1, ceil_div(2 * nthreads, B * Hkv)));
  const int64_t blocks_per_chunk = ceil_div(nkb, chunks);
  chunks = ceil_div(nkb, blocks_per_chunk);
  const int64_t ntasks = B * Hkv * chunks;
  // dQ partial sums, one slab per key chunk: (chunks, B, Hq, L, e_pad).
  std::vector<A> dq_acc(chunks * B * Hq * L * e_pad, A(0));

  parallel_tasks(ntasks, [&](std::atomic<int64_t>& next) {
    thread_local Gemm<T> gemm;
    thread_local PackedB<T> pkt, pvt, pk;
    // fp32: BLAS, whose transposed operands cost no copies (the backward has two per tile).
    gemm.configure(brgemm, /*f32_brgemm=*/false);
    A* sbuf = thread_buffer<A, 10>(bq_cap * BK);
    A* dpbuf = thread_buffer<A, 11>(bq_cap * BK);
    A* dk_acc = thread_buffer<A, 12>(BK * e_pad);
    A* dv_acc = thread_buffer<A, 13>(BK * ev_pad);
    T* pbuf = thread_buffer<T, 14>(kReduced<T> ? bq_cap * BK : 0);
    T* dsbuf = thread_buffer<T, 15>(kReduced<T> ? bq_cap * BK : 0);
    const bool pad_q = brgemm && e_even != E, pad_do = brgemm && ev_even != Ev;
    T* qpad = thread_buffer<T, 16>(pad_q ? BQ * e_even : 0);
    T* dopad = thread_buffer<T, 17>(pad_do ? BQ * ev_even : 0);
    for (int64_t t = next++; t < ntasks; t = next++) {
      const int64_t c = t % chunks, bhk = t / chunks;
      const int64_t b = bhk / Hkv, hk = bhk % Hkv;
      const T* kp = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
      const T* vp = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
      const int64_t kb0 = c * blocks_per_chunk, kb1 = std::min(nkb, kb0 + blocks_per_chunk);
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t n0 = kb * BK, bn = std::min(BK, S - n0), bn_even = round_up(bn, 2);
        const T* kblk = kp + n0 * p.k_stride_l;
        const T* vblk = vp + n0 * p.v_stride_l;
        gemm.pack(pkt, /*trans=*/true, E, bn, kblk, p.k_stride_l);   // K^T for S = Q K^T
        gemm.pack(pvt, /*trans=*/true, Ev, bn, vblk, p.v_stride_l);  // V^T for dP = dO V^T
        gemm.pack(pk, /*trans=*/false, bn, E, kblk, p.k_stride_l);   // K for dQ = dS K
        std::fill(dk_acc, dk_acc + BK * e_pad, A(0));
        std::fill(dv_acc, dv_acc + BK * ev_pad, A(0));
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hk * group + g;
          const T* qp = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
          const T* dop = dout + (b * Hq + h) * L * Ev;
          const A* lse_h = lse + (b * Hq + h) * L;
          const A* D_h = D.data() + (b * Hq + h) * L;
          A* dqa = dq_acc.data() + ((c * B + b) * Hq + h) * L * e_pad;
          const int64_t qstart = p.is_causal ? (n0 / BQ) * BQ : 0;
          for (int64_t q0 = qstart; q0 < L; q0 += BQ) {
            const int64_t bq = std::min(BQ, L - q0);
            const T* qa = qp + q0 * p.q_stride_l;
            int64_t ldq = p.q_stride_l;
            const T* doa = dop + q0 * Ev;
            int64_t lddo = Ev;
            if (pad_q) {
              copy_padded(qa, ldq, bq, E, e_even, qpad);
              qa = qpad;
              ldq = e_even;
            }
            if (pad_do) {
              copy_padded(doa, lddo, bq, Ev, ev_even, dopad);
              doa = dopad;
              lddo = ev_even;
            }
            // S = Q K^T, then P = exp(scale*S + mask - lse)
            gemm.run(bq, qa, ldq, pkt, sbuf, BK, false);
            for (int64_t r = 0; r < bq; ++r) {
              const int64_t i = q0 + r;
              A* s = sbuf + r * BK;
              const int64_t valid = p.is_causal ? std::clamp<int64_t>(i + 1 - n0, 0, bn) : bn;
              if (valid == 0 || lse_h[i] == neg_inf<A>()) {
                std::fill(s, s + bn_even, A(0));
              } else {
                A eff_scale = scale;
                if (p.mask_kind != MaskKind::kNone) {
                  apply_mask_row<T, A>(s, valid, scale, p, mask_ptr(p, mesize, b, h, i, n0));
                  eff_scale = 1;
                }
                // A NaN lse (a row with NaN scores) gives NaN probabilities, as torch's softmax.
                exact_scores(s, valid, lse_h[i], eff_scale);
                row_exp_sum(s, valid, eff_scale, lse_h[i]);
                std::fill(s + valid, s + bn_even, A(0));
              }
              if constexpr (kReduced<T>) convert_row(s, pbuf + r * BK, bn_even);
            }
            const T* pa;
            if constexpr (kReduced<T>) {
              pa = pbuf;
            } else {
              pa = sbuf;
            }
            // dV += P^T dO
            gemm.mm(true, false, bn, Ev, bq, pa, BK, dop + q0 * Ev, Ev, dv_acc, ev_pad, true);
            // dP = dO V^T, dS = P * (dP - D)
            gemm.run(bq, doa, lddo, pvt, dpbuf, BK, false);
            for (int64_t r = 0; r < bq; ++r) {
              const A d = D_h[q0 + r];
              A* dp = dpbuf + r * BK;
              const A* pr = sbuf + r * BK;
              using Vec = Vectorized<A>;
              const Vec vd(d);
              int64_t j = 0;
              for (; j + Vec::size() <= bn; j += Vec::size())
                (Vec::loadu(pr + j) * (Vec::loadu(dp + j) - vd)).store(dp + j);
              for (; j < bn; ++j) dp[j] = pr[j] * (dp[j] - d);
              for (j = bn; j < bn_even; ++j) dp[j] = 0;
              if constexpr (kReduced<T>) convert_row(dp, dsbuf + r * BK, bn_even);
            }
            const T* dsa;
            if constexpr (kReduced<T>) {
              dsa = dsbuf;
            } else {
              dsa = dpbuf;
            }
            // dK += dS^T Q (scaled at the end), dQ += dS K (scaled at the end)
            gemm.mm(true, false, bn, E, bq, dsa, BK, qp + q0 * p.q_stride_l, p.q_stride_l, dk_acc,
                    e_pad, true);
            gemm.run(bq, dsa, BK, pk, dqa + q0 * e_pad, e_pad, true);
          }
        }
        for (int64_t j = 0; j < bn; ++j) {
          A* dkr = dk_acc + j * e_pad;
          row_scale(dkr, E, scale);
          convert_row(dkr, dk + ((b * Hkv + hk) * S + n0 + j) * E, E);
          convert_row(dv_acc + j * ev_pad, dv + ((b * Hkv + hk) * S + n0 + j) * Ev, Ev);
        }
      }
    }
    gemm.release();
  });

  // dQ = scale * sum over key chunks.
  at::parallel_for(0, B * Hq * L, 64, [&](int64_t begin, int64_t end) {
    std::vector<A> row(e_pad);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(row.begin(), row.end(), A(0));
      for (int64_t c = 0; c < chunks; ++c) {
        const A* src = dq_acc.data() + (c * B * Hq * L + r) * e_pad;
        for (int64_t e = 0; e < E; ++e) row[e] += src[e];
      }
      row_scale(row.data(), E, scale);
      convert_row(row.data(), dq + r * E, E);
    }
  });
}

}  // namespace

void attention_forward(const AttentionForwardParams& p, const KernelOptions& opt) {
  switch (p.dtype) {
    case c10::ScalarType::Float:
      return forward_impl<float>(p, opt);
    case c10::ScalarType::Double:
      return forward_impl<double>(p, opt);
    case c10::ScalarType::BFloat16:
      return forward_impl<c10::BFloat16>(p, opt);
    case c10::ScalarType::Half:
      return forward_impl<c10::Half>(p, opt);
    default:
      TORCH_CHECK(false, "aigc_ext attention: unsupported dtype ", p.dtype);
  }
}

void attention_backward(const AttentionBackwardParams& p, const KernelOptions& opt) {
  switch (p.fwd.dtype) {
    case c10::ScalarType::Float:
      return backward_impl<float>(p, opt);
    case c10::ScalarType::Double:
      return backward_impl<double>(p, opt);
    case c10::ScalarType::BFloat16:
      return backward_impl<c10::BFloat16>(p, opt);
    case c10::ScalarType::Half:
      return backward_impl<c10::Half>(p, opt);
    default:
      TORCH_CHECK(false, "aigc_ext attention backward: unsupported dtype ", p.fwd.dtype);
  }
}

}  // namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE
