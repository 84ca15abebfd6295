// Fused attention on CPUs: the per-ISA entry points of the forward and backward.
//
// This file is compiled once per instruction set (see CMakeLists.txt). Each copy lives in its
// own namespace, aigc_ext::cpu::<isa>, and sees ATen's Vectorized<T> for that instruction set.
// The kernel itself is in the headers, by concern:
//   kernel_utils.h   types, scratch buffers, task scheduling, row conversions
//   gemm.h           GEMMs (BLAS, brgemm, AMX), operand packing and transposes
//   amx.h            the AMX bf16 tile micro-kernel (AVX-512 build)
//   softmax_rows.h   row max/exp/sum/scale of the online softmax, mask application
//   forward.h        the tiled forward
//   decode.h         the split-KV forward for short queries
//   backward.h       the backward
//
// Non-finite values as in torch: a NaN score makes its row NaN. Masks are added to the scores
// (a bool mask as 0 / -inf), so a NaN score at a masked key still reaches its row; causally
// hidden keys are never read and take no part, as in torch's flash kernel. A row whose keys
// are all hidden gives zeros, lse -inf and zero gradients.
#include <c10/util/Exception.h>

#include "cpu/attention.h"
#include "cpu/backward.h"
#include "cpu/forward.h"

namespace aigc_ext::cpu::AIGC_ISA_NAMESPACE {

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
