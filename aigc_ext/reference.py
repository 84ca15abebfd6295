"""Pure-PyTorch reference attention: the test oracle and the fallback backend.

Written with plain tensor math (matmul, softmax) in float32, or float64 for float64 inputs,
so it serves any feature combination: dropout, masks that require gradients, any device.
It materialises the L x S score matrix, so it is slow and memory-hungry by design.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_forward_reference", "sdpa_reference"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """Scaled, masked scores (..., L, S) in ``compute_dtype``.

    ``attn_mask`` is added, a bool one as 0 where True and -inf where False, as torch does: a
    NaN score at a masked key stays NaN (NaN + -inf) and so makes its row NaN. Causally hidden
    keys are then set to -inf whatever their score or mask, so they take no part in the row,
    as in torch's flash kernel and the fused backends, which never read them.
    """
    s = torch.matmul(query.to(compute_dtype), key.to(compute_dtype).transpose(-2, -1)) * scale
    length, kv_length = s.shape[-2], s.shape[-1]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros_like(attn_mask, dtype=compute_dtype)
            s = s + bias.masked_fill_(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(compute_dtype)
    if is_causal:
        hidden = torch.ones(length, kv_length, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(hidden, float("-inf"))
    return s


def _softmax_rows(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that gives zeros (not NaN) for rows with no finite score."""
    if s.shape[-1] == 0:  # no keys at all (S = 0): an empty (..., L, 0) matrix
        return torch.softmax(s, dim=-1)
    row_max = s.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    safe_max = torch.where(empty, torch.zeros_like(row_max), row_max).detach()
    e = torch.exp(s - safe_max)
    denom = e.sum(dim=-1, keepdim=True)
    return torch.where(empty, torch.zeros_like(e), e / torch.where(empty, 1, denom))


def _expand_kv_heads(key: torch.Tensor, value: torch.Tensor, heads_q: int):
    heads_kv = key.shape[-3]
    if heads_kv != heads_q:
        key = key.repeat_interleave(heads_q // heads_kv, dim=-3)
        value = value.repeat_interleave(heads_q // heads_kv, dim=-3)
    return key, value


def attention_forward_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The operator contract in plain PyTorch: returns ``(out, lse)`` for 4-D inputs.

    ``out`` has the input dtype; ``lse`` is float32 (float64 for float64 inputs) and ``-inf``
    for rows with no visible key.
    """
    cd = _compute_dtype(query.dtype)
    key, value = _expand_kv_heads(key, value, query.shape[-3])
    s = _scores(query, key, attn_mask, is_causal, scale, cd)
    p = _softmax_rows(s)
    out = torch.matmul(p, value.to(cd)).to(query.dtype)
    lse = torch.logsumexp(s, dim=-1)
    return out, lse.to(cd)


def sdpa_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` semantics in plain PyTorch, differentiable.

    Arguments are assumed validated (see :mod:`aigc_ext.validation`). Dropout draws from
    torch's global generator, like torch's own math backend.
    """
    cd = _compute_dtype(query.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        # Cast before expanding, so that the backward sums a head group's gradients in the
        # compute dtype rather than in the (possibly bf16/fp16) input dtype.
        key, value = _expand_kv_heads(key.to(cd), value.to(cd), query.shape[-3])
    s = _scores(query, key, attn_mask, is_causal, scale, cd)
    p = _softmax_rows(s)
    if dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, p=dropout_p, training=True)
    return torch.matmul(p, value.to(cd)).to(query.dtype)
