"""Argument checks of ``aigc_ext::attention_forward`` / ``attention_backward`` for their fake kernels.

The fake (meta) kernels of :mod:`aigc_ext.backends.cpu.ops` run these before they describe the outputs. They
repeat the checks of the C++ CPU kernel (``csrc/ops.cpp``) one for one: the same order, the same
exception type (``RuntimeError``, which ``TORCH_CHECK`` raises) and the same message text. So
``torch.compile`` and ``torch.export`` reject an invalid call while tracing, as the real call
would fail, and a call with one tensor on the meta device among CPU tensors (which the dispatcher
sends to the fake kernel, since Meta is the highest-priority backend key) raises instead of
returning CPU tensors that nothing wrote.

Unlike the CPU kernel, the fake kernels also accept tensors that are all on the meta device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["check_attention_backward", "check_attention_forward", "lse_dtype"]

FORWARD = "aigc_ext::attention_forward"
BACKWARD = "aigc_ext::attention_backward"

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DEVICE_TYPES = ("cpu", "meta")  # the operator's CPU kernel, and shape propagation on meta
_cuda_kernels: bool | None = None  # whether the library has CUDA kernels (read once, lazily)


def _device_served(device_type: str) -> bool:
    """Whether the operators have a kernel for ``device_type``: CPU and meta always, CUDA in
    builds with ``AIGC_EXT_WITH_CUDA=1`` (so the fake kernels accept CUDA tensors there)."""
    global _cuda_kernels
    if device_type in _DEVICE_TYPES:
        return True
    if device_type != "cuda":
        return False
    if _cuda_kernels is None:
        _cuda_kernels = bool(torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD, "CUDA"))
    return _cuda_kernels


# The names c10 prints for a ScalarType, so that messages read as the C++ kernel's do.
_C10_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.bool: "Bool",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _dtype(dtype: torch.dtype) -> str:
    return _C10_DTYPE_NAMES.get(dtype, str(dtype))


def _dims(shape: Sequence[int]) -> str:
    """A shape as c10 prints one: ``[2, 3, 4, 8]``."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the logsumexp output for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_devices(
    op: str, query: torch.Tensor, named: Sequence[tuple[str, torch.Tensor | None]]
) -> None:
    for name, t in named:
        if t is not None and t.device != query.device:
            raise RuntimeError(
                f"{op}: {name} is on {t.device} but query is on {query.device}; "
                "all tensors must be on one device"
            )
    if not _device_served(query.device.type):
        served = "CPU and CUDA" if _device_served("cuda") else "CPU"
        raise RuntimeError(
            f"{op}: the tensors are on {query.device}; this operator has a kernel for {served} "
            "tensors only"
        )


def _check_qkv(op: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    q, k, v = query.shape, key.shape, value.shape
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise RuntimeError(
                f"{op}: {name} must be 4-D (batch, heads, seq, dim); got shape {_dims(t.shape)}"
            )
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise RuntimeError(
                f"{op}: {name} has dtype {_dtype(t.dtype)} but query has dtype "
                f"{_dtype(query.dtype)}; query, key and value must have the same dtype"
            )
    if query.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(
            f"{op}: unsupported dtype {_dtype(query.dtype)} of query, key and value "
            "(float32, float64, bfloat16, float16 are supported)"
        )
    for name, shape in (("key", k), ("value", v)):
        if shape[0] != q[0]:
            raise RuntimeError(
                f"{op}: batch sizes differ: query has shape {_dims(q)} but {name} has shape "
                f"{_dims(shape)}"
            )
    if k[1] != v[1]:
        raise RuntimeError(
            f"{op}: key and value must have the same number of heads: key has shape {_dims(k)} "
            f"but value has shape {_dims(v)}"
        )
    if not (q[1] % k[1] == 0 if k[1] > 0 else q[1] == 0):
        raise RuntimeError(
            f"{op}: query heads must be a multiple of key/value heads: query has shape "
            f"{_dims(q)} but key has shape {_dims(k)}"
        )
    if k[2] != v[2]:
        raise RuntimeError(
            f"{op}: key and value sequence lengths differ: key has shape {_dims(k)} but value "
            f"has shape {_dims(v)}"
        )
    if q[3] != k[3]:
        raise RuntimeError(
            f"{op}: query and key head dims differ: query has shape {_dims(q)} but key has "
            f"shape {_dims(k)}"
        )


def _check_mask(
    op: str, attn_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
) -> None:
    if attn_mask is None:
        return
    if attn_mask.dtype not in (torch.bool, query.dtype, torch.float32):
        raise RuntimeError(
            f"{op}: attn_mask must be bool, float32 or the query dtype ({_dtype(query.dtype)}); "
            f"got {_dtype(attn_mask.dtype)}"
        )
    target = (*query.shape[:3], key.shape[2])
    shape = attn_mask.shape
    if len(shape) > 4:
        raise RuntimeError(
            f"{op}: attn_mask {_dims(shape)} has more than 4 dims; it must broadcast to "
            f"(B, Hq, L, S) = {_dims(target)}"
        )
    for m, t in zip(reversed(shape), reversed(target), strict=False):
        if m != t and m != 1:
            raise RuntimeError(
                f"{op}: attn_mask {_dims(shape)} does not broadcast to (B, Hq, L, S) = "
                f"{_dims(target)}"
            )


def _check_scale(op: str, scale: float) -> None:
    # A symbolic scale (torch.compile with dynamic floats) is checked by the kernel at run time.
    if isinstance(scale, (int, float)) and not math.isfinite(scale):
        raise RuntimeError(f"{op}: scale must be a finite number; got {float(scale)}")


def check_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
) -> None:
    """Raises ``RuntimeError`` where the CPU kernel of ``attention_forward`` would."""
    _check_devices(FORWARD, query, (("key", key), ("value", value), ("attn_mask", attn_mask)))
    _check_qkv(FORWARD, query, key, value)
    _check_mask(FORWARD, attn_mask, query, key)
    _check_scale(FORWARD, scale)


def check_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
) -> None:
    """Raises ``RuntimeError`` where the CPU kernel of ``attention_backward`` would.

    Beyond the forward's checks: ``grad_out`` and ``out`` must be ``(B, Hq, L, Ev)`` in the query
    dtype, ``lse`` ``(B, Hq, L)`` in :func:`lse_dtype` of it.
    """
    named = (
        ("grad_out", grad_out),
        ("key", key),
        ("value", value),
        ("out", out),
        ("lse", lse),
        ("attn_mask", attn_mask),
    )
    _check_devices(BACKWARD, query, named)
    _check_qkv(BACKWARD, query, key, value)
    _check_mask(BACKWARD, attn_mask, query, key)
    out_shape = (*query.shape[:3], value.shape[3])
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != out_shape:
            raise RuntimeError(
                f"{BACKWARD}: {name} {_dims(t.shape)} must have shape {_dims(out_shape)} "
                "(batch, heads and length of query, head dim of value)"
            )
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.dtype != query.dtype:
            raise RuntimeError(
                f"{BACKWARD}: {name} has dtype {_dtype(t.dtype)}; grad_out and out must have "
                f"the query dtype {_dtype(query.dtype)}"
            )
    want = lse_dtype(query.dtype)
    if tuple(lse.shape) != out_shape[:3] or lse.dtype != want:
        raise RuntimeError(
            f"{BACKWARD}: lse must be {_dtype(want)} of shape {_dims(out_shape[:3])}; got "
            f"{_dtype(lse.dtype)} {_dims(lse.shape)}"
        )
    _check_scale(BACKWARD, scale)
