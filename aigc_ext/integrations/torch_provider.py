"""aigc_ext as a flash-attention provider of torch's dispatcher: ``activate_flash_attention_impl``.

::

    import aigc_ext  # registers the implementation "aigc_ext" with torch (does not activate it)
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    activate_flash_attention_impl("aigc_ext")  # or AIGC_EXT_ACTIVATE_PROVIDER=1 at import
    out = model(x)                             # torch's flash kernels now run ours
    restore_flash_attention_impl()             # torch's own kernels again

torch 2.13 lets a library replace the kernels behind its flash SDPA operators (its own FA3 and
FA4 providers work this way): the provider registers a function with
``torch.nn.attention.register_flash_attention_impl``; activating it overrides the operators'
kernels for a dispatch key with ``torch.library.Library("aten", "IMPL")``; restoring drops the
override. Because the override sits in the dispatcher, *every* caller of those operators is
served: ``F.scaled_dot_product_attention`` however it was bound, ``nn.MultiheadAttention``,
TorchScript, ``torch.compile``-d graphs, transformers' ``sdpa`` attention, C++ callers.

Overridden while active:

* CPU: ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``, served by
  ``torch.ops.aigc_ext.attention_forward``/``attention_backward`` (the ``cpu`` backend's
  kernel); and ``aten::_native_multi_head_attention``, the eval-mode fast path of
  ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``, which computes its attention
  without calling the flash operator, so it is served here by the same kernel.
* CUDA: ``aten::_scaled_dot_product_flash_attention`` and its ``_backward``, served by the
  Triton operators (the ``triton`` backend). Torch's own dispatch chooses the flash operator only
  for float16/bfloat16 calls without a mask; the calls it sends to its other kernels (memory
  efficient, cuDNN, math) are not affected.

Calls our kernels cannot serve run torch's original kernel, captured with
``torch.library.get_kernel`` before the override: ``dropout_p > 0``, ``return_debug_mask``, a
dtype or a layout outside our contract, ``need_weights=True`` for multi-head attention, a
non-square causal call on CUDA (torch's kernel aligns it differently), arguments torch's kernel
rejects (which it then rejects with its own error). :func:`usage` counts who served each call.
Shapes torch's CPU flash kernel does not check and would read out of bounds with (key and value
batch, head or length mismatch, query heads not a multiple of key/value heads) raise a
``ValueError`` instead.

Outputs match the operators' contracts exactly, as torch's meta kernels describe them (what
``torch.compile`` plans with): the CPU output laid out like the query, ``logsumexp``
``(B, H, L)`` in float32 (float64 for float64 inputs) over a ``(B, L, H)`` buffer, gradients in
``(B, L, H, E)`` memory order; a row with no visible key has output 0 and logsumexp 0, as in
torch, so torch's backward can consume our forward's results and ours torch's.
:func:`aigc_ext.use_backend` does not apply: the provider always serves CPU tensors with the
``cpu`` kernel and CUDA tensors with the Triton kernels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ENV_ACTIVATE",
    "IMPL_NAME",
    "activate",
    "activate_from_env",
    "activated",
    "is_active",
    "register",
    "restore",
    "triton_flash_backward",
    "triton_flash_forward",
    "usage",
]

IMPL_NAME = "aigc_ext"
ENV_ACTIVATE = "AIGC_EXT_ACTIVATE_PROVIDER"  # "1" activates the provider at `import aigc_ext`

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_originals: dict[str, Any] = {}  # torch's kernel of each overridden operator (SafeKernelFunction)
_handle: _Handle | None = None  # the live override, if any
_usage: Counter[tuple[str, str]] = Counter()
_logged: set[str] = set()

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)  # what torch's flash operator takes on CUDA
_MAX_HEAD_DIM_CUDA = 256


class _Handle:
    """What the registered function returns to torch: ``remove()`` drops the override."""

    def __init__(self, lib: torch.library.Library) -> None:
        self._lib: torch.library.Library | None = lib

    def remove(self) -> None:
        global _handle
        with _lock:
            if self._lib is not None:
                self._lib._destroy()  # deregisters now, not whenever the object is collected
                self._lib = None
            if _handle is self:
                _handle = None
            # _originals stays: a call still running on another thread may need torch's kernel.


def _served(op: str, by: str) -> None:
    with _lock:
        _usage[(op, by)] += 1


def _fallback(op: str, reason: str, keyset: Any, args: tuple, kwargs: dict) -> Any:
    """Runs torch's kernel, unchanged arguments, for a call ours does not serve; counts and
    logs (once per reason, at debug level) why."""
    _served(op, f"torch: {reason}")
    if reason not in _logged:
        _logged.add(reason)
        _log.debug("aigc_ext provider: %s runs torch's kernel (%s)", op, reason)
    return _originals[op].call_boxed(keyset, *args, **kwargs)


def usage(reset: bool = False) -> dict[str, dict[str, int]]:
    """Per overridden operator (e.g. ``"_scaled_dot_product_flash_attention_for_cpu"``), how
    many calls our kernel served (``"aigc_ext"``) and how many torch's, by reason
    (``"torch: dropout_p > 0"``), since the process started or the last ``reset``."""
    with _lock:
        counts = dict(_usage)
        if reset:
            _usage.clear()
    out: dict[str, dict[str, int]] = {}
    for (op, by), n in sorted(counts.items()):
        out.setdefault(op, {})[by] = n
    return out


# --- checks shared by the CPU operators --------------------------------------------------------


def _shapes(**tensors: torch.Tensor | None) -> str:
    return ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items() if t is not None)


def _check_qkv_shapes(op: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Raises for 4-D shapes torch's CPU flash kernel accepts but reads out of bounds with."""
    b, hq = query.shape[:2]
    bad = None
    if key.shape[0] != b or value.shape[0] != b:
        bad = "query, key and value batch sizes differ"
    elif key.shape[1] != value.shape[1]:
        bad = "key and value head counts differ"
    elif key.shape[2] != value.shape[2]:
        bad = "key and value sequence lengths differ"
    elif (key.shape[1] == 0 and hq != 0) or (key.shape[1] != 0 and hq % key.shape[1] != 0):
        bad = "query heads must be a multiple of key/value heads"
    if bad is not None:
        raise ValueError(
            f"aten::{op}: {bad}; expected query (B, Hq, L, E), key (B, Hkv, S, E), value "
            f"(B, Hkv, S, E) with Hq % Hkv == 0; got {_shapes(query=query, key=key, value=value)}"
        )


@functools.cache
def _cpu_kernel_missing() -> str | None:
    """Why the compiled CPU operators cannot run here, or None (fixed for the process)."""
    try:
        from aigc_ext import ops  # noqa: F401
    except (ImportError, OSError) as exc:  # pragma: no cover - broken builds only
        return f"the compiled extension aigc_ext._C failed to load: {exc}"
    return None


def _cpu_flash_reason(
    op: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout_p: float,
    attn_mask: torch.Tensor | None,
) -> str | None:
    """None when our CPU kernel serves the flash call, else why torch's kernel must."""
    if dropout_p != 0.0:
        return "dropout_p > 0"
    tensors = [query, key, value] + ([attn_mask] if attn_mask is not None else [])
    if any(t.device.type != "cpu" for t in tensors):
        return "a tensor is not on the CPU"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "query, key and value are not all 4-D"
    dtype = query.dtype
    if dtype not in _CPU_DTYPES or key.dtype != dtype or value.dtype != dtype:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype}"
    if query.shape[3] == 0 or key.shape[3] != query.shape[3] or value.shape[3] != query.shape[3]:
        return "head dims differ or are 0"
    if attn_mask is not None:
        if attn_mask.dtype not in (dtype, torch.float32):
            return f"attn_mask dtype {attn_mask.dtype}"
        target = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        shape = tuple(attn_mask.shape)
        if len(shape) not in (2, 4) or any(
            m not in (1, t) for m, t in zip(shape, target[-len(shape) :], strict=True)
        ):
            return f"attn_mask of shape {shape}"
    _check_qkv_shapes(op, query, key, value)
    return _cpu_kernel_missing()


def _scale(scale: float | None, head_dim: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def _torch_lse(lse: torch.Tensor) -> torch.Tensor:
    """Our logsumexp in torch's CPU convention: 0 (not -inf) for a row with no visible key, in a
    ``(B, L, H)`` buffer viewed as ``(B, H, L)``."""
    b, h, length = lse.shape
    out = torch.empty((b, length, h), dtype=lse.dtype).transpose(1, 2)
    return out.copy_(lse.masked_fill(lse == float("-inf"), 0.0))


def _laid_out_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides ``torch.empty_like(like)`` would have (a copy only if needed)."""
    if like.is_contiguous() and t.is_contiguous():
        return t
    out = torch.empty_like(like)
    return t if out.stride() == t.stride() else out.copy_(t)


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, N, D) in (B, N, H, D) memory order, as torch's CPU flash backward returns."""
    out = torch.empty_permuted(t.shape, (0, 2, 1, 3), dtype=t.dtype, device=t.device)
    return t if out.stride() == t.stride() else out.copy_(t)


# --- CPU: aten::_scaled_dot_product_flash_attention_for_cpu (+ backward) ----------------------

_CPU_FWD = "_scaled_dot_product_flash_attention_for_cpu"
_CPU_BWD = "_scaled_dot_product_flash_attention_for_cpu_backward"


def _cpu_fwd_args(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """The operator's schema, defaults included (the dispatcher omits arguments at default)."""
    return query, key, value, dropout_p, is_causal, attn_mask, scale


def _cpu_bwd_args(
    grad_out, query, key, value, out, lse, dropout_p, is_causal, *, attn_mask=None, scale=None
):
    return grad_out, query, key, value, out, lse, dropout_p, is_causal, attn_mask, scale


def _cpu_forward(keyset, *args, **kwargs):
    query, key, value, dropout_p, is_causal, attn_mask, scale = _cpu_fwd_args(*args, **kwargs)
    reason = _cpu_flash_reason(_CPU_FWD, query, key, value, dropout_p, attn_mask)
    if reason is not None:
        return _fallback(_CPU_FWD, reason, keyset, args, kwargs)
    _served(_CPU_FWD, IMPL_NAME)
    out, lse = torch.ops.aigc_ext.attention_forward(
        query, key, value, attn_mask, bool(is_causal), _scale(scale, query.shape[3])
    )
    return _laid_out_like(out, query), _torch_lse(lse)


def _cpu_backward(keyset, *args, **kwargs):
    grad_out, query, key, value, out, lse, dropout_p, is_causal, attn_mask, scale = _cpu_bwd_args(
        *args, **kwargs
    )
    reason = _cpu_flash_reason(_CPU_BWD, query, key, value, dropout_p, attn_mask)
    if reason is None:
        expected = (*query.shape[:3], value.shape[3])
        lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        if tuple(grad_out.shape) != expected or tuple(out.shape) != expected:
            reason = f"grad_out {tuple(grad_out.shape)}, out {tuple(out.shape)}"
        elif grad_out.dtype != query.dtype or out.dtype != query.dtype:
            reason = f"grad_out {grad_out.dtype}, out {out.dtype}"
        elif tuple(lse.shape) != expected[:3] or lse.dtype != lse_dtype:
            reason = f"logsumexp {lse.dtype} {tuple(lse.shape)}"
    if reason is not None:
        return _fallback(_CPU_BWD, reason, keyset, args, kwargs)
    _served(_CPU_BWD, IMPL_NAME)
    scale = _scale(scale, query.shape[3])
    grads = torch.ops.aigc_ext.attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, bool(is_causal), scale
    )
    return tuple(_bshd(g) for g in grads)


# --- CPU: aten::_native_multi_head_attention (eval fast path of MHA and encoder layers) --------

_CPU_MHA = "_native_multi_head_attention"


def _mha_args(
    query,
    key,
    value,
    embed_dim,
    num_head,
    qkv_weight,
    qkv_bias,
    proj_weight,
    proj_bias,
    mask=None,
    need_weights=True,
    average_attn_weights=True,
    mask_type=None,
):
    weights = (qkv_weight, qkv_bias, proj_weight, proj_bias)
    return query, key, value, embed_dim, num_head, weights, mask, need_weights, mask_type


def _mha_keep_mask(
    mask: torch.Tensor | None, mask_type: int | None, b: int, h: int, length: int
) -> tuple[torch.Tensor | None, str | None]:
    """The op's mask (True or nonzero = hidden, as torch's kernel reads it) as a bool mask of the
    keys that take part, broadcastable to (B, H, L, L); or None and why we do not take it."""
    if mask is None:
        return None, None
    if mask.device.type != "cpu" or not (mask.dtype == torch.bool or mask.is_floating_point()):
        return None, f"mask {mask.dtype} on {mask.device}"
    shape = tuple(mask.shape)
    if mask.dim() == 2 and mask_type == 0 and shape == (length, length):
        keep = mask.view(1, 1, length, length)
    elif mask.dim() == 2 and mask_type == 1 and shape == (b, length):
        keep = mask.view(b, 1, 1, length)
    elif mask.dim() == 4 and shape == (b, h, length, length):
        keep = mask
    else:
        return None, f"mask of shape {shape} with mask_type {mask_type}"
    return keep.logical_not(), None  # a floating mask hides every nonzero entry, as in torch


def _mha_reason(query, key, value, embed_dim, num_head, weights, need_weights) -> str | None:
    """None when our kernel serves the multi-head attention call, else why torch's must."""
    if need_weights:
        return "need_weights=True (the fused kernel does not materialise the weights)"
    tensors = (query, key, value, *weights)
    if any(t.device.type != "cpu" or t.layout != torch.strided for t in tensors):
        return "a tensor is not a strided CPU tensor"
    dtype = query.dtype
    if dtype not in _CPU_DTYPES or any(t.dtype != dtype for t in tensors):
        return "dtypes differ or are not supported"
    if query.dim() != 3 or key.shape != query.shape or value.shape != query.shape:
        return f"shapes {_shapes(query=query, key=key, value=value)}"
    d = embed_dim
    if num_head <= 0 or d <= 0 or query.shape[2] != d or d % num_head != 0:
        return f"embed_dim {embed_dim}, num_head {num_head}, query {tuple(query.shape)}"
    expected = ((3 * d, d), (3 * d,), (d, d), (d,))
    if tuple(tuple(w.shape) for w in weights) != expected:
        return "weight shapes"
    if query.shape[0] * query.shape[1] == 0:
        return "empty input"
    return _cpu_kernel_missing()


def _cpu_mha(keyset, *args, **kwargs):
    query, key, value, d, heads, weights, mask, need_weights, mask_type = _mha_args(*args, **kwargs)
    reason = _mha_reason(query, key, value, d, heads, weights, need_weights)
    if reason is None:
        b, length = query.shape[:2]
        keep, reason = _mha_keep_mask(mask, mask_type, b, heads, length)
    if reason is not None:
        return _fallback(_CPU_MHA, reason, keyset, args, kwargs)
    _served(_CPU_MHA, IMPL_NAME)
    qkv_weight, qkv_bias, proj_weight, proj_bias = weights
    if query is key and key is value:  # self-attention: one projection, as torch's kernel
        q, k, v = F.linear(query, qkv_weight, qkv_bias).chunk(3, dim=-1)
    else:
        w, bias = qkv_weight.chunk(3), qkv_bias.chunk(3)
        q, k, v = (F.linear(x, w[i], bias[i]) for i, x in enumerate((query, key, value)))
    dh = d // heads
    q, k, v = (t.unflatten(-1, (heads, dh)).transpose(1, 2) for t in (q, k, v))
    out, _ = torch.ops.aigc_ext.attention_forward(q, k, v, keep, False, 1.0 / math.sqrt(dh))
    ctx = out.transpose(1, 2).reshape(b, length, d)
    return F.linear(ctx, proj_weight, proj_bias), None  # no weights, as torch's kernel


# --- CUDA: aten::_scaled_dot_product_flash_attention (+ backward), Triton kernels -------------

_CUDA_FWD = "_scaled_dot_product_flash_attention"
_CUDA_BWD = "_scaled_dot_product_flash_attention_backward"


def _cuda_fwd_args(
    query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None
):
    return query, key, value, dropout_p, is_causal, return_debug_mask, scale


def _cuda_bwd_args(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    cum_seq_q,
    cum_seq_k,
    max_q,
    max_k,
    dropout_p,
    is_causal,
    philox_seed,
    philox_offset,
    *,
    scale=None,
):
    varlen = cum_seq_q is not None or cum_seq_k is not None
    return grad_out, query, key, value, out, lse, varlen, dropout_p, is_causal, scale


@functools.cache
def _triton_missing() -> str | None:
    """Why the Triton kernels cannot run here, or None (fixed for the process)."""
    from aigc_ext.triton import backend

    return backend.unavailable_reason()


def _cuda_flash_reason(query, key, value, dropout_p, is_causal) -> str | None:
    """None when the Triton kernels serve the CUDA flash call, else why torch's kernel must."""
    if dropout_p != 0.0:
        return "dropout_p > 0"
    tensors = (query, key, value)
    if any(t.device.type != "cuda" or t.device != query.device for t in tensors):
        return "tensors are not all on one CUDA device"
    if any(t.dim() != 4 for t in tensors):
        return "query, key and value are not all 4-D"
    if query.dtype not in _CUDA_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype}"
    (b, hq, length, e), (bk, hkv, s, ek) = query.shape, key.shape
    if tuple(value.shape) != (bk, hkv, s, ek) or bk != b or ek != e:
        return f"shapes {_shapes(query=query, key=key, value=value)}"
    if hkv == 0 or hq % hkv != 0:
        return "query heads are not a multiple of key/value heads"
    if min(b, hq, length, s, e) == 0 or e > _MAX_HEAD_DIM_CUDA:
        return f"an empty dim or a head dim above {_MAX_HEAD_DIM_CUDA}"
    if is_causal and length != s:
        return "is_causal with different query and key lengths (torch aligns it bottom-right)"
    return _triton_missing()


def triton_flash_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    is_causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton forward in the layout of torch's CUDA flash operator: output laid out like the
    query, logsumexp float32 ``(B, H, L)`` contiguous. Takes checked arguments only."""
    from aigc_ext.triton import ops

    scale = _scale(scale, query.shape[3])
    out, lse = ops.attention_with_lse(query, key, value, None, is_causal, scale)
    return _laid_out_like(out, query), lse.contiguous()


def triton_flash_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton backward with each gradient laid out like its input, as torch's CUDA flash
    backward returns them. Takes checked arguments only."""
    from aigc_ext.triton import ops  # noqa: F401  (registers the operators)

    scale = _scale(scale, query.shape[3])
    grads = torch.ops.aigc_ext.triton_attention_backward(
        grad_out, query, key, value, out, lse, None, bool(is_causal), scale
    )
    return tuple(_laid_out_like(g, x) for g, x in zip(grads, (query, key, value), strict=True))


def _cuda_forward(keyset, *args, **kwargs):
    query, key, value, dropout_p, is_causal, debug, scale = _cuda_fwd_args(*args, **kwargs)
    reason = "return_debug_mask=True" if debug else None
    reason = reason or _cuda_flash_reason(query, key, value, dropout_p, is_causal)
    if reason is not None:
        return _fallback(_CUDA_FWD, reason, keyset, args, kwargs)
    _served(_CUDA_FWD, IMPL_NAME)
    out, lse = triton_flash_forward(query, key, value, bool(is_causal), scale)
    # The seed, offset and debug mask as torch's meta kernel describes them (no dropout here).
    device, seed_dtype = query.device, torch.long if torch.version.hip else torch.uint64
    seed = torch.zeros(() if torch.version.hip else (2,), dtype=seed_dtype, device=device)
    offset = torch.zeros((), dtype=seed_dtype, device=device)
    debug_mask = torch.empty(0, dtype=query.dtype, device=device)
    return out, lse, None, None, query.shape[2], key.shape[2], seed, offset, debug_mask


def _cuda_backward(keyset, *args, **kwargs):
    grad_out, query, key, value, out, lse, varlen, dropout_p, is_causal, scale = _cuda_bwd_args(
        *args, **kwargs
    )
    reason = _cuda_flash_reason(query, key, value, dropout_p, is_causal)
    if reason is None:
        if varlen:
            reason = "variable-length (cum_seq) inputs"
        elif grad_out.shape != query.shape or out.shape != query.shape:
            reason = f"grad_out {tuple(grad_out.shape)}, out {tuple(out.shape)}"
        elif grad_out.dtype != query.dtype or out.dtype != query.dtype:
            reason = f"grad_out {grad_out.dtype}, out {out.dtype}"
        elif tuple(lse.shape) != tuple(query.shape[:3]) or lse.dtype != torch.float32:
            reason = f"logsumexp {lse.dtype} {tuple(lse.shape)}"
    if reason is not None:
        return _fallback(_CUDA_BWD, reason, keyset, args, kwargs)
    _served(_CUDA_BWD, IMPL_NAME)
    return triton_flash_backward(grad_out, query, key, value, out, lse, is_causal, scale)


# --- registration with torch --------------------------------------------------------------------


def _overrides() -> list[tuple[str, str, Callable[..., Any]]]:
    """(operator, dispatch key, our kernel) for this process: CUDA only where CUDA is."""
    ops = [(_CPU_FWD, "CPU", _cpu_forward), (_CPU_BWD, "CPU", _cpu_backward)]
    ops.append((_CPU_MHA, "CPU", _cpu_mha))
    if torch.cuda.is_available():
        ops += [(_CUDA_FWD, "CUDA", _cuda_forward), (_CUDA_BWD, "CUDA", _cuda_backward)]
    return ops


def _install() -> _Handle:
    """The function registered with torch: overrides the kernels and returns the handle that
    ``restore_flash_attention_impl`` removes. Torch restores any other provider first."""
    global _handle
    if not hasattr(torch.library, "get_kernel"):
        raise RuntimeError(
            "aigc_ext provider: this torch has no torch.library.get_kernel, which the provider "
            f"needs to keep torch's kernels for the calls it does not serve (torch {torch.__version__})"
        )
    if _handle is not None:  # activated outside torch's registry: never capture our own kernels
        _handle.remove()
    from aigc_ext.dispatch import backends

    backends()  # loads the backends (and the compiled operators) now, not inside a kernel
    with _lock:
        lib = torch.library.Library("aten", "IMPL")
        try:
            for name, key, fn in _overrides():
                _originals[name] = torch.library.get_kernel(f"aten::{name}", key)
                with warnings.catch_warnings():  # "Overriding a previously registered kernel"
                    warnings.simplefilter("ignore", UserWarning)
                    lib.impl(name, fn, key, with_keyset=True)
        except Exception:
            lib._destroy()
            _originals.clear()
            raise
        _handle = _Handle(lib)
    return _handle


def register() -> bool:
    """Registers the implementation ``"aigc_ext"`` with torch's flash-attention registry
    without activating it (``import aigc_ext`` does this). Returns False on a torch without the
    registry, where nothing is registered."""
    try:
        from torch.nn.attention import register_flash_attention_impl
    except ImportError:
        return False
    register_flash_attention_impl(IMPL_NAME, register_fn=_install)
    return True


def activate() -> None:
    """``torch.nn.attention.activate_flash_attention_impl("aigc_ext")``: routes torch's flash
    kernels to ours, process-wide (any other activated provider is restored first)."""
    if not register():
        raise RuntimeError(
            f"aigc_ext provider: torch {torch.__version__} has no flash-attention provider "
            "registry (torch.nn.attention.activate_flash_attention_impl); use "
            "aigc_ext.integrations.patch.patch_sdpa instead"
        )
    from torch.nn.attention import activate_flash_attention_impl

    activate_flash_attention_impl(IMPL_NAME)


def is_active() -> bool:
    """Whether our kernels currently serve torch's flash operators."""
    return _handle is not None


def restore() -> None:
    """``torch.nn.attention.restore_flash_attention_impl()`` if ours is the active provider
    (another provider that is active stays); torch's own kernels serve again."""
    if not is_active():
        return
    from torch.nn.attention import current_flash_attention_impl, restore_flash_attention_impl

    if current_flash_attention_impl() == IMPL_NAME:
        restore_flash_attention_impl()
    if _handle is not None:  # installed without torch's registry knowing
        _handle.remove()


@contextlib.contextmanager
def activated() -> Iterator[None]:
    """Activates the provider inside the block and restores torch's kernels on exit (also when
    the block raises). Not nestable with other activations: exit always restores."""
    activate()
    try:
        yield
    finally:
        restore()


def activate_from_env() -> bool:
    """Activates the provider when ``AIGC_EXT_ACTIVATE_PROVIDER`` is set to anything but
    ``""``, ``0``, ``false`` or ``no`` (as the other ``AIGC_EXT_*`` switches); returns whether it
    did. Called by ``import aigc_ext``."""
    if os.environ.get(ENV_ACTIVATE, "").strip().lower() in ("", "0", "false", "no"):
        return False
    activate()
    return True
