"""The ``cpu`` backend: the fused C++ operator ``torch.ops.aigc_ext.attention_forward``."""

from __future__ import annotations

from types import ModuleType

import torch

from aigc_ext.layout import run_attention_op
from aigc_ext.validation import SUPPORTED_DTYPES, AttentionCall

__all__ = ["sdpa", "unavailable_reason", "unsupported_reason"]

# aigc_ext.ops, imported by the first call rather than here: a broken build only makes the
# backend unavailable (see unavailable_reason).
_ops: ModuleType | None = None


def unavailable_reason() -> str | None:
    try:
        from aigc_ext import ops  # noqa: F401
    except (ImportError, OSError) as exc:  # pragma: no cover - broken builds only
        return f"the compiled extension aigc_ext._C failed to load: {exc}"
    return None


def unsupported_reason(call: AttentionCall) -> str | None:
    if call.dtype not in SUPPORTED_DTYPES:
        return f"dtype {call.dtype} is not supported"
    if call.dropout_p > 0.0:
        return "dropout_p > 0 is not implemented in the fused kernel"
    if call.mask_requires_grad:
        return "attn_mask requires grad (the fused kernel does not differentiate the mask)"
    return None


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    global _ops
    if _ops is None:
        from aigc_ext import ops

        _ops = ops
    return run_attention_op(_ops.attention, query, key, value, attn_mask, is_causal, scale)
