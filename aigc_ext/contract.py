"""Autograd for the attention operator contract, shared by every op-backed backend.

Each backend (``cpu``: ``aigc_ext::attention_forward``/``attention_backward``; ``triton``:
``aigc_ext::triton_attention_forward``/``triton_attention_backward``) has a forward operator
``(q, k, v, attn_mask, is_causal, scale) -> (out, lse)`` and a backward operator
``(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale) -> (grad_q, grad_k, grad_v)``
(see :mod:`aigc_ext.backends.cpu.ops`). The autograd formula joining them is the same for all, so it lives
here once. This module loads no extension and no kernel.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["register_attention_autograd"]


def register_attention_autograd(forward_op: Any, backward_name: str) -> None:
    """Makes ``forward_op`` (an operator's qualified name or a ``custom_op``/``triton_op``
    object) differentiable in q, k and v through ``torch.ops.aigc_ext.<backward_name>``.

    ``lse`` is saved for the backward and marked non-differentiable; the mask, ``is_causal`` and
    ``scale`` get no gradient (a mask that requires grad never reaches a fused backend).
    """

    def setup_context(ctx, inputs, output) -> None:
        query, key, value, attn_mask, is_causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(query, key, value, out, lse, attn_mask)
        ctx.is_causal = is_causal
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse, attn_mask = ctx.saved_tensors
        backward_op = getattr(torch.ops.aigc_ext, backward_name)
        dq, dk, dv = backward_op(
            grad_out, query, key, value, out, lse, attn_mask, ctx.is_causal, ctx.scale
        )
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
