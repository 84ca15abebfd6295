// The CUDA kernels' entry points, as the operator layer (csrc/cuda/ops_cuda.cpp) calls them.
//
// Host-only declarations with no torch or CUTLASS types, so that the kernel sources
// (csrc/cuda/sm80/, csrc/cuda/sm90/) and the registration share them without pulling each
// other's headers. The parameter structs are the device-neutral ones of every backend
// (attention_params.h); the operator layer has checked shapes, dtypes and index values.
//
// What the caller guarantees, for every entry point:
//  * p.dtype is kHalf or kBFloat16; head_dim and head_dim_v are in [1, 256]; every pointer is a
//    device pointer of the current device, 16-byte aligned, and the last dim of every tensor is
//    contiguous (strides are in elements);
//  * out is written in p.dtype at out_stride_*, lse in float32 at lse_stride_*; a query row
//    with no visible key gets out = 0 and lse = -inf;
//  * the SDPA operators leave p.flash default (is_causal: top-left causal); the flash operators
//    set is_causal = false, flash.bottom_right = true and express causality as window_right = 0;
//    varlen batches have cu_seqlens_q/k set (device pointers), batch strides 0, and rows offset
//    by cu_seqlens; alibi slopes, when given, are a device float32 pointer.
// Each launcher enqueues its kernels on `stream` and returns the launch status
// (cudaGetLastError() after the last launch); it never synchronises.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "attention_params.h"

namespace aigc_ext {
namespace cuda {

// Why the sm80 kernels cannot serve `p`, or nullptr when they can. They serve the SDPA
// contract (masks of every kind, causal, GQA) and the flash features varlen, bottom-right
// causal, windows, softcap and ALiBi; they decline dropout, attention sinks and the KV-cache
// arguments (seqused_k, leftpad_k, kv_batch_idx, block_table).
inline const char* sm80_unsupported(const AttentionForwardParams& p) {
  if (p.dtype != c10::ScalarType::Half && p.dtype != c10::ScalarType::BFloat16)
    return "only float16 and bfloat16 are implemented";
  if (p.head_dim > 256 || p.head_dim_v > 256) return "head dims above 256 are not implemented";
  const FlashFeatures& f = p.flash;
  if (f.dropout_p > 0) return "dropout is not implemented";
  if (f.sinks != nullptr) return "attention sinks are not implemented";
  if (f.seqused_k || f.leftpad_k || f.kv_batch_idx || f.block_table)
    return "the KV-cache arguments (seqused_k, leftpad_k, kv_batch_idx, block_table) are not "
           "implemented";
  return nullptr;
}

// Forward, FlashAttention-2 on mma.sync tensor cores (sm80 and newer).
cudaError_t flash_fwd_sm80(const AttentionForwardParams& p, cudaStream_t stream);

// Bytes of device scratch flash_bwd_sm80 needs for `p` (uninitialised when passed; the
// launcher clears what it needs).
size_t flash_bwd_sm80_workspace_bytes(const AttentionBackwardParams& p);

// Backward: rowsum(dO * O) preprocess, then dK/dV and dQ without atomics (deterministic).
// grad_q/k/v are written in full (no need to zero them first).
cudaError_t flash_bwd_sm80(const AttentionBackwardParams& p, void* workspace, cudaStream_t stream);

// Why the sm90a forward cannot serve `p` (beyond sm80_unsupported), or nullptr when it can.
// Defined with the kernel (csrc/cuda/sm90/), which knows its own limits (head dims, masks,
// varlen, alignment for the tensor-memory-access descriptors).
const char* sm90_fwd_unsupported(const AttentionForwardParams& p);

// Whether this library holds sm90a machine code for the Hopper forward (it is compiled only
// for the sm_90a target).
bool sm90_fwd_compiled();

// Forward on Hopper: wgmma from shared memory, TMA loads on an mbarrier pipeline, producer and
// consumer warpgroups (sm_90a only).
cudaError_t flash_fwd_sm90(const AttentionForwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace aigc_ext
