"""The ``triton`` backend: FlashAttention-2 Triton kernels for CUDA tensors.

This module imports neither Triton nor the kernels at import time, so registering the backend
costs nothing where Triton is missing; the kernels load on the first call.

* Devices: ``cuda``; also ``cpu`` when the Triton interpreter is on (``TRITON_INTERPRET=1``),
  for testing (slow; the C++ ``cpu`` backend keeps a higher priority there).
* Serves float16, bfloat16 and float32 (float32 is computed with IEEE float32 dots, no TF32);
  causal (top-left aligned), bool and floating masks broadcastable to ``(B, Hq, L, S)``,
  grouped-query attention, any ``L`` and ``S``, head dims up to 256 with ``Ev != E``.
* Declines (the dispatcher falls back): float64, ``dropout_p > 0``, a mask that requires grad,
  head dims above 256.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

from aigc_ext.backends.spec import BackendSpec
from aigc_ext.layout import run_attention_op
from aigc_ext.validation import AttentionCall

__all__ = [
    "BACKEND",
    "PRIORITY_CUDA",
    "PRIORITY_INTERPRETED",
    "devices",
    "interpreter_enabled",
    "priority",
    "serve",
    "unavailable_reason",
    "unsupported_reason",
]

MAX_HEAD_DIM = 256
# Above the C++ kernel's 100: the default for CUDA tensors (the cpu backend never serves them).
PRIORITY_CUDA = 200
# Below the C++ kernel: under the interpreter, CPU calls still go to the cpu backend by default.
PRIORITY_INTERPRETED = 50
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None  # set by the first call


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``).

    Read from the environment as Triton reads it, without importing Triton (which is slow);
    if Triton is already imported, its own setting answers.
    """
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def devices() -> tuple[str, ...]:
    """The devices the backend registers for: ``cuda``, plus ``cpu`` under the interpreter."""
    return ("cuda", "cpu") if interpreter_enabled() else ("cuda",)


def priority() -> int:
    """``PRIORITY_INTERPRETED`` under the interpreter, else ``PRIORITY_CUDA``."""
    return PRIORITY_INTERPRETED if interpreter_enabled() else PRIORITY_CUDA


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return (
            f"triton is not installed or failed to import ({exc}); pip install 'aigc_ext[triton]'"
        )
    if interpreter_enabled():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False) and TRITON_INTERPRET is not set"
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    if all(cc < (8, 0) for cc in capabilities):
        return f"needs a GPU of compute capability 8.0 or newer; found {capabilities}"
    return None


def unsupported_reason(call: AttentionCall) -> str | None:
    """None when the kernels serve ``call``, else why not (the dispatcher then falls back)."""
    if call.dropout_p > 0.0:
        return "dropout_p > 0 is not implemented in the Triton kernels"
    if call.mask_requires_grad:
        return "attn_mask requires grad (the Triton kernels do not differentiate the mask)"
    if call.dtype not in _DTYPES:
        return f"dtype {call.dtype} is not supported (float16, bfloat16 and float32 are)"
    if call.head_dim > MAX_HEAD_DIM or call.head_dim_v > MAX_HEAD_DIM:
        return (
            f"head dims above {MAX_HEAD_DIM} are not supported "
            f"(E={call.head_dim}, Ev={call.head_dim_v})"
        )
    return None


def serve(call: AttentionCall) -> torch.Tensor:
    """Runs a validated call on the Triton operators (loaded, with Triton, by the first call)."""
    global _forward
    if _forward is None:
        from aigc_ext.backends.triton import ops  # noqa: F401  (registers the operators)

        _forward = torch.ops.aigc_ext.triton_attention_forward
    return run_attention_op(_forward, call)


# Devices and priority depend on the Triton interpreter, which is fixed for the process: CUDA
# tensors (the default there, above cpu's priority); CPU tensors too under TRITON_INTERPRET=1,
# for testing, below the C++ kernel so that it stays the CPU default.
BACKEND = BackendSpec(
    name="triton",
    serve=serve,
    devices=devices(),
    priority=priority(),
    description="FlashAttention-2 Triton kernels (CUDA; CPU through the Triton interpreter)",
    unavailable_reason=unavailable_reason,
    unsupported_reason=unsupported_reason,
)
