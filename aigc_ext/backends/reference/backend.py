"""The ``reference`` backend: :func:`aigc_ext.backends.reference.ops.sdpa_reference`.

Pure PyTorch in float32 (float64 for float64 inputs), so it serves every valid call on every
device: dropout, masks that require grad. The dispatcher falls back to it when no fused
backend serves a call, whatever its priority; the lowest priority keeps it last in listings.
"""

from __future__ import annotations

import torch

from aigc_ext.backends.reference.ops import sdpa_reference
from aigc_ext.backends.spec import BackendSpec
from aigc_ext.validation import AttentionCall

__all__ = ["BACKEND", "PRIORITY", "serve"]

PRIORITY = -100


def serve(call: AttentionCall) -> torch.Tensor:
    """Runs a validated call in plain PyTorch."""
    return sdpa_reference(
        call.query,
        call.key,
        call.value,
        call.attn_mask,
        call.dropout_p,
        call.is_causal,
        call.scale,
        call.enable_gqa,
    )


BACKEND = BackendSpec(
    name="reference",
    serve=serve,
    devices=("cpu", "cuda", "mps", "xpu", "meta"),
    priority=PRIORITY,
    description="pure-PyTorch math in fp32/fp64 (test oracle and fallback)",
)
