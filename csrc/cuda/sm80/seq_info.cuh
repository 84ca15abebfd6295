// Per-sequence geometry of one (batch row, head) of a call on the GPU: where its query and key
// rows start, its own lengths, the bottom-right offset and the window that decides which keys a
// query row sees. Mirrors csrc/cpu/sequence.h (sequence_of): dense batches use the params'
// lengths; variable-length batches read cu_seqlens_q/k. The KV-cache forms are declined by
// sm80_unsupported and do not appear here.
#pragma once

#include <cstdint>

#include "attention_params.h"

namespace aigc_ext {
namespace cuda {
namespace sm80 {

struct SeqInfo {
  int len_q = 0, len_k = 0;
  int64_t q_row0 = 0, k_row0 = 0;  // first row of the sequence in the (packed) tensors
  int64_t diag = 0;                // query i is aligned with key i + diag
  int64_t window_left = -1, window_right = -1;

  // The keys [lo(i), hi(i)) that query row i (0-based in the sequence) sees; lo and hi never
  // decrease with i, so a tile of rows [i0, i1] sees keys in [lo(i0), hi(i1)).
  __device__ __forceinline__ int lo(int64_t i) const {
    if (window_left < 0) return 0;
    const int64_t v = i + diag - window_left;
    return v < 0 ? 0 : (v > len_k ? len_k : static_cast<int>(v));
  }
  __device__ __forceinline__ int hi(int64_t i) const {
    if (window_right < 0) return len_k;
    const int64_t v = i + diag + window_right + 1;
    return v < 0 ? 0 : (v > len_k ? len_k : static_cast<int>(v));
  }
  // Whether query i sees key j (both in range of the sequence, and j within the window).
  __device__ __forceinline__ bool visible(int i, int j) const {
    if (i >= len_q || j >= len_k) return false;
    const int64_t dj = static_cast<int64_t>(j) - diag - i;  // j - (i + diag)
    if (window_left >= 0 && dj < -window_left) return false;
    if (window_right >= 0 && dj > window_right) return false;
    return true;
  }
};

__device__ __forceinline__ SeqInfo seq_info(const AttentionForwardParams& p, int b) {
  SeqInfo s;
  const FlashFeatures& f = p.flash;
  if (f.cu_seqlens_q != nullptr) {
    s.q_row0 = f.cu_seqlens_q[b];
    s.len_q = f.cu_seqlens_q[b + 1] - f.cu_seqlens_q[b];
    s.k_row0 = f.cu_seqlens_k[b];
    s.len_k = f.cu_seqlens_k[b + 1] - f.cu_seqlens_k[b];
  } else {
    s.len_q = static_cast<int>(p.len_q);
    s.len_k = static_cast<int>(p.len_kv);
  }
  s.diag = f.bottom_right ? static_cast<int64_t>(s.len_k) - s.len_q : 0;
  s.window_left = f.window_left;
  s.window_right = p.is_causal ? 0 : f.window_right;
  return s;
}

}  // namespace sm80
}  // namespace cuda
}  // namespace aigc_ext
