"""Argument checking for ``scaled_dot_product_attention``, shared by every backend.

Bad input gets a ``ValueError`` (``TypeError`` for an argument of the wrong type: a non-tensor,
an ``is_causal`` that is not a bool, a ``scale`` torch would not take as a float) whose message
names the argument and the shapes involved, before any kernel runs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import torch

__all__ = ["SUPPORTED_DTYPES", "AttentionCall", "ScaleOverflowError", "validate_sdpa_args"]

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


_calls: dict[tuple, AttentionCall] = {}  # memo of _describe, keyed by the field values
_MAX_CALLS = 1024
_FIELDS = [f.name for f in fields(AttentionCall)]
_DROPOUT_P, _SCALE = _FIELDS.index("dropout_p"), _FIELDS.index("scale")


def _describe(*values: object) -> AttentionCall:
    """``AttentionCall(values[0].type, *values[1:])``: ``values`` are the fields in order, except
    that the first is the device itself (reading ``device.type`` costs more than the memo).

    This runs at every attention call, and the ``__init__`` of a frozen dataclass (16
    ``object.__setattr__`` calls) costs about as much as all the checks together. A model
    makes the same few calls over and over and the description is immutable, so each distinct
    one is built once and shared. 0.0 and -0.0 compare equal but are different values, so a
    ``dropout_p`` or ``scale`` with the sign bit set bypasses the memo; so does
    ``torch.compile``, which traces the constructor.
    """
    if (
        torch.compiler.is_compiling()
        or math.copysign(1.0, values[_DROPOUT_P]) < 0.0
        or math.copysign(1.0, values[_SCALE]) < 0.0
    ):
        return AttentionCall(values[0].type, *values[1:])
    call = _calls.get(values)
    if call is None:
        if len(_calls) >= _MAX_CALLS:  # e.g. a new key length at every generation step
            _calls.clear()
        call = _calls[values] = AttentionCall(values[0].type, *values[1:])
    return call


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


class ScaleOverflowError(ValueError, OverflowError):
    """``scale`` is an integer too large for a float. A ``ValueError`` like every bad argument
    here, and an ``OverflowError`` like the one torch's own function raises for it."""


def _scale_value(scale: object) -> float:
    """``scale`` as a finite float, accepting what torch's ``scale`` (a Python float) accepts.

    That is a Python ``float`` or ``int``, a NumPy real scalar, or a 0-dim tensor that does not
    require grad (read with ``.item()``); anything else is a ``TypeError``, as in torch. A value
    that is not finite is a ``ValueError`` (torch lets it through and returns NaNs).
    """
    if type(scale) is not float:  # the common case costs one type check
        if isinstance(scale, torch.Tensor):
            if scale.dim() != 0 or scale.requires_grad:
                grad = ", requires grad" if scale.requires_grad else ""
                raise TypeError(
                    "scaled_dot_product_attention: scale must be a Python float (or a 0-dim "
                    f"tensor that does not require grad, as torch accepts); got a Tensor of shape "
                    f"{_shape(scale)}{grad}"
                )
            scale = scale.item()
        elif not isinstance(scale, (int, float)) and not _is_numpy_real(scale):
            raise TypeError(
                "scaled_dot_product_attention: scale must be a Python float; got "
                f"{type(scale).__name__} {scale!r}"
            )
        try:
            scale = float(scale)
        except OverflowError:
            bits = abs(int(scale)).bit_length()
            raise ScaleOverflowError(
                f"scaled_dot_product_attention: scale must be a finite float; got an integer of "
                f"{bits} bits, too large to convert to float (the largest is about 1.8e308)"
            ) from None
    if not math.isfinite(scale):
        raise ValueError(
            f"scaled_dot_product_attention: scale must be a finite number; got {scale}"
        )
    return scale


def _is_numpy_real(value: object) -> bool:
    """A NumPy integer or floating scalar (``np.float32(0.5)``), which torch takes as a float."""
    return type(value).__module__ == "numpy" and isinstance(value, numbers.Real)


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
    """Checks the arguments of ``scaled_dot_product_attention`` and describes the call.

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
    if type(is_causal) is not bool:
        raise TypeError(
            f"scaled_dot_product_attention: is_causal must be bool, not {type(is_causal).__name__}"
        )
    scale = 1.0 / math.sqrt(head_dim) if scale is None else _scale_value(scale)
    return _describe(
        device,  # its type is the device_type
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
