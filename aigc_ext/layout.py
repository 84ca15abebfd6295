"""Reshaping between ``scaled_dot_product_attention`` shapes and the operator's 4-D layout.

The public API accepts ``(..., L, E)`` tensors; the operators take ``(B, H, L, E)``. Leading
dims of the query become ``B`` (all but the last) and ``H`` (the last); key/value batch dims
that broadcast are expanded as views (stride 0), never copied.

Calls whose query, key and value differ in rank, or whose query (or value) batch dims
broadcast up, are first brought by :func:`broadcast_qkv` to the form every backend takes: the
query with the output's batch dims, key and value with the same rank. :func:`empty_result`
gives torch's zeros for an empty value or query. :func:`aigc_ext.api.serve` applies both, as
the call's ``prepare`` says, before any backend sees it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from aigc_ext.validation import AttentionCall

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


def run_attention_op(
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]], call: AttentionCall
) -> torch.Tensor:
    """Serves a prepared call (an :class:`~aigc_ext.validation.AttentionCall` whose ``prepare``
    is ``DIRECT``, as :func:`aigc_ext.api.serve` hands it over) with a fused forward operator
    ``forward(q, k, v, mask, is_causal, scale) -> (out, lse)`` taking the 4-D operator layout:
    brings the tensors to that layout and gives the output the caller's shape. Every op-backed
    backend (``cpu``, ``triton``) goes through here."""
    lay = to_op_layout(call.query, call.key, call.value, call.attn_mask)
    out = forward(lay.query, lay.key, lay.value, lay.mask, call.is_causal, call.scale)[0]
    return lay.restore(out)
