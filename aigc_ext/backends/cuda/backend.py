"""The ``cuda`` backend: the CUDA C++ FlashAttention-2 kernels (``csrc/cuda/``).

The kernels are the CUDA dispatch-key implementations of ``torch.ops.aigc_ext.attention_forward``
/ ``attention_backward`` (the operators the ``cpu`` backend calls for CPU tensors), compiled only
with ``AIGC_EXT_WITH_CUDA=1``. The Triton backend uses operators of its own
(``triton_attention_forward``), so the two never share a dispatcher entry.

* Devices: ``cuda`` (compute capability 8.0 and newer; the sm_90a forward on 9.0 when built).
* Serves float16 and bfloat16, causal, bool and floating masks, grouped-query attention, head
  dims up to 256.
* Declines (the dispatcher falls back): other dtypes, head dims above 256, ``dropout_p > 0``, a
  mask that requires grad; this mirrors ``sm80_unsupported`` in ``csrc/cuda/flash_launch.h``.
* Priority: :data:`PRIORITY` (below ``triton``): nothing has been measured on a GPU yet, so
  the backend is chosen by name (``backend="cuda"``) until it has.
"""

from __future__ import annotations

import torch

# The same operator as the cpu backend's: the dispatcher picks its CUDA kernel for CUDA tensors.
from aigc_ext.backends.cpu.backend import serve
from aigc_ext.backends.spec import BackendSpec
from aigc_ext.validation import AttentionCall

__all__ = [
    "BACKEND",
    "PRIORITY",
    "has_cuda_kernels",
    "serve",
    "unavailable_reason",
    "unsupported_reason",
]

MAX_HEAD_DIM = 256
# Below triton's 200 (the CUDA default) and above cpu's 100: selectable by name until a GPU
# measurement shows where it is faster.
PRIORITY = 150
_DTYPES = (torch.float16, torch.bfloat16)
_FORWARD = "aigc_ext::attention_forward"


def has_cuda_kernels(op: str = _FORWARD) -> bool:
    """Whether the compiled library registered a CUDA kernel for ``op`` (``ns::name``).

    False when the library fails to load or the operator does not exist; a CPU-only build
    defines the operators without a CUDA kernel.
    """
    try:
        from aigc_ext.backends.cpu import ops  # noqa: F401  (loads the library)
    except (ImportError, OSError):
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"))
    except RuntimeError:  # no such operator
        return False


def unavailable_reason() -> str | None:
    """None when the CUDA kernels can run here, else why not."""
    if not has_cuda_kernels():
        return (
            "the library aigc_ext._C was built without CUDA kernels "
            "(build with AIGC_EXT_WITH_CUDA=1)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    if all(cc < (8, 0) for cc in capabilities):
        return f"needs a GPU of compute capability 8.0 or newer; found {capabilities}"
    return None


def unsupported_reason(call: AttentionCall) -> str | None:
    """None when the CUDA kernels serve ``call``, else why not (the dispatcher then falls back).

    Mirrors ``sm80_unsupported`` (csrc/cuda/flash_launch.h); the SDPA contract has no sinks or
    KV-cache arguments, which the flash operators check themselves.
    """
    if call.dtype not in _DTYPES:
        return f"dtype {call.dtype} is not supported (float16 and bfloat16 are)"
    if call.dropout_p > 0.0:
        return "dropout_p > 0 is not implemented in the CUDA kernels"
    if call.mask_requires_grad:
        return "attn_mask requires grad (the CUDA kernels do not differentiate the mask)"
    if call.head_dim > MAX_HEAD_DIM or call.head_dim_v > MAX_HEAD_DIM:
        return (
            f"head dims above {MAX_HEAD_DIM} are not supported "
            f"(E={call.head_dim}, Ev={call.head_dim_v})"
        )
    if call.head_dim < 1 or call.head_dim_v < 1:
        return "head dims of 0 are not supported"
    return None


BACKEND = BackendSpec(
    name="cuda",
    serve=serve,
    devices=("cuda",),
    priority=PRIORITY,
    description="CUDA C++ FlashAttention-2 kernels (sm80 fwd+bwd, sm90a forward)",
    unavailable_reason=unavailable_reason,
    unsupported_reason=unsupported_reason,
)
