"""Argument checks of the FlashAttention operators ``flash_forward`` / ``flash_backward``.

Every backend validates its arguments here before any kernel runs, so that bad input gets a
:class:`FlashArgumentError` naming the argument and its shape or values, never an
out-of-bounds read later. Two kinds of checks:

* **shapes, dtypes, devices and scalar options**, always (they cost no device access and are
  traced by ``torch.compile``; the fake kernels run them too);
* **values** of the integer tensors (``cu_seqlens_*``, ``seqused_k``, ``leftpad_k``,
  ``kv_batch_idx``, ``block_table``) when they can be read cheaply: by default when they are on
  the CPU and real (not fake tensors, not while ``torch.compile`` traces), or when asked with
  ``check_values=True`` (which reads device tensors back to the host).

The layout rules are those of ``docs/flash-contract.md``; :class:`FlashLayout` is what the
checks found (dense, variable-length or paged; batch, heads, head dims; the output shapes).
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import is_fake

from aigc_ext.validation import AttentionArgumentError

__all__ = [
    "FLOAT_DTYPES",
    "MAX_HEAD_DIM",
    "FlashArgumentError",
    "FlashLayout",
    "FlashTypeError",
    "check_flash_backward",
    "check_flash_forward",
    "lse_dtype",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


class FlashArgumentError(AttentionArgumentError):
    """Invalid arguments to a FlashAttention operator or function: a ``ValueError`` (and a
    ``RuntimeError``, like :class:`aigc_ext.validation.AttentionArgumentError`) whose message
    names the argument and its shape or values."""


class FlashTypeError(FlashArgumentError, TypeError):
    """An argument of the wrong type or dtype (also a ``TypeError``)."""


class FlashLayout(NamedTuple):
    """The layout of a valid call, as the checks found it."""

    varlen: bool  # cu_seqlens_q / cu_seqlens_k given: packed (T, H, D) tensors
    paged: bool  # block_table given: k/v are (num_pages, page_size, Hkv, D)
    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...]
    lse_dtype: torch.dtype


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The contract's logsumexp dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _describe(t: torch.Tensor) -> str:
    return f"shape {_shape(t)}, dtype {t.dtype}, device {t.device}"


def _values(t: torch.Tensor, limit: int = 16) -> str:
    """The first ``limit`` values of a (small) integer tensor, for messages."""
    flat = t.reshape(-1)
    shown = flat[:limit].tolist()
    more = f", ... ({flat.numel()} values)" if flat.numel() > limit else ""
    return f"{shown}{more}"


class _Checker:
    """Raises errors prefixed with the operator's name."""

    def __init__(self, op: str) -> None:
        self.op = op

    def fail(self, message: str, cls: type[Exception] = FlashArgumentError) -> None:
        raise cls(f"{self.op}: {message}")

    def tensor(self, name: str, t: object, *, optional: bool = False) -> None:
        if t is None and optional:
            return
        if not isinstance(t, torch.Tensor):
            kind = "a Tensor or None" if optional else "a Tensor"
            self.fail(f"{name} must be {kind}; got {type(t).__name__}", FlashTypeError)

    def int_tensor(self, name, t, dtype, dims: int, device) -> None:
        """An optional integer tensor: its type, dtype, rank and device."""
        self.tensor(name, t, optional=True)
        if t is None:
            return
        if t.dtype != dtype:
            self.fail(f"{name} must be {dtype}; got {t.dtype} (shape {_shape(t)})", FlashTypeError)
        if t.dim() != dims:
            self.fail(f"{name} must be {dims}-D; got shape {_shape(t)}")
        if device is not None and t.device != device:
            self.fail(f"{name} is on {t.device} but q is on {device}")

    def real(self, name: str, value: object, low: float, high: float, *, high_open=True) -> float:
        """A finite real number in ``[low, high)`` (or ``[low, high]``)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            self.fail(f"{name} must be a float; got {type(value).__name__}", FlashTypeError)
        x = float(value)
        above = x >= high if high_open else x > high
        if not math.isfinite(x) or x < low or above:
            bracket = ")" if high_open else "]"
            self.fail(f"{name} must be a finite number in [{low}, {high}{bracket}; got {value}")
        return x

    def integer(self, name: str, value: object, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            self.fail(f"{name} must be an int; got {type(value).__name__}", FlashTypeError)
        if value < low:
            extra = " (-1 means unbounded)" if low == -1 else ""
            self.fail(f"{name} must be >= {low}{extra}; got {value}")
        return int(value)


def _readable(*tensors: torch.Tensor | None) -> bool:
    """Whether the values of these tensors can be read cheaply: real CPU tensors, not while
    ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or is_fake(t)):
            return False
    return True


def _check_qkv(c: _Checker, q, k, v, varlen: bool, paged: bool) -> tuple[int, int, int, int]:
    """q/k/v types, dtypes, devices, ranks and head dims; returns ``(Hq, Hkv, D, Dv)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        c.tensor(name, t)
    if q.dtype not in FLOAT_DTYPES:
        c.fail(f"q must be float16, bfloat16, float32 or float64; got {q.dtype}", FlashTypeError)
    if not (q.dtype == k.dtype == v.dtype):
        c.fail(
            f"q, k and v must have the same dtype; got {q.dtype}, {k.dtype}, {v.dtype}",
            FlashTypeError,
        )
    if not (q.device == k.device == v.device):
        c.fail(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    q_dims = kv_dims = 3 if varlen else 4
    q_form = "(total_q, Hq, D)" if varlen else "(B, Lq, Hq, D)"
    kv_form = "(total_k, Hkv, D)" if varlen else "(B, S, Hkv, D)"
    if paged:
        kv_form = "(num_pages, page_size, Hkv, D)"
    if q.dim() != q_dims:
        c.fail(f"q must be {q_dims}-D {q_form}; got shape {_shape(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != kv_dims:
            c.fail(f"{name} must be {kv_dims}-D {kv_form}; got shape {_shape(t)}")
    if k.shape[:-1] != v.shape[:-1]:
        c.fail(f"k and v must agree in all but the last dim; got k {_shape(k)}, v {_shape(v)}")
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    if k.shape[-1] != head_dim:
        c.fail(f"q and k must have the same head dim; got q {_shape(q)}, k {_shape(k)}")
    for name, dim in (("q", head_dim), ("v", head_dim_v)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            c.fail(f"head dim of {name} must be in [1, {MAX_HEAD_DIM}]; got {dim}")
    if heads_kv < 1 or heads_q % heads_kv:
        c.fail(
            f"the query heads must be a multiple of the key/value heads (MQA/GQA); got q "
            f"{_shape(q)} with {heads_q} heads, k {_shape(k)} with {heads_kv}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            c.fail(
                f"{name} must be contiguous in its last dim; got shape {_shape(t)}, strides "
                f"{tuple(t.stride())}"
            )
    return heads_q, heads_kv, head_dim, head_dim_v


def _check_options(c, scale, causal, window_left, window_right, softcap, dropout_p) -> None:
    c.real("scale", scale, -math.inf, math.inf)
    if not isinstance(causal, bool):
        c.fail(f"causal must be a bool; got {type(causal).__name__}", FlashTypeError)
    c.integer("window_left", window_left, -1)
    c.integer("window_right", window_right, -1)
    c.real("softcap", softcap, 0.0, math.inf)
    c.real("dropout_p", dropout_p, 0.0, 1.0)


def _check_params(c, q, batch, heads_q, alibi_slopes, dropout_p, rng_state, sinks, f64) -> None:
    """ALiBi slopes, sinks and the dropout state."""
    allowed = (
        (torch.float32, torch.float64) if f64 and q.dtype == torch.float64 else (torch.float32,)
    )
    names = " or ".join(str(d) for d in allowed)
    for name, t, shapes in (
        ("alibi_slopes", alibi_slopes, ((heads_q,), (batch, heads_q))),
        ("sinks", sinks, ((heads_q,),)),
    ):
        c.tensor(name, t, optional=True)
        if t is None:
            continue
        if t.dtype not in allowed:
            c.fail(f"{name} must be {names}; got {t.dtype} (shape {_shape(t)})", FlashTypeError)
        if tuple(t.shape) not in shapes:
            want = " or ".join(str(s) for s in shapes)
            c.fail(f"{name} must have shape {want} (heads of q: {heads_q}); got {_shape(t)}")
        if t.device != q.device:
            c.fail(f"{name} is on {t.device} but q is on {q.device}")
    c.tensor("rng_state", rng_state, optional=True)
    if rng_state is not None:
        if rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,):
            c.fail(
                f"rng_state must be an int64 tensor [seed, offset] of shape (2,); got "
                f"{_describe(rng_state)}",
                FlashTypeError if rng_state.dtype != torch.int64 else FlashArgumentError,
            )
        if rng_state.device.type != "cpu" and rng_state.device != q.device:
            c.fail(f"rng_state is on {rng_state.device}; it must be on the CPU or on {q.device}")
    elif dropout_p > 0:
        c.fail(f"dropout_p = {dropout_p} needs rng_state (an int64 tensor [seed, offset])")


def _check_cu_values(c, name, cu, packed: int, packed_name: str, max_seqlen: int):
    """``cu`` starts at 0, does not decrease, ends within the packed rows, and no length
    exceeds ``max_seqlen``; returns the lengths."""
    vals = cu.tolist()
    if vals[0] != 0:
        c.fail(f"{name} must start at 0; got {_values(cu)}")
    lengths = [b - a for a, b in itertools.pairwise(vals)]
    if any(n < 0 for n in lengths):
        c.fail(f"{name} must be non-decreasing; got {_values(cu)}")
    if vals[-1] > packed:
        c.fail(
            f"{name}[-1] = {vals[-1]} is past the end of {packed_name} ({packed} rows); got "
            f"{_values(cu)}"
        )
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        b = lengths.index(longest)
        c.fail(
            f"sequence {b} has length {longest} (from {name} {_values(cu)}), more than "
            f"max_seqlen_{name[-1]} = {max_seqlen}"
        )
    return lengths


class _Ints(NamedTuple):
    """The integer tensors of a call and the lengths they go with."""

    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    seqused_k: torch.Tensor | None
    leftpad_k: torch.Tensor | None
    kv_batch_idx: torch.Tensor | None
    block_table: torch.Tensor | None

    def cache(self) -> list[str]:
        """The KV-cache arguments given."""
        names = ("seqused_k", "leftpad_k", "kv_batch_idx", "block_table")
        return [name for name in names if getattr(self, name) is not None]


def _check_cache_values(c, layout: FlashLayout, k, a: _Ints) -> None:
    """seqused_k within the cache and >= leftpad_k; kv_batch_idx and the pages in use in range.

    The per-batch values are read as Python lists (a batch is small: a few list operations cost
    less than many small tensor operations); the block table is checked with one masked
    comparison, however many pages it has."""
    batch, table = layout.batch, a.block_table
    if layout.paged:
        page_size, num_pages = k.shape[1], k.shape[0]
        capacity = table.shape[1] * page_size
        where = f"the cache (block_table {_shape(table)} x page_size {page_size})"
    else:
        capacity = k.shape[1]
        where = f"the cache (k {_shape(k)}, dim 1)"
    left = a.leftpad_k.tolist() if a.leftpad_k is not None else [0] * batch
    end = a.seqused_k.tolist() if a.seqused_k is not None else [capacity] * batch
    for b in range(batch):
        if left[b] < 0:
            c.fail(f"leftpad_k must be >= 0; got {_values(a.leftpad_k)}")
        if end[b] > capacity:
            c.fail(
                f"seqused_k[{b}] = {end[b]} is larger than {where}: {capacity} positions; "
                f"seqused_k = {_values(a.seqused_k)}"
            )
        if end[b] < left[b]:
            what = "seqused_k" if a.seqused_k is not None else "the cache length"
            c.fail(
                f"{what} of batch {b} ({end[b]}) is smaller than leftpad_k[{b}] = {left[b]}; "
                f"leftpad_k = {_values(a.leftpad_k)}"
            )
    if a.kv_batch_idx is not None:
        rows = k.shape[0]
        if any(not 0 <= r < rows for r in a.kv_batch_idx.tolist()):
            c.fail(
                f"kv_batch_idx must be in [0, {rows}) (k {_shape(k)}, dim 0); got "
                f"{_values(a.kv_batch_idx)}"
            )
    if table is not None:
        first = torch.tensor([x // page_size for x in left]).view(-1, 1)
        last = torch.tensor([-(-x // page_size) for x in end]).view(-1, 1)  # one past the last
        cols = torch.arange(table.shape[1]).view(1, -1)
        outside = (table < 0) | (table >= num_pages)
        bad = outside & (cols >= first) & (cols < last)
        if bool(bad.any()):
            b, col = (int(x) for x in bad.nonzero()[0])
            c.fail(
                f"block_table[{b}, {col}] = {int(table[b, col])} points past the cache: "
                f"pages must be in [0, {num_pages}) (k {_shape(k)}); block_table[{b}] = "
                f"{_values(table[b])}"
            )


def _check_layout(c, q, k, v, a: _Ints) -> FlashLayout:
    """Shapes, dtypes and devices of the tensors that fix the layout (values not read)."""
    if (a.cu_seqlens_q is None) != (a.cu_seqlens_k is None):
        given, missing = ("cu_seqlens_q", "cu_seqlens_k")
        if a.cu_seqlens_q is None:
            given, missing = missing, given
        c.fail(f"{given} is given but {missing} is not: variable-length calls need both")
    varlen = a.cu_seqlens_q is not None
    c.tensor("block_table", a.block_table, optional=True)
    paged = a.block_table is not None
    heads_q, heads_kv, head_dim, head_dim_v = _check_qkv(c, q, k, v, varlen, paged)
    device = q.device
    c.integer("max_seqlen_q", a.max_seqlen_q, 0)
    c.integer("max_seqlen_k", a.max_seqlen_k, 0)
    if varlen:
        for name in ("cu_seqlens_q", "cu_seqlens_k"):
            cu = getattr(a, name)
            c.int_tensor(name, cu, torch.int32, 1, device)
            if cu.numel() < 1:
                c.fail(f"{name} must hold at least one entry (B + 1 values); got {_shape(cu)}")
        if a.cu_seqlens_q.shape != a.cu_seqlens_k.shape:
            c.fail(
                f"cu_seqlens_q and cu_seqlens_k must both be (B + 1,); got "
                f"{_shape(a.cu_seqlens_q)} and {_shape(a.cu_seqlens_k)}"
            )
        batch = a.cu_seqlens_q.shape[0] - 1
    else:
        batch = q.shape[0]
    for name in ("seqused_k", "leftpad_k", "kv_batch_idx"):
        t = getattr(a, name)
        c.int_tensor(name, t, torch.int32, 1, device)
        if t is not None and t.shape[0] != batch:
            c.fail(f"{name} must have shape ({batch},) (one entry per batch row); got {_shape(t)}")
    if varlen and a.cache():
        c.fail(
            f"the KV-cache arguments ({', '.join(a.cache())}) do not combine with cu_seqlens_q "
            "/ cu_seqlens_k: a cache is read with the dense layout of q"
        )
    if paged:
        c.int_tensor("block_table", a.block_table, torch.int32, 2, device)
        if a.block_table.shape[0] != batch:
            c.fail(
                f"block_table must have shape ({batch}, max_pages) (one row per batch row); "
                f"got {_shape(a.block_table)}"
            )
        if k.shape[1] < 1:
            c.fail(f"the page size (dim 1 of k) must be at least 1; got k {_shape(k)}")
        if a.kv_batch_idx is not None:
            c.fail("kv_batch_idx applies to a dense cache only; it cannot go with block_table")
    elif not varlen and k.shape[0] != batch and a.kv_batch_idx is None:
        c.fail(
            f"k and v must have the batch size of q ({batch}) unless kv_batch_idx or "
            f"block_table is given; got q {_shape(q)}, k {_shape(k)}"
        )
    if varlen:
        out_shape, lse_shape = (q.shape[0], heads_q, head_dim_v), (heads_q, q.shape[0])
    else:
        out_shape = (batch, q.shape[1], heads_q, head_dim_v)
        lse_shape = (batch, heads_q, q.shape[1])
    return FlashLayout(
        varlen, paged, batch, heads_q, heads_kv, head_dim, head_dim_v, out_shape, lse_shape,
        lse_dtype(q.dtype),
    )  # fmt: skip


def _check_values(c, layout: FlashLayout, q, k, a: _Ints) -> None:
    if layout.varlen:
        shape_q, shape_k = f"q {_shape(q)}", f"k {_shape(k)}"
        _check_cu_values(c, "cu_seqlens_q", a.cu_seqlens_q, q.shape[0], shape_q, a.max_seqlen_q)
        _check_cu_values(c, "cu_seqlens_k", a.cu_seqlens_k, k.shape[0], shape_k, a.max_seqlen_k)
    elif a.cache():
        _check_cache_values(c, layout, k, a)


def _check_mask(c, attn_mask, layout: FlashLayout, q, k, a: _Ints) -> None:
    """``attn_mask``: dense layout without a cache; bool, float32 or q's dtype; broadcasts to
    ``(B, Hq, Lq, S)``."""
    c.tensor("attn_mask", attn_mask, optional=True)
    if attn_mask is None:
        return
    if layout.varlen or a.cache():
        c.fail(
            "attn_mask combines only with the dense layout (no cu_seqlens, seqused_k, "
            f"leftpad_k, kv_batch_idx or block_table); got attn_mask {_shape(attn_mask)}"
        )
    if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
        c.fail(
            f"attn_mask must be bool, float32 or the dtype of q ({q.dtype}); got {attn_mask.dtype}",
            FlashTypeError,
        )
    if attn_mask.device != q.device:
        c.fail(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    target = (layout.batch, layout.heads_q, q.shape[1], k.shape[1])
    shape = tuple(attn_mask.shape)
    pairs = zip(reversed(shape), reversed(target), strict=False)
    if len(shape) > 4 or not all(m in (1, t) for m, t in pairs):
        c.fail(f"attn_mask {_shape(attn_mask)} does not broadcast to (B, Hq, Lq, S) = {target}")


def check_flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    seqused_k: torch.Tensor | None = None,
    leftpad_k: torch.Tensor | None = None,
    kv_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int = 0,
    attn_mask: torch.Tensor | None = None,
    *,
    check_values: bool | None = None,
    float64_params: bool = False,
    op: str = "flash_forward",
) -> FlashLayout:
    """Validates every argument of ``flash_forward`` (same names and order) and returns the
    call's :class:`FlashLayout`; raises :class:`FlashArgumentError` (a ``ValueError``) or
    :class:`FlashTypeError` naming the argument.

    ``check_values``: read the integer tensors' values too (``None``: when they are real CPU
    tensors and nothing is being traced). ``float64_params`` also accepts float64
    ``alibi_slopes``/``sinks`` with float64 inputs (the reference's gradient checks); ``op``
    prefixes the messages.
    """
    c = _Checker(op)
    a = _Ints(
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, leftpad_k,
        kv_batch_idx, block_table,
    )  # fmt: skip
    layout = _check_layout(c, q, k, v, a)
    _check_options(c, scale, causal, window_left, window_right, softcap, dropout_p)
    batch, heads = layout.batch, layout.heads_q
    _check_params(c, q, batch, heads, alibi_slopes, dropout_p, rng_state, sinks, float64_params)
    c.integer("num_splits", num_splits, 0)
    _check_mask(c, attn_mask, layout, q, k, a)
    ints = (cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, kv_batch_idx, block_table)
    if check_values or (check_values is None and _readable(*ints)):
        _check_values(c, layout, q, k, a)
    return layout


def check_flash_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    scale: float = 1.0,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    *,
    check_values: bool | None = None,
    float64_params: bool = False,
    op: str = "flash_backward",
) -> FlashLayout:
    """Validates every argument of ``flash_backward`` (same names and order): those the forward
    shares, and ``grad_out``/``out`` of the forward's output shape and dtype, ``lse`` of its
    logsumexp shape and dtype. Returns the :class:`FlashLayout` (the KV-cache forms have no
    backward, so it is dense or variable-length)."""
    layout = check_flash_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
        causal=causal, window_left=window_left, window_right=window_right, softcap=softcap,
        alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state,
        attn_mask=attn_mask, check_values=check_values, float64_params=float64_params, op=op,
    )  # fmt: skip
    c = _Checker(op)
    for name, t in (("grad_out", grad_out), ("out", out)):
        c.tensor(name, t)
        if tuple(t.shape) != tuple(layout.out_shape):
            c.fail(f"{name} must have the output's shape {layout.out_shape}; got {_shape(t)}")
        if t.dtype != q.dtype:
            c.fail(f"{name} must have the dtype of q ({q.dtype}); got {t.dtype}", FlashTypeError)
        if t.device != q.device:
            c.fail(f"{name} is on {t.device} but q is on {q.device}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            c.fail(f"{name} must be contiguous in its last dim; got strides {tuple(t.stride())}")
    c.tensor("lse", lse)
    if tuple(lse.shape) != tuple(layout.lse_shape):
        c.fail(f"lse must have shape {tuple(layout.lse_shape)}; got {_shape(lse)}")
    if lse.dtype != layout.lse_dtype:
        c.fail(f"lse must be {layout.lse_dtype}; got {lse.dtype}", FlashTypeError)
    if lse.device != q.device:
        c.fail(f"lse is on {lse.device} but q is on {q.device}")
    return layout
