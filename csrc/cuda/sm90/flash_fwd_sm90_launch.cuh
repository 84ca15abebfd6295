// Host side of the Hopper forward: the TMA descriptors, the kernel's scalars and the launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cute/tensor.hpp>

#include "attention_params.h"
#include "cuda/sm90/flash_fwd_sm90_dispatch.h"
#include "cuda/sm90/flash_fwd_sm90_kernel.cuh"

namespace aigc_ext {
namespace cuda {
namespace sm90 {

// Element strides of one (rows, head, batch) tensor for its TMA descriptor. A dimension of
// extent 1 is never stepped over: its stride is replaced by a packed one, so that the
// descriptor's 16-byte stride rule holds whatever the caller's view says.
struct RowHeadBatchStrides {
  int64_t row, head, batch;
};

inline RowHeadBatchStrides tma_strides(int64_t rows, int64_t heads, int64_t batch, int64_t head_dim,
                                       int64_t s_row, int64_t s_head, int64_t s_batch) {
  RowHeadBatchStrides s{s_row, s_head, s_batch};
  if (rows <= 1) s.row = head_dim;
  if (heads <= 1) s.head = s.row * (rows > 0 ? rows : 1);
  if (batch <= 1) s.batch = s.head * (heads > 0 ? heads : 1);
  return s;
}

template <class Traits, class SmemLayout>
auto make_tma(const void* ptr, int rows, int heads, int batch, RowHeadBatchStrides st,
              SmemLayout layout) {
  using namespace cute;
  using Element = typename Traits::Element;
  auto g = make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                       typename Traits::GShape(rows, Traits::kHeadDim, heads, batch),
                       typename Traits::GStride(st.row, _1{}, st.head, st.batch));
  return make_tma_copy(SM90_TMA_LOAD{}, g, layout);
}

// The kernel's scalars for `p` (accepted by sm90_fwd_unsupported; len_q > 0): the masking as
// the band i + diag - window_left <= j <= i + diag + window_right (-1: unbounded).
inline FwdScalars fwd_scalars(const AttentionForwardParams& p, int block_m) {
  const FlashFeatures& f = p.flash;
  const int64_t L = p.len_q, S = p.len_kv;
  int64_t diag = 0, wl = -1, wr = -1;
  if (p.is_causal) {
    wr = 0;  // top-left causal (sm90_fwd_unsupported declined combining it with windows)
  } else {
    diag = f.bottom_right ? S - L : 0;
    wl = f.window_left;
    wr = f.window_right;
  }
  // Bounds this wide exclude nothing: drop them (keeps the kernel's int arithmetic small).
  if (wl >= L + S) wl = -1;
  if (wr >= L + S) wr = -1;

  FwdScalars s{};
  s.batch = int(p.batch);
  s.heads_q = int(p.heads_q);
  s.heads_kv = int(p.heads_kv);
  s.group = int(p.heads_q / p.heads_kv);
  s.len_q = int(L);
  s.len_kv = int(S);
  s.num_m_blocks = int((L + block_m - 1) / block_m);
  s.len_kv_tma = int(S > 0 ? S : 1);
  s.diag = int(diag);
  s.window_left = int(wl);
  s.window_right = int(wr);
  const double log2e = 1.4426950408889634;
  if (f.softcap > 0) {
    s.softcap = float(f.softcap);
    s.softcap_prescale = float(p.scale / f.softcap);
    s.scale = 1.f;
    s.scale_log2 = float(log2e);
  } else {
    s.scale = float(p.scale);
    s.scale_log2 = float(p.scale * log2e);
  }
  s.out = p.out;
  s.lse = static_cast<float*>(p.lse);
  s.out_stride_b = p.out_stride_b;
  s.out_stride_h = p.out_stride_h;
  s.out_stride_l = p.out_stride_l;
  s.lse_stride_b = p.lse_stride_b;
  s.lse_stride_h = p.lse_stride_h;
  s.lse_stride_l = p.lse_stride_l;
  return s;
}

template <int kHeadDim, bool kBf16>
using TraitsFor =
    FwdTraits<kHeadDim, std::conditional_t<kBf16, cutlass::bfloat16_t, cutlass::half_t>>;

template <int kHeadDim, bool kBf16>
cudaError_t launch_fwd(const AttentionForwardParams& p, cudaStream_t stream) {
  using Traits = TraitsFor<kHeadDim, kBf16>;
  if (p.batch <= 0 || p.heads_q <= 0 || p.len_q <= 0) return cudaSuccess;  // nothing to write
  // Elsewhere than on sm_90a the kernel's body is a trap: refuse rather than launch it.
  if (!fwd_compiled<kHeadDim, kBf16>()) return cudaErrorNoKernelImageForDevice;

  FwdKernelArgs<Traits> args{};
  FwdScalars& s = args.s;
  s = fwd_scalars(p, Traits::kBlockM);
  const int64_t num_m = s.num_m_blocks;
  const int64_t L = p.len_q, S = p.len_kv;

  const RowHeadBatchStrides qs =
      tma_strides(L, p.heads_q, p.batch, kHeadDim, p.q_stride_l, p.q_stride_h, p.q_stride_b);
  args.tma_q =
      make_tma<Traits>(p.q, s.len_q, s.heads_q, s.batch, qs, typename Traits::SmemLayoutQ{});
  if (S > 0) {
    const RowHeadBatchStrides ks =
        tma_strides(S, p.heads_kv, p.batch, kHeadDim, p.k_stride_l, p.k_stride_h, p.k_stride_b);
    const RowHeadBatchStrides vs =
        tma_strides(S, p.heads_kv, p.batch, kHeadDim, p.v_stride_l, p.v_stride_h, p.v_stride_b);
    args.tma_k = make_tma<Traits>(p.k, s.len_kv_tma, s.heads_kv, s.batch, ks,
                                  typename Traits::SmemLayoutKStage{});
    args.tma_v = make_tma<Traits>(p.v, s.len_kv_tma, s.heads_kv, s.batch, vs,
                                  typename Traits::SmemLayoutKStage{});
  } else {
    // No keys: no K/V tile is ever loaded; the descriptors only need to be valid, so describe
    // one row of q (k and v may have no storage at all).
    const RowHeadBatchStrides one = tma_strides(1, 1, 1, kHeadDim, 0, 0, 0);
    args.tma_k = make_tma<Traits>(p.q, 1, 1, 1, one, typename Traits::SmemLayoutKStage{});
    args.tma_v = args.tma_k;
    s.heads_kv = 1;
  }

  auto kernel = flash_fwd_sm90_kernel<Traits>;
  const size_t smem = sizeof(SharedStorage<Traits>) + 1024;  // + the 1024-byte alignment slack
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(num_m * p.heads_q * p.batch));  // checked <= INT32_MAX
  kernel<<<grid, Traits::kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <int kHeadDim, bool kBf16>
bool fwd_compiled() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, flash_fwd_sm90_kernel<TraitsFor<kHeadDim, kBf16>>) !=
      cudaSuccess) {
    (void)cudaGetLastError();  // leave no error behind for the caller's next launch
    return false;
  }
  return attr.binaryVersion == 90;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace aigc_ext
