// The Hopper forward's entry points (csrc/cuda/flash_launch.h): what it serves, whether it is
// compiled in, and the dispatch on head dim and dtype.
#include <cmath>
#include <cstdint>

#include "cuda/flash_launch.h"
#include "cuda/sm90/flash_fwd_sm90_dispatch.h"

namespace aigc_ext {
namespace cuda {
namespace {

constexpr int64_t kBlockM = 128;  // FwdTraits::kBlockM
constexpr int64_t kMaxInt = INT32_MAX;

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// A TMA descriptor steps over each dimension of extent > 1 by its stride in bytes, which must
// be a positive multiple of 16 below 2^40 (dimensions of extent 1 get a packed stride).
bool tma_stride_ok(int64_t extent, int64_t stride_elems) {
  if (extent <= 1) return true;
  const int64_t bytes = stride_elems * 2;
  return stride_elems > 0 && bytes % 16 == 0 && bytes < (int64_t(1) << 40);
}

const char* tma_operand_unsupported(const void* ptr, int64_t rows, int64_t heads, int64_t batch,
                                    int64_t s_row, int64_t s_head, int64_t s_batch) {
  if (!aligned16(ptr)) return "the sm90 forward needs 16-byte aligned q, k and v";
  if (!tma_stride_ok(rows, s_row) || !tma_stride_ok(heads, s_head) ||
      !tma_stride_ok(batch, s_batch))
    return "the sm90 forward needs positive q/k/v strides that are multiples of 8 elements "
           "(16 bytes) on every dimension of extent > 1 (no broadcast views)";
  return nullptr;
}

template <int kHeadDim>
cudaError_t launch_head_dim(const AttentionForwardParams& p, cudaStream_t stream) {
  return p.dtype == c10::ScalarType::BFloat16 ? sm90::launch_fwd<kHeadDim, true>(p, stream)
                                              : sm90::launch_fwd<kHeadDim, false>(p, stream);
}

}  // namespace

const char* sm90_fwd_unsupported(const AttentionForwardParams& p) {
  if (const char* why = sm80_unsupported(p)) return why;
  const FlashFeatures& f = p.flash;
  if (p.head_dim != p.head_dim_v || (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256))
    return "the sm90 forward serves head dims 64, 128 and 256 (equal for q/k and v)";
  if (f.cu_seqlens_q != nullptr || f.cu_seqlens_k != nullptr)
    return "the sm90 forward does not implement variable-length batches";
  if (p.mask_kind != MaskKind::kNone) return "the sm90 forward does not implement attn_mask";
  if (f.alibi != nullptr) return "the sm90 forward does not implement ALiBi";
  if (f.dropout_p > 0) return "the sm90 forward does not implement dropout";
  if (f.sinks != nullptr) return "the sm90 forward does not implement attention sinks";
  if (f.seqused_k || f.leftpad_k || f.kv_batch_idx || f.block_table)
    return "the sm90 forward does not implement the KV-cache arguments";
  if (p.is_causal && (f.bottom_right || f.window_left >= 0 || f.window_right >= 0))
    return "the sm90 forward does not combine top-left causal with flash windows";
  if (!(p.scale > 0) || !std::isfinite(p.scale) || !std::isfinite(f.softcap))
    return "the sm90 forward needs a positive finite scale";
  if (p.batch > kMaxInt || p.heads_q > kMaxInt || p.heads_kv <= 0 || p.len_q > kMaxInt / 2 ||
      p.len_kv > kMaxInt / 2)
    return "the sm90 forward's sizes exceed its 32-bit index range";
  const int64_t blocks = (p.len_q + kBlockM - 1) / kBlockM;
  if (p.batch > 0 && p.heads_q > 0 && blocks > kMaxInt / p.heads_q / p.batch)
    return "the sm90 forward's grid (query blocks x heads x batch) exceeds 2^31 - 1";
  if (const char* why = tma_operand_unsupported(p.q, p.len_q, p.heads_q, p.batch, p.q_stride_l,
                                                p.q_stride_h, p.q_stride_b))
    return why;
  if (p.len_kv > 0) {
    if (const char* why = tma_operand_unsupported(p.k, p.len_kv, p.heads_kv, p.batch, p.k_stride_l,
                                                  p.k_stride_h, p.k_stride_b))
      return why;
    if (const char* why = tma_operand_unsupported(p.v, p.len_kv, p.heads_kv, p.batch, p.v_stride_l,
                                                  p.v_stride_h, p.v_stride_b))
      return why;
  }
  // The epilogue stores pairs of output elements as 4-byte words.
  if (reinterpret_cast<uintptr_t>(p.out) % 4 != 0 || p.out_stride_b % 2 != 0 ||
      p.out_stride_h % 2 != 0 || p.out_stride_l % 2 != 0)
    return "the sm90 forward needs even output strides";
  return nullptr;
}

bool sm90_fwd_compiled() {
  return sm90::fwd_compiled<64, false>() && sm90::fwd_compiled<64, true>() &&
         sm90::fwd_compiled<128, false>() && sm90::fwd_compiled<128, true>() &&
         sm90::fwd_compiled<256, false>() && sm90::fwd_compiled<256, true>();
}

cudaError_t flash_fwd_sm90(const AttentionForwardParams& p, cudaStream_t stream) {
  if (sm90_fwd_unsupported(p) != nullptr) return cudaErrorInvalidValue;
  switch (p.head_dim) {
    case 64:
      return launch_head_dim<64>(p, stream);
    case 128:
      return launch_head_dim<128>(p, stream);
    default:
      return launch_head_dim<256>(p, stream);
  }
}

}  // namespace cuda
}  // namespace aigc_ext
