"""Argument checking for ``scaled_dot_product_attention``, shared by every backend.

Bad input gets an :class:`AttentionArgumentError` (``TypeError`` for an argument of the wrong
type: a non-tensor, an ``is_causal`` that is not a bool, a ``scale`` torch would not take as a
float) whose message names the argument and the shapes involved, before any kernel runs. That
class is a ``ValueError`` and also a ``RuntimeError``, the class torch's own function raises for
the same calls; ``enable_gqa`` with a tensor of fewer than 3 dims is also an ``IndexError``, as
in torch.

Shapes follow torch's math path: the batch dims (all but the last two) of query, key and value
broadcast together, across ranks too; under ``enable_gqa`` the key/value dim -3 counts as
repeated to the query's dim -3 first. A call whose value is empty or whose query has no rows
yields torch's result without a kernel: zeros of shape ``query.shape[:-1] + (Ev,)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "AttentionArgumentError",
    "AttentionCall",
    "AttentionDimError",
    "ScaleOverflowError",
    "validate_sdpa_args",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# AttentionCall.prepare: what the API does before a backend sees the call (see aigc_ext.layout).
DIRECT = ""  # the tensors go to the backend as they are
BROADCAST = "broadcast"  # views of q, k, v expanded to the output's batch dims first
ZEROS = "zeros"  # an empty value or query: torch's zeros, no backend
ZERO_HEAD_DIM = "zero-head-dim"  # E = 0: every score is 0 (q and k padded to one zero column)


class AttentionArgumentError(ValueError, RuntimeError):
    """Invalid arguments to :func:`aigc_ext.scaled_dot_product_attention`.

    A ``ValueError``, and a ``RuntimeError`` as torch's ``scaled_dot_product_attention`` raises
    for the same calls, so that code written against either catches it.
    """


class AttentionDimError(AttentionArgumentError, IndexError):
    """``enable_gqa`` with a query, key or value of fewer than 3 dims (no head dim -3).

    Also an ``IndexError``, which torch raises there (its math path reads ``size(-3)``).
    """


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to decide whether it can serve a call."""

    device_type: str
    dtype: torch.dtype
    batch_shape: tuple[int, ...]  # leading dims of the output, heads last (may be empty)
    heads_q: int  # batch_shape[-1] (1 if empty): the heads of the operator layout
    heads_kv: int  # key/value heads of the operator layout (heads_q, a divisor, or 1)
    len_q: int
    len_kv: int
    head_dim: int
    head_dim_v: int
    prepare: str  # DIRECT, BROADCAST, ZEROS or ZERO_HEAD_DIM
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


def _error(cls: type[Exception], what: str, query, key, value) -> Exception:
    return cls(f"scaled_dot_product_attention: {what}; got {_qkv(query, key, value)}")


def _gqa_lead(lead: tuple[int, ...], heads_q: int) -> tuple[int, ...]:
    """Key/value batch dims after torch's ``enable_gqa`` repeat of dim -3 to ``heads_q``."""
    return lead if lead[-1] == heads_q else (*lead[:-1], heads_q)


def _batch_shapes(query, key, value, enable_gqa: bool) -> tuple[tuple, tuple, int]:
    """``(score_lead, out_lead, heads_kv)`` of a call whose q, k, v batch dims differ.

    ``score_lead`` are the batch dims of the scores (query's and key's broadcast), ``out_lead``
    those of the output (value's broadcast in too); ``heads_kv`` is the key/value head count
    of the operator layout: the key's and value's own when they agree (1 broadcasts, and under
    ``enable_gqa`` a divisor of the query heads is grouped), else ``out_lead[-1]``.
    """
    lead_q, lead_k, lead_v = (tuple(t.shape[:-2]) for t in (query, key, value))
    eff_k, eff_v = lead_k, lead_v
    if enable_gqa:  # ranks >= 3 and divisibility are checked by the caller
        eff_k, eff_v = _gqa_lead(lead_k, lead_q[-1]), _gqa_lead(lead_v, lead_q[-1])
    score_lead = _broadcast(lead_q, eff_k)
    if score_lead is None:
        if not enable_gqa and lead_q and lead_k and 1 != lead_q[-1] != lead_k[-1] != 1:
            raise _error(
                AttentionArgumentError,
                "query and key/value head counts (dim -3) differ; pass enable_gqa=True for "
                "grouped-query attention",
                query,
                key,
                value,
            )
        raise _error(
            AttentionArgumentError,
            "batch dims (all but the last 2) of query and key do not broadcast",
            query,
            key,
            value,
        )
    out_lead = _broadcast(score_lead, eff_v)
    if out_lead is None:
        raise _error(
            AttentionArgumentError,
            "batch dims (all but the last 2) of value do not broadcast with those of query and key",
            query,
            key,
            value,
        )
    heads = out_lead[-1] if out_lead else 1
    heads_k = lead_k[-1] if lead_k else 1
    heads_v = lead_v[-1] if lead_v else 1
    return score_lead, out_lead, heads_k if heads_k == heads_v else heads


def _check_gqa(query, key, value) -> None:
    """``enable_gqa``: torch's math path reads dim -3 of all three and repeats key/value heads."""
    if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
        raise _error(
            AttentionDimError,
            "enable_gqa needs query, key and value of at least 3 dims (heads at dim -3)",
            query,
            key,
            value,
        )
    heads_q, heads_k, heads_v = query.shape[-3], key.shape[-3], value.shape[-3]
    if heads_k == 0 or heads_v == 0 or heads_q % heads_k or heads_q % heads_v:
        raise _error(
            AttentionArgumentError,
            "with enable_gqa, query heads (dim -3) must be a multiple of key and of value heads",
            query,
            key,
            value,
        )


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
    into a local, and calls whose q, k and v have the same batch dims (the common case) skip
    the broadcasting. As in torch, dtypes, devices and the mask dtype are checked before an
    empty call (no query rows or an empty value) is let through with zeros.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a Tensor, got {type(t)}")
        if t.dim() < 2:
            raise AttentionArgumentError(
                f"scaled_dot_product_attention: {name} must have at least 2 dims (..., seq, dim); "
                f"got shape {_shape(t)}"
            )
    # Plain tuples: slicing a torch.Size costs several times more.
    q_shape, k_shape, v_shape = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    dtype = query.dtype
    if not (dtype == key.dtype == value.dtype):
        raise AttentionArgumentError(
            "scaled_dot_product_attention: query, key and value must have the same dtype; got "
            f"{dtype}, {key.dtype}, {value.dtype} ({_qkv(query, key, value)})"
        )
    if dtype not in SUPPORTED_DTYPES:
        raise AttentionArgumentError(
            f"scaled_dot_product_attention: query, key and value have unsupported dtype "
            f"{dtype}; expected one of {', '.join(str(d) for d in SUPPORTED_DTYPES)} "
            f"({_qkv(query, key, value)})"
        )
    device = query.device
    if not (device == key.device == value.device):
        raise AttentionArgumentError(
            "scaled_dot_product_attention: query, key and value must be on the same device; got "
            f"{device}, {key.device}, {value.device} ({_qkv(query, key, value)})"
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
            raise AttentionArgumentError(
                "scaled_dot_product_attention: attn_mask must be bool, float32 or the query dtype "
                f"({dtype}); got {mask_dtype} (attn_mask {_shape(attn_mask)}, {_qkv(query, key, value)})"
            )
        if attn_mask.device != device:
            raise AttentionArgumentError(
                f"scaled_dot_product_attention: attn_mask is on {attn_mask.device}, query on "
                f"{device} (attn_mask {_shape(attn_mask)}, {_qkv(query, key, value)})"
            )
        mask_requires_grad = attn_mask.requires_grad
    head_dim = q_shape[-1]
    lead_q = q_shape[:-2]
    if q_shape[-2] == 0 or 0 in v_shape:
        # torch returns zeros of this shape before it looks at any other shape.
        prepare, batch_shape, heads_kv = ZEROS, lead_q, k_shape[-3] if len(k_shape) > 2 else 1
    else:
        if enable_gqa:  # torch repeats the key/value heads before it multiplies
            _check_gqa(query, key, value)
        if k_shape[-1] != head_dim:
            raise _error(
                AttentionArgumentError,
                "query and key head dims differ (last dim)",
                query,
                key,
                value,
            )
        if v_shape[-2] != k_shape[-2]:
            raise _error(
                AttentionArgumentError,
                "key and value sequence lengths (dim -2) differ",
                query,
                key,
                value,
            )
        score_lead = lead_q
        if lead_q == k_shape[:-2] == v_shape[:-2]:  # the common case: nothing broadcasts
            prepare, batch_shape = DIRECT, lead_q
            heads_kv = lead_q[-1] if lead_q else 1
        else:
            score_lead, batch_shape, heads_kv = _batch_shapes(query, key, value, enable_gqa)
            same_form = (
                batch_shape == lead_q
                and len(k_shape) == len(q_shape)
                and k_shape[:-1] == v_shape[:-1]
            )  # key/value batch dims broadcast to the query's: every backend takes them as they are
            prepare = DIRECT if same_form else BROADCAST
            if same_form:
                heads_kv = k_shape[-3] if len(k_shape) > 2 else 1
        if attn_mask is not None:
            target = (*score_lead, q_shape[-2], k_shape[-2])
            mask_shape = tuple(attn_mask.shape)
            # A mask of the full score shape broadcasts trivially.
            if mask_shape != target and _broadcast(mask_shape, target) != target:
                raise AttentionArgumentError(
                    f"scaled_dot_product_attention: attn_mask of shape {_shape(attn_mask)} does not "
                    f"broadcast to the score shape {target} (query {_shape(query)}, key {_shape(key)})"
                )
        if head_dim == 0:
            prepare = ZERO_HEAD_DIM
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(
            f"scaled_dot_product_attention: dropout_p must be in [0, 1]; got {dropout_p}"
        )
    if type(is_causal) is not bool:
        raise TypeError(
            f"scaled_dot_product_attention: is_causal must be bool, not {type(is_causal).__name__}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim else math.inf
    else:
        scale = _scale_value(scale)
    return _describe(
        device,  # its type is the device_type
        dtype,
        batch_shape,
        batch_shape[-1] if batch_shape else 1,  # heads_q
        heads_kv,
        q_shape[-2],  # len_q
        k_shape[-2],  # len_kv
        head_dim,
        v_shape[-1],  # head_dim_v
        prepare,
        attn_mask is not None,  # has_mask
        mask_dtype,
        mask_requires_grad,
        float(dropout_p),
        bool(is_causal),
        float(scale),
        bool(enable_gqa),
    )
