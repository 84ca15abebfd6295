"""The Triton attention operators: ``torch.ops.aigc_ext.triton_attention_forward`` / ``_backward``.

They follow the contract of the C++ operators (see :mod:`aigc_ext.backends.cpu.ops`)::

    triton_attention_forward(q, k, v, attn_mask, is_causal, scale) -> (out, lse)
    triton_attention_backward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale)
        -> (grad_q, grad_k, grad_v)

with q ``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)``, ``Hq % Hkv == 0``,
``attn_mask`` bool or floating and broadcastable to ``(B, Hq, L, S)``; ``lse`` is float32
``(B, Hq, L)``, natural-log, ``-inf`` for rows with no visible key (whose output is zero).

On a GPU they are ``torch.library.triton_op`` operators: ``torch.compile`` traces into them
and sees the kernels (``torch.library.wrap_triton``), so ``fullgraph=True`` works. The kernels
are named directly in ``wrap_triton(kernel)`` calls so that torch finds them in the source (it
hashes them into its compile caches). Under the
Triton interpreter (``TRITON_INTERPRET=1``), where tracing a Triton kernel with fake tensors
fails, they are opaque ``torch.library.custom_op`` operators with the same fake kernels, so
``torch.compile`` still captures them whole.
"""

from __future__ import annotations

import math

import torch
import triton
from torch.library import wrap_triton

from aigc_ext.backends.triton import kernels as K
from aigc_ext.backends.triton.kernels import (
    attn_bwd_dkdv,
    attn_bwd_dq,
    attn_bwd_preprocess,
    attn_fwd,
)
from aigc_ext.contract import register_attention_autograd

__all__ = ["MAX_HEAD_DIM", "SUPPORTED_DTYPES", "attention_with_lse"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_MASK_DTYPES = (torch.bool, torch.float32, torch.float16, torch.bfloat16)
_PREPROCESS_BLOCK = 32 if K.INTERPRET else 64

_define = torch.library.custom_op if K.INTERPRET else torch.library.triton_op


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _check(query, key, value, attn_mask, scale, others=()) -> None:
    """Argument checks of the operators (the public API checks earlier, with more context).

    ``others`` are the backward's further tensors, ``(name, tensor)``: they too must be on the
    query's device. The fake kernels run these checks as well, so a call with one tensor on the
    meta device (which the dispatcher sends to the fake kernel) raises too.
    """
    where = "aigc_ext::triton_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must be 4-D (B, H, N, D); got shape {_shape(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{where}: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32"
            )
    for name, t in (("key", key), ("value", value), ("attn_mask", attn_mask), *others):
        if t is not None and t.device != query.device:
            raise ValueError(
                f"{where}: {name} is on {t.device} but query is on {query.device}; all tensors "
                "must be on one device"
            )
    if query.device.type != "cuda" and not K.INTERPRET:
        raise ValueError(
            f"{where}: tensors must be on a CUDA device (got {query.device}); CPU tensors run "
            "only under the Triton interpreter (TRITON_INTERPRET=1)"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"{where}: query, key and value dtypes differ: "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    b, hq, _, e = query.shape
    if key.shape[0] != b or value.shape[0] != b:
        raise ValueError(
            f"{where}: batch sizes differ: query {_shape(query)}, key {_shape(key)}, "
            f"value {_shape(value)}"
        )
    if key.shape[:3] != value.shape[:3] or key.shape[3] != e:
        raise ValueError(
            f"{where}: expected key (B, Hkv, S, E) and value (B, Hkv, S, Ev) with E = query's "
            f"{e}; got query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"
        )
    hkv = key.shape[1]
    if (hkv == 0 and hq != 0) or (hkv != 0 and hq % hkv != 0):
        raise ValueError(
            f"{where}: query heads ({hq}) must be a multiple of key/value heads ({hkv})"
        )
    if e > MAX_HEAD_DIM or value.shape[3] > MAX_HEAD_DIM:
        raise ValueError(
            f"{where}: head dims up to {MAX_HEAD_DIM} are supported; got E={e}, Ev={value.shape[3]}"
        )
    if attn_mask is not None:
        if attn_mask.dtype not in _MASK_DTYPES:
            raise ValueError(
                f"{where}: attn_mask dtype {attn_mask.dtype} is not one of bool, float32, "
                "float16, bfloat16"
            )
        target = (b, hq, query.shape[2], key.shape[2])
        if attn_mask.dim() > 4 or any(
            m not in (1, t)
            for m, t in zip(reversed(attn_mask.shape), reversed(target), strict=False)
        ):
            raise ValueError(
                f"{where}: attn_mask of shape {_shape(attn_mask)} does not broadcast to {target}"
            )
    if isinstance(scale, (int, float)) and not math.isfinite(scale):  # a SymFloat: at run time
        raise ValueError(f"{where}: scale must be a finite number; got {scale}")


def _check_backward(grad_out, query, key, value, out, lse, attn_mask, scale) -> None:
    """The forward's checks, and grad_out, out (B, Hq, L, Ev) and lse (B, Hq, L) on its device."""
    _check(
        query, key, value, attn_mask, scale, (("grad_out", grad_out), ("out", out), ("lse", lse))
    )
    where = "aigc_ext::triton_attention_backward"
    out_shape = (*query.shape[:3], value.shape[3])
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != out_shape:
            raise ValueError(
                f"{where}: {name} has shape {_shape(t)} but must have shape {out_shape} (batch, "
                f"heads and length of query {_shape(query)}, head dim of value {_shape(value)})"
            )
    if tuple(lse.shape) != out_shape[:3]:
        raise ValueError(
            f"{where}: lse has shape {_shape(lse)} but must have shape {out_shape[:3]} (batch, "
            f"heads and length of query {_shape(query)})"
        )


def _mask_args(attn_mask, query, b, h, lq, lkv):
    """(tensor, strides, MASK_MODE, MASK_BOOL) for the kernels; a view, never a copy."""
    if attn_mask is None:
        return query, (0, 0, 0, 0), 0, False
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    m = m.expand(b, h, lq, lkv)
    is_bool = m.dtype == torch.bool
    if is_bool:
        m = m.view(torch.uint8)
    strides = tuple(m.stride())
    mode = 1 if (strides[2] == 0 or lq == 1) else 2
    return m, strides, mode, is_bool


def _common(query, key, value, attn_mask, is_causal):
    b, h, lq, e = query.shape
    hkv, lkv, ev = key.shape[1], key.shape[2], value.shape[3]
    m, m_strides, mode, is_bool = _mask_args(attn_mask, query, b, h, lq, lkv)
    block_d = max(16, triton.next_power_of_2(e))
    block_dv = max(16, triton.next_power_of_2(ev))
    consts = {
        "BLOCK_D": block_d,
        "BLOCK_DV": block_dv,
        "EVEN_D": e == block_d,
        "EVEN_DV": ev == block_dv,
        "IS_CAUSAL": bool(is_causal),
        "MASK_MODE": mode,
        "MASK_BOOL": is_bool,
        "PRECISE": query.dtype == torch.float32,
        "UPCAST": K.INTERPRET and query.dtype == torch.bfloat16,
    }
    # Autotuning buckets: powers of two, so that every new length does not tune again.
    keys = (triton.next_power_of_2(lq), triton.next_power_of_2(lkv))
    return (b, h, hkv, lq, lkv, e, ev), m, m_strides, consts, keys


def _forward(query, key, value, attn_mask, is_causal, scale):
    _check(query, key, value, attn_mask, scale)
    (b, h, hkv, lq, lkv, e, ev), m, m_strides, consts, keys = _common(
        query, key, value, attn_mask, is_causal
    )
    if b * h * lq == 0 or lkv == 0:  # nothing to see: zeros, lse -inf
        out = query.new_zeros((b, h, lq, ev))
        lse = torch.full((b, h, lq), float("-inf"), dtype=torch.float32, device=query.device)
        return out, lse
    out = query.new_empty((b, h, lq, ev))
    lse = query.new_empty((b, h, lq), dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]) * b * h,)

    wrap_triton(attn_fwd)[grid](
        query, key, value, m, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *m_strides, *out.stride(),
        h, h // hkv, lq, lkv, e, ev, scale * K.LOG2E, *keys,
        **consts,
    )  # fmt: skip
    return out, lse


def _backward(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale):
    _check_backward(grad_out, query, key, value, out, lse, attn_mask, scale)
    (b, h, hkv, lq, lkv, e, ev), m, m_strides, consts, keys = _common(
        query, key, value, attn_mask, is_causal
    )
    if b * h * lq == 0 or lkv == 0:
        return query.new_zeros(query.shape), key.new_zeros(key.shape), value.new_zeros(value.shape)
    grad_out = grad_out.to(query.dtype)
    lse = lse.to(torch.float32).contiguous()
    dq = query.new_empty(query.shape)
    dk = key.new_empty(key.shape)
    dv = value.new_empty(value.shape)
    delta = query.new_empty((b, h, lq), dtype=torch.float32)

    def grid_pre(meta):
        return (triton.cdiv(lq, _PREPROCESS_BLOCK) * b * h,)

    wrap_triton(attn_bwd_preprocess)[grid_pre](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, lq, ev,
        BLOCK_M=_PREPROCESS_BLOCK, BLOCK_DV=consts["BLOCK_DV"],
    )  # fmt: skip

    def grid_kv(meta):
        return (triton.cdiv(lkv, meta["BLOCK_N"]) * b * hkv,)

    wrap_triton(attn_bwd_dkdv)[grid_kv](
        query, key, value, m, grad_out, lse, delta, dk, dv,
        *query.stride(), *key.stride(), *value.stride(), *m_strides, *grad_out.stride(),
        *dk.stride(), *dv.stride(),
        h, hkv, h // hkv, lq, lkv, e, ev, scale, scale * K.LOG2E, *keys,
        **consts,
    )  # fmt: skip

    def grid_q(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]) * b * h,)

    wrap_triton(attn_bwd_dq)[grid_q](
        query, key, value, m, grad_out, lse, delta, dq,
        *query.stride(), *key.stride(), *value.stride(), *m_strides, *grad_out.stride(),
        *dq.stride(),
        h, h // hkv, lq, lkv, e, ev, scale, scale * K.LOG2E, *keys,
        **consts,
    )  # fmt: skip
    return dq, dk, dv


@_define("aigc_ext::triton_attention_forward", mutates_args=())
def triton_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward: ``(out, lse)``; see the module docstring for the contract."""
    return _forward(query, key, value, attn_mask, is_causal, scale)


@_define("aigc_ext::triton_attention_backward", mutates_args=())
def triton_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward: ``(grad_q, grad_k, grad_v)`` from the saved out and lse."""
    return _backward(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale)


if K.INTERPRET:
    # triton_op derives its fake kernel from the function itself; custom_op needs one.

    @triton_attention_forward.register_fake
    def _forward_fake(query, key, value, attn_mask, is_causal, scale):
        _check(query, key, value, attn_mask, scale)
        b, h, lq, _ = query.shape
        out = query.new_empty((b, h, lq, value.shape[3]))
        return out, query.new_empty((b, h, lq), dtype=torch.float32)

    @triton_attention_backward.register_fake
    def _backward_fake(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale):
        _check_backward(grad_out, query, key, value, out, lse, attn_mask, scale)
        return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


register_attention_autograd(triton_attention_forward, "triton_attention_backward")


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calls the forward operator on 4-D tensors: ``(out, lse)``, differentiable in ``out``."""
    return torch.ops.aigc_ext.triton_attention_forward(
        query, key, value, attn_mask, bool(is_causal), float(scale)
    )
