"""Argument checking for ``scaled_dot_product_attention``, shared by every backend.

Bad input gets a ``ValueError`` (``TypeError`` for non-tensors) whose message names the
argument and the shapes involved, before any kernel runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SUPPORTED_DTYPES", "AttentionCall", "validate_sdpa_args"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to decide whether it can serve a call."""

    device_type: str
    dtype: torch.dtype
    batch_shape: tuple[int, ...]  # leading dims of the query, heads last (may be empty)
    heads_q: int
    heads_kv: int
    len_q: int
    len_kv: int
    head_dim: int
    head_dim_v: int
    has_mask: bool
    mask_dtype: torch.dtype | None
    mask_requires_grad: bool
    dropout_p: float
    is_causal: bool
    scale: float
    enable_gqa: bool


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    return f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of two shapes, or None when they do not broadcast."""
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def validate_sdpa_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> AttentionCall:
    """Checks the arguments of ``scaled_dot_product_attention`` and describes the call."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a Tensor, got {type(t)}")
        if t.dim() < 2:
            raise ValueError(
                f"scaled_dot_product_attention: {name} must have at least 2 dims (..., seq, dim); "
                f"got shape {_shape(t)}"
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            "scaled_dot_product_attention: query, key and value must have the same dtype; got "
            f"{query.dtype}, {key.dtype}, {value.dtype} ({_qkv(query, key, value)})"
        )
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"scaled_dot_product_attention: query, key and value have unsupported dtype "
            f"{query.dtype}; expected one of {', '.join(str(d) for d in SUPPORTED_DTYPES)} "
            f"({_qkv(query, key, value)})"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            "scaled_dot_product_attention: query, key and value must be on the same device; got "
            f"{query.device}, {key.device}, {value.device} ({_qkv(query, key, value)})"
        )
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            f"scaled_dot_product_attention: query, key and value must have the same rank; got {_qkv(query, key, value)}"
        )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"scaled_dot_product_attention: query and key head dims differ (last dim); got {_qkv(query, key, value)}"
        )
    if query.shape[-1] == 0:
        raise ValueError(
            f"scaled_dot_product_attention: head dim of query and key is 0; got {_qkv(query, key, value)}"
        )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            "scaled_dot_product_attention: key and value must agree on every dim but the last; "
            f"got {_qkv(query, key, value)}"
        )
    heads_q = query.shape[-3] if query.dim() >= 3 else 1
    heads_kv = key.shape[-3] if key.dim() >= 3 else 1
    if heads_q != heads_kv:
        if enable_gqa:
            if heads_kv == 0 or heads_q % heads_kv != 0:
                raise ValueError(
                    "scaled_dot_product_attention: with enable_gqa, query heads (dim -3) must be a "
                    f"multiple of key/value heads; got {_qkv(query, key, value)}"
                )
        elif heads_kv != 1:
            raise ValueError(
                "scaled_dot_product_attention: query and key/value head counts (dim -3) differ; "
                f"pass enable_gqa=True for grouped-query attention; got {_qkv(query, key, value)}"
            )
    lead_q, lead_k = tuple(query.shape[:-3]), tuple(key.shape[:-3])
    if query.dim() >= 3 and _broadcast(lead_q, lead_k) != lead_q:
        raise ValueError(
            "scaled_dot_product_attention: batch dims of key/value must match or broadcast to "
            f"those of query; got {_qkv(query, key, value)}"
        )
    if query.dim() == 3 and key.shape[0] not in (1, query.shape[0]):
        raise ValueError(
            f"scaled_dot_product_attention: batch dims of query and key/value differ; got {_qkv(query, key, value)}"
        )
    mask_dtype = None
    mask_requires_grad = False
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(
                f"scaled_dot_product_attention: attn_mask must be a Tensor or None, got {type(attn_mask)}"
            )
        mask_dtype = attn_mask.dtype
        if mask_dtype not in (torch.bool, query.dtype, torch.float32):
            raise ValueError(
                "scaled_dot_product_attention: attn_mask must be bool, float32 or the query dtype "
                f"({query.dtype}); got {mask_dtype} (attn_mask {_shape(attn_mask)}, {_qkv(query, key, value)})"
            )
        if attn_mask.device != query.device:
            raise ValueError(
                f"scaled_dot_product_attention: attn_mask is on {attn_mask.device}, query on "
                f"{query.device} (attn_mask {_shape(attn_mask)}, {_qkv(query, key, value)})"
            )
        target = (*query.shape[:-1], key.shape[-2])
        if _broadcast(tuple(attn_mask.shape), target) != target:
            raise ValueError(
                f"scaled_dot_product_attention: attn_mask of shape {_shape(attn_mask)} does not "
                f"broadcast to the score shape {target} (query {_shape(query)}, key {_shape(key)})"
            )
        mask_requires_grad = attn_mask.requires_grad
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(
            f"scaled_dot_product_attention: dropout_p must be in [0, 1]; got {dropout_p}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(
            f"scaled_dot_product_attention: scale must be a finite number; got {scale}"
        )
    return AttentionCall(
        device_type=query.device.type,
        dtype=query.dtype,
        batch_shape=tuple(query.shape[:-2]),
        heads_q=heads_q,
        heads_kv=heads_kv,
        len_q=query.shape[-2],
        len_kv=key.shape[-2],
        head_dim=query.shape[-1],
        head_dim_v=value.shape[-1],
        has_mask=attn_mask is not None,
        mask_dtype=mask_dtype,
        mask_requires_grad=mask_requires_grad,
        dropout_p=float(dropout_p),
        is_causal=bool(is_causal),
        scale=float(scale),
        enable_gqa=bool(enable_gqa),
    )
