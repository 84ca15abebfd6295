"""Reshaping between ``scaled_dot_product_attention`` shapes and the operator's 4-D layout.

The public API accepts ``(..., L, E)`` tensors; the operators take ``(B, H, L, E)``. Leading
dims of the query become ``B`` (all but the last) and ``H`` (the last); key/value batch dims
that broadcast are expanded as views (stride 0), never copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["OpLayout", "run_attention_op", "to_op_layout"]


class OpLayout:
    """4-D views of one call's tensors plus what is needed to restore the output shape."""

    __slots__ = ("key", "mask", "out_shape", "query", "value")

    def __init__(self, query, key, value, mask, out_shape):
        self.query = query
        self.key = key
        self.value = value
        self.mask = mask
        self.out_shape = out_shape

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        return out.reshape(self.out_shape)


def _to_4d(t: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """(*lead, N, D) -> (B, H, N, D) with B = prod(lead[:-1]) (1 if none), H = lead[-1]."""
    if len(lead) == 0:
        return t.reshape(1, 1, *t.shape[-2:])
    if len(lead) == 1:
        return t.unsqueeze(0)
    if len(lead) == 2:
        return t
    return t.reshape(-1, lead[-1], *t.shape[-2:])


def to_op_layout(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
) -> OpLayout:
    """Views of the (validated) arguments in the operator layout.

    3-D inputs ``(N, L, E)`` become ``(1, N, L, E)``: dim -3 is the head dim, as for
    ``enable_gqa``, so a key/value with ``N == 1`` is shared by every query row group through the
    operator's GQA support; 2-D ``(L, E)`` become ``(1, 1, L, E)``.
    Key/value batch dims that broadcast to the query's are expanded; their head count stays
    (GQA is served by the operator directly).
    """
    lead_q = tuple(query.shape[:-2])
    if query.dim() >= 3 and key.shape[:-3] != query.shape[:-3]:
        kv_lead = (*lead_q[:-1], key.shape[-3])
        key = key.expand(*kv_lead, *key.shape[-2:])
        value = value.expand(*kv_lead, *value.shape[-2:])
    q4 = _to_4d(query, lead_q)
    k4 = _to_4d(key, tuple(key.shape[:-2]))
    v4 = _to_4d(value, tuple(value.shape[:-2]))
    mask4 = None
    if attn_mask is not None:
        target = (*lead_q, query.shape[-2], key.shape[-2])
        m = attn_mask
        if m.dim() < len(target):
            m = m.reshape((1,) * (len(target) - m.dim()) + tuple(m.shape))
        if len(target) > 4:
            m = m.expand(target).reshape(-1, lead_q[-1], *target[-2:])
        elif len(target) == 3:
            m = m.unsqueeze(0)  # (N, L, S) -> (1, N, L, S), like the query
        elif len(target) == 2:
            m = m.reshape(1, 1, *m.shape)
        mask4 = m
    out_shape = (*lead_q, query.shape[-2], value.shape[-1])
    return OpLayout(q4, k4, v4, mask4, out_shape)


def run_attention_op(
    attention: Callable[..., torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """Serves a validated ``scaled_dot_product_attention`` call with a fused operator wrapper
    ``attention(q, k, v, mask, is_causal, scale)`` taking the 4-D operator layout: brings the
    arguments to that layout, applies the default scale, and gives the output the caller's
    shape. Every op-backed backend (``cpu``, ``triton``) goes through here."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    lay = to_op_layout(query, key, value, attn_mask)
    out = attention(lay.query, lay.key, lay.value, lay.mask, bool(is_causal), float(scale))
    return lay.restore(out)
