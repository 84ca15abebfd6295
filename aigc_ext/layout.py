"""Reshaping between ``scaled_dot_product_attention`` shapes and the operator's 4-D layout.

The public API accepts ``(..., L, E)`` tensors; the operators take ``(B, H, L, E)``. Leading
dims of the query become ``B`` (all but the last) and ``H`` (the last); key/value batch dims
that broadcast are expanded as views (stride 0), never copied.

Calls whose query, key and value differ in rank, or whose query (or value) batch dims
broadcast up, are first brought by :func:`broadcast_qkv` to the form every backend takes: the
query with the output's batch dims, key and value with the same rank. :func:`empty_result`
gives torch's zeros for an empty value or query.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from aigc_ext.validation import BROADCAST, ZERO_HEAD_DIM, ZEROS, validate_sdpa_args

__all__ = ["OpLayout", "broadcast_qkv", "empty_result", "run_attention_op", "to_op_layout"]


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
        out_shape = self.out_shape
        # 4-D calls (the common case) need no reshape: skip making a view of the same shape.
        return out if out.shape == out_shape else out.reshape(out_shape)


def _to_4d(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` of ``shape`` (*lead, N, D) -> (B, H, N, D) with B = prod(lead[:-1]) (1 if none),
    H = lead[-1]."""
    rank = len(shape)
    if rank == 4:
        return t
    if rank == 2:
        return t.reshape(1, 1, *shape)
    if rank == 3:
        return t.unsqueeze(0)
    return t.reshape(-1, shape[-3], *shape[-2:])


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
    # Plain tuples: slicing a torch.Size costs several times more.
    q_shape, k_shape = tuple(query.shape), tuple(key.shape)
    lead_q = q_shape[:-2]
    if len(q_shape) >= 3 and k_shape[:-3] != q_shape[:-3]:
        kv_lead = (*lead_q[:-1], k_shape[-3])
        key = key.expand(*kv_lead, *k_shape[-2:])
        value = value.expand(*kv_lead, *value.shape[-2:])
        k_shape = tuple(key.shape)
    v_shape = tuple(value.shape)
    q4 = _to_4d(query, q_shape)
    k4 = _to_4d(key, k_shape)
    v4 = _to_4d(value, v_shape)
    mask4 = None
    if attn_mask is not None:
        target = (*q_shape[:-1], k_shape[-2])
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
    out_shape = (*q_shape[:-1], v_shape[-1])
    return OpLayout(q4, k4, v4, mask4, out_shape)


def _kv_to(t: torch.Tensor, kv_lead: tuple[int, ...]) -> torch.Tensor:
    """Key or value ``(..., S, D)`` as a view with batch dims ``kv_lead``.

    Dims of size 1 (and missing leading dims) are expanded with stride 0. A head dim (-3) that
    is neither 1 nor ``kv_lead[-1]`` is an ``enable_gqa`` group count: repeated as torch repeats
    it (``repeat_interleave``, a copy); this happens only when key and value heads differ.
    """
    heads = kv_lead[-1]
    if t.dim() > 2 and t.shape[-3] not in (1, heads):
        t = t.repeat_interleave(heads // t.shape[-3], dim=-3)
    return t.expand(*kv_lead, *t.shape[-2:])


def broadcast_qkv(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    batch_shape: tuple[int, ...],
    heads_kv: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of validated q, k, v with the call's batch dims (``AttentionCall.batch_shape``, the
    output's), all of one rank: query ``(*batch_shape, L, E)``, key and value
    ``(*batch_shape[:-1], heads_kv, S, .)``.

    Broadcast dims get stride 0 (no copy); autograd sums the gradients of the expanded dims.
    Any backend then serves the call as one whose batch dims already agree.
    """
    query = query.expand(*batch_shape, *query.shape[-2:])
    kv_lead = (*batch_shape[:-1], heads_kv)
    return query, _kv_to(key, kv_lead), _kv_to(value, kv_lead)


def empty_result(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """torch's result for a query without rows or an empty value: zeros of shape
    ``(*query.shape[:-1], value.shape[-1])``, whatever the other shapes.

    It is differentiable, with zero gradients for q, k and v; it is built from sums over empty
    slices, so no element of the inputs is read (an inf or NaN there stays out of it).
    """
    nothing = key.narrow(-1, 0, 0).sum() + value.narrow(-1, 0, 0).sum()
    row = query.narrow(-1, 0, 0).sum(-1, keepdim=True) + nothing  # (..., L, 1) zeros
    return row.expand(*query.shape[:-1], value.shape[-1]).contiguous()


def _op_takes(q_shape: tuple, k_shape: tuple, v_shape: tuple) -> bool:
    """Whether :func:`to_op_layout` serves validated shapes as they are: one rank, key and value
    agreeing on all but the last dim, key batch dims equal to the query's or 1, key heads
    (dim -3) dividing the query's, and a head dim."""
    if len(q_shape) != len(k_shape) or k_shape[:-1] != v_shape[:-1] or not q_shape[-1]:
        return False
    if len(q_shape) > 2:
        heads_q, heads_kv = q_shape[-3], k_shape[-3]
        if heads_q % heads_kv if heads_kv else heads_q:
            return False
    return all(b in (a, 1) for a, b in zip(q_shape[:-3], k_shape[:-3], strict=True))


def _grouped(q_shape: tuple, k_shape: tuple, v_shape: tuple) -> bool:
    """Whether a validated call's key/value heads group the query heads (it was made with
    ``enable_gqa``): only then may they be neither 1 nor the query's and divide it."""
    if len(q_shape) < 3:
        return False
    heads_q = q_shape[-3]
    return any(
        len(s) > 2 and s[-3] not in (0, 1, heads_q) and heads_q % s[-3] == 0
        for s in (k_shape, v_shape)
    )


def _any_form(attention, query, key, value, attn_mask, is_causal, scale) -> torch.Tensor:
    """:func:`run_attention_op` for shapes the operator layout does not take as they are (a
    backend called directly, e.g. through ``patch_sdpa``): prepares them as the public API
    does (see :class:`aigc_ext.validation.AttentionCall`), then runs the operator."""
    q_shape, k_shape, v_shape = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    head_dim = q_shape[-1]
    call = validate_sdpa_args(
        query, key, value, attn_mask, 0.0, is_causal, scale if head_dim else None,
        _grouped(q_shape, k_shape, v_shape),
    )  # fmt: skip
    if call.prepare == ZEROS:
        return empty_result(query, key, value)
    if call.prepare == ZERO_HEAD_DIM:  # one zero column: every score is 0 whatever the scale
        query, key = F.pad(query, (0, 1)), F.pad(key, (0, 1))
        return run_attention_op(attention, query, key, value, attn_mask, is_causal, 1.0)
    if call.prepare == BROADCAST:
        query, key, value = broadcast_qkv(query, key, value, call.batch_shape, call.heads_kv)
    lay = to_op_layout(query, key, value, attn_mask)
    out = attention(lay.query, lay.key, lay.value, lay.mask, bool(is_causal), call.scale)
    return lay.restore(out)


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
    shape. Every op-backed backend (``cpu``, ``triton``) goes through here.

    The public API hands over q, k, v already brought to one batch shape; calls that reach a
    backend otherwise (different ranks, a query that broadcasts up, torch's empty cases, head
    dim 0) are prepared here the same way."""
    if not _op_takes(tuple(query.shape), tuple(key.shape), tuple(value.shape)):
        return _any_form(attention, query, key, value, attn_mask, is_causal, scale)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    lay = to_op_layout(query, key, value, attn_mask)
    out = attention(lay.query, lay.key, lay.value, lay.mask, bool(is_causal), float(scale))
    return lay.restore(out)
