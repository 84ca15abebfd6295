"""The ``cpu`` backend: the fused C++ operator ``torch.ops.aigc_ext.attention_forward``.

FlashAttention-2 tiling with AVX-512/AVX2 and AMX brgemm (sources in ``csrc/``; the operators,
their fake kernels and autograd in :mod:`aigc_ext.backends.cpu.ops`). Serves float32, float64,
bfloat16 and float16, causal, bool and floating masks with broadcasting and grouped-query
attention, forward and backward; declines ``dropout_p > 0`` and a mask that requires grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from aigc_ext.backends.spec import BackendSpec
from aigc_ext.layout import run_attention_op
from aigc_ext.validation import SUPPORTED_DTYPES, AttentionCall

__all__ = ["BACKEND", "PRIORITY", "serve", "unavailable_reason", "unsupported_reason"]

# Above every other CPU backend: the default for CPU tensors (triton's interpreter is below it).
PRIORITY = 100

# The forward operator, looked up by the first call rather than at import: loading the compiled
# library is what ``aigc_ext.backends.cpu.ops`` does, and a broken build only makes the backend
# unavailable (see unavailable_reason).
_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


def unavailable_reason() -> str | None:
    """None when the compiled extension loads, else why not."""
    try:
        from aigc_ext.backends.cpu import ops  # noqa: F401
    except (ImportError, OSError) as exc:  # pragma: no cover - broken builds only
        return f"the compiled extension aigc_ext._C failed to load: {exc}"
    return None


def unsupported_reason(call: AttentionCall) -> str | None:
    """None when the fused kernel serves ``call``, else why not."""
    if call.dtype not in SUPPORTED_DTYPES:
        return f"dtype {call.dtype} is not supported"
    if call.dropout_p > 0.0:
        return "dropout_p > 0 is not implemented in the fused kernel"
    if call.mask_requires_grad:
        return "attn_mask requires grad (the fused kernel does not differentiate the mask)"
    return None


def serve(call: AttentionCall) -> torch.Tensor:
    """Runs a validated call on the C++ operator."""
    global _forward
    if _forward is None:
        from aigc_ext.backends.cpu import ops  # noqa: F401  (registers the operators)

        _forward = torch.ops.aigc_ext.attention_forward
    return run_attention_op(_forward, call)


BACKEND = BackendSpec(
    name="cpu",
    serve=serve,
    devices=("cpu",),
    priority=PRIORITY,
    description="fused C++ kernel (FlashAttention-2 tiling, AVX-512/AVX2, AMX brgemm)",
    unavailable_reason=unavailable_reason,
    unsupported_reason=unsupported_reason,
)
