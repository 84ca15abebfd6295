"""Argument checking for ``scaled_dot_product_attention``, shared by every backend.

Bad input gets a ``ValueError`` (``TypeError`` for non-tensors) whose message names the
argument and the shapes involved, before any kernel runs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["SUPPORTED_DTYPES", "AttentionCall", "validate_sdpa_args"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class AttentionCall(NamedTuple):
    """A validated call: its tensors, its resolved options and what a backend needs to know to
    decide whether it can serve it.

    Backends receive it whole (``serve(call)``), rather than eight loose arguments. It is a
    named tuple, built once per call: one allocation, and cheap to read and to trace with
    ``torch.compile``. ``scale`` is resolved (a float) and ``dropout_p`` a float.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
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


# device -> device.type: reading the attribute builds a new string at every call, a dict lookup
# does not. Devices are few (cpu, meta, cuda:N), so the cache stays small.
_DEVICE_TYPES: dict[torch.device, str] = {}


def _device_type(device: torch.device) -> str:
    """``device.type``, remembered (the call sites try ``_DEVICE_TYPES`` first)."""
    device_type = device.type
    if not torch.compiler.is_compiling():  # dynamo would record the store as a side effect
        _DEVICE_TYPES[device] = device_type
    return device_type


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
    """Checks the arguments of ``scaled_dot_product_attention`` and returns the call.

    This runs on every attention call, so each tensor's shape, dtype and device is read once
    into a local; the checks (and so which error a bad call gets) keep their order.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a Tensor, got {type(t)}")
        if t.dim() < 2:
            raise ValueError(
                f"scaled_dot_product_attention: {name} must have at least 2 dims (..., seq, dim); "
                f"got shape {_shape(t)}"
            )
    # Plain tuples: slicing a torch.Size costs several times more.
    q_shape, k_shape, v_shape = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    dtype = query.dtype
    if not (dtype == key.dtype == value.dtype):
        raise ValueError(
            "scaled_dot_product_attention: query, key and value must have the same dtype; got "
            f"{dtype}, {key.dtype}, {value.dtype} ({_qkv(query, key, value)})"
        )
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"scaled_dot_product_attention: query, key and value have unsupported dtype "
            f"{dtype}; expected one of {', '.join(str(d) for d in SUPPORTED_DTYPES)} "
            f"({_qkv(query, key, value)})"
        )
    device = query.device
    if not (device == key.device == value.device):
        raise ValueError(
            "scaled_dot_product_attention: query, key and value must be on the same device; got "
            f"{device}, {key.device}, {value.device} ({_qkv(query, key, value)})"
        )
    rank = len(q_shape)
    if not (rank == len(k_shape) == len(v_shape)):
        raise ValueError(
            f"scaled_dot_product_attention: query, key and value must have the same rank; got {_qkv(query, key, value)}"
        )
    head_dim = q_shape[-1]
    if k_shape[-1] != head_dim:
        raise ValueError(
            f"scaled_dot_product_attention: query and key head dims differ (last dim); got {_qkv(query, key, value)}"
        )
    if head_dim == 0:
        raise ValueError(
            f"scaled_dot_product_attention: head dim of query and key is 0; got {_qkv(query, key, value)}"
        )
    # Equal shapes (the common case) agree on every dim: no need to slice them.
    if k_shape != v_shape and k_shape[:-1] != v_shape[:-1]:
        raise ValueError(
            "scaled_dot_product_attention: key and value must agree on every dim but the last; "
            f"got {_qkv(query, key, value)}"
        )
    heads_q = q_shape[-3] if rank >= 3 else 1
    heads_kv = k_shape[-3] if rank >= 3 else 1
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
    if rank >= 3:
        lead_q, lead_k = q_shape[:-3], k_shape[:-3]
        # Equal batch dims (the common case) broadcast trivially.
        if lead_q != lead_k and _broadcast(lead_q, lead_k) != lead_q:
            raise ValueError(
                "scaled_dot_product_attention: batch dims of key/value must match or broadcast to "
                f"those of query; got {_qkv(query, key, value)}"
            )
    if rank == 3 and k_shape[0] not in (1, q_shape[0]):
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
        if mask_dtype not in (torch.bool, dtype, torch.float32):
            raise ValueError(
                "scaled_dot_product_attention: attn_mask must be bool, float32 or the query dtype "
                f"({dtype}); got {mask_dtype} (attn_mask {_shape(attn_mask)}, {_qkv(query, key, value)})"
            )
        if attn_mask.device != device:
            raise ValueError(
                f"scaled_dot_product_attention: attn_mask is on {attn_mask.device}, query on "
                f"{device} (attn_mask {_shape(attn_mask)}, {_qkv(query, key, value)})"
            )
        target = (*q_shape[:-1], k_shape[-2])
        mask_shape = attn_mask.shape
        # A mask of the full score shape broadcasts trivially.
        if mask_shape != target and _broadcast(mask_shape, target) != target:
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
        scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(
            f"scaled_dot_product_attention: scale must be a finite number; got {scale}"
        )
    return AttentionCall(
        query,
        key,
        value,
        attn_mask,
        _DEVICE_TYPES.get(device) or _device_type(device),
        dtype,
        q_shape[:-2],  # batch_shape
        heads_q,
        heads_kv,
        q_shape[-2],  # len_q
        k_shape[-2],  # len_kv
        head_dim,
        v_shape[-1],  # head_dim_v
        attn_mask is not None,  # has_mask
        mask_dtype,
        mask_requires_grad,
        float(dropout_p),
        bool(is_causal),
        float(scale),
        bool(enable_gqa),
    )
