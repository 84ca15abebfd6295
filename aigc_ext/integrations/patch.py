"""Route ``torch.nn.functional.scaled_dot_product_attention`` to aigc_ext, for any library.

::

    import aigc_ext.integrations.patch as patch

    with patch.patch_sdpa():      # or patch.enable() ... patch.disable()
        out = model(x)            # nn.MultiheadAttention, nn.TransformerEncoderLayer, and any
                                  # code calling F.scaled_dot_product_attention use our kernels

What is patched, and why
------------------------

In torch 2.13, ``torch.nn.functional.scaled_dot_product_attention`` *is* the builtin
``torch._C._nn.scaled_dot_product_attention`` (one object, with a docstring added). Python
callers reach it in two ways, and both read the module attribute
``torch.nn.functional.scaled_dot_product_attention`` at call time:

* user and third-party code writing ``F.scaled_dot_product_attention(...)`` or
  ``torch.nn.functional.scaled_dot_product_attention(...)``;
* ``torch.nn.functional.multi_head_attention_forward`` (used by ``nn.MultiheadAttention`` and so
  by ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``), which calls the global
  name ``scaled_dot_product_attention`` of that module when ``need_weights=False``.

So replacing that one module attribute is what routes them. ``torch._C._nn.scaled_dot_product_attention``
is deliberately **not** replaced: no torch Python code calls it by that name at run time, while
nested tensors compare ``func is torch._C._nn.scaled_dot_product_attention`` in their
``__torch_function__`` and ``torch.compile`` keys its tracing rules on that object; replacing it
would break both and route nothing more.

Two paths never reach Python and cannot be routed by replacing an attribute: the inference
"fast paths" of ``nn.MultiheadAttention`` (``torch._native_multi_head_attention``) and of
``nn.TransformerEncoderLayer`` (``torch._transformer_encoder_layer_fwd``), taken in eval mode
without autograd. While the patch is active, ``torch.backends.mha.set_fastpath_enabled(False)``
turns them off so that those modules take their Python path, which calls the patched function;
the previous setting is restored when the patch is removed. (With the fast path off,
``TransformerEncoderLayer`` also runs its layer norms and feed-forward block op by op instead of
in one fused C++ call.)

Not routed: code that bound the function before the patch, e.g.
``from torch.nn.functional import scaled_dot_product_attention`` at import time, and
TorchScript, which resolves the call when the script is compiled. Both are reached one level
lower, in torch's dispatcher, by the flash-attention provider
(:mod:`aigc_ext.integrations.torch_provider`,
``torch.nn.attention.activate_flash_attention_impl("aigc_ext")``), which keeps the fast paths
on but sees only the calls torch sends to its flash kernel; ``docs/integrations.md`` compares
the two.

Which implementation serves a call
----------------------------------

The replacement has exactly torch's signature (``scale`` and ``enable_gqa`` are keyword-only,
as in torch) and torch's semantics. It calls the fused backend that
:func:`aigc_ext.scaled_dot_product_attention` would choose. It calls torch's own function
instead, unchanged, whenever ours cannot give the same result at least as fast:

* a tensor argument is a tensor subclass (nested tensors, ``DTensor``, ...) or is wrapped by
  ``torch.func`` (``vmap``, ``grad``): torch's function has the rules for those;
* aigc_ext rejects the arguments (an unsupported dtype, shapes it does not broadcast, ...):
  torch then computes the result or raises its own error;
* no fused backend serves the call (``dropout_p > 0``, an ``attn_mask`` that requires grad, a
  device without a fused backend): our only option would be the slow reference path, and
  torch's own function is the better one.

Every such fallback is announced once per process and reason with a :class:`UserWarning`, so a
slow path is never silent. A backend forced with :func:`aigc_ext.use_backend` or
``AIGC_EXT_BACKEND`` is honoured as for :func:`aigc_ext.scaled_dot_product_attention`: it
serves the call or raises :class:`aigc_ext.BackendError`.

Nesting, threads, scope
-----------------------

The patch replaces a module attribute, so it is **process-wide**: while it is active, every
thread's calls are routed, not only the caller's. A depth counter under a lock makes it nest:
:func:`enable` and entering :func:`patch_sdpa` increment it, :func:`disable` and leaving the
block decrement it; the attribute is replaced when the counter leaves 0 and restored when it
returns to 0, so threads and nested blocks may enter and leave in any order as long as their
calls balance. Calling :func:`disable` more often than :func:`enable` is a bug in the caller and
raises :class:`RuntimeError` (the counter is left at 0). A ``with`` block restores the original
even when its body raises.

If other code replaced ``torch.nn.functional.scaled_dot_product_attention`` while the patch was
active, removing the patch leaves that replacement in place (with a warning) rather than
discarding it. Once the patch is removed, a reference to the replacement that someone kept
simply calls torch's function.

torch.compile
-------------

Tracing reads the attribute when it traces: a function compiled while the patch is active
inlines the replacement, and its graph calls the aigc_ext operator (which has a fake kernel,
so ``fullgraph=True`` works); one compiled without the patch calls torch's operator. The graph
is guarded on the function it traced, so calling the compiled function after enabling or
disabling the patch triggers a recompilation rather than running a stale graph.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from aigc_ext.dispatch import (
    Backend,
    backends,
    current_backend_override,
    get_backend,
    select_backend,
)
from aigc_ext.validation import AttentionCall, validate_sdpa_args

__all__ = ["disable", "enable", "is_enabled", "patch_sdpa", "scaled_dot_product_attention"]

# torch's own implementation, whatever the attribute holds later.
_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention

_lock = threading.Lock()
_depth = 0
_saved_sdpa = None  # the attribute's value when the patch was applied
_saved_fastpath = True  # torch.backends.mha.get_fastpath_enabled() at that time
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _is_plain(t: torch.Tensor | None) -> bool:
    """True for a tensor aigc_ext can take as is (or None)."""
    if t is None:
        return True
    cls = type(t)
    if cls is not torch.Tensor and cls is not torch.nn.Parameter:
        if not isinstance(t, torch.Tensor):
            return True  # not a tensor at all: argument checking reports it
        if cls.__torch_function__ is not torch._C._disabled_torch_function_impl:
            return False  # a subclass with its own __torch_function__ (nested tensors, ...)
    if t.is_nested:
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _fused_backend(call: AttentionCall) -> tuple[Backend | None, str]:
    """The fused backend that serves ``call``, else None and why none does."""
    reasons = []
    for info in backends():  # highest priority first
        if info.name == "reference" or call.device_type not in info.devices:
            continue
        if not info.available:
            reasons.append(f"{info.name}: {info.reason}")
            continue
        backend = get_backend(info.name)
        reason = backend.why_unsupported(call)
        if reason is None:
            return backend, ""
        reasons.append(f"{info.name}: {reason}")
    if not reasons:
        reasons.append(f"no fused backend is registered for device {call.device_type!r}")
    return None, "; ".join(reasons)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """What ``torch.nn.functional.scaled_dot_product_attention`` is while the patch is active.

    Same signature and semantics as torch's function; see the module docstring for when it runs
    aigc_ext's fused kernel and when torch's own function.
    """
    if _depth == 0:  # a reference kept after the patch was removed
        return _TORCH_SDPA(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if not torch.compiler.is_compiling() and not (
        _is_plain(query) and _is_plain(key) and _is_plain(value) and _is_plain(attn_mask)
    ):
        _warn_once(
            "subclass",
            "aigc_ext.patch_sdpa: a tensor subclass, nested tensor or torch.func-transformed "
            "tensor was passed to scaled_dot_product_attention; using torch's own function "
            "for such calls",
        )
        return _TORCH_SDPA(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    try:
        call = validate_sdpa_args(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
    except (TypeError, ValueError) as exc:
        _warn_once(
            "arguments",
            f"aigc_ext.patch_sdpa: aigc_ext does not accept a scaled_dot_product_attention call "
            f"({exc}); using torch's own function for calls it does not accept",
        )
        return _TORCH_SDPA(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if current_backend_override() is not None:
        backend = select_backend(call)  # the forced backend, or BackendError
    else:
        backend, reason = _fused_backend(call)
        if backend is None:
            _warn_once(
                reason,
                f"aigc_ext.patch_sdpa: no fused kernel serves this scaled_dot_product_attention "
                f"call ({reason}); using torch's own function",
            )
            return _TORCH_SDPA(
                query,
                key,
                value,
                attn_mask,
                dropout_p,
                is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
    return backend.fn(
        query, key, value, attn_mask, call.dropout_p, call.is_causal, call.scale, call.enable_gqa
    )


def enable() -> None:
    """Applies the patch (process-wide), or deepens it if it is already applied."""
    global _depth, _saved_sdpa, _saved_fastpath
    backends()  # registers the built-in backends now, not inside a traced call
    with _lock:
        if _depth == 0:
            current = F.scaled_dot_product_attention
            _saved_sdpa = _TORCH_SDPA if current is scaled_dot_product_attention else current
            _saved_fastpath = torch.backends.mha.get_fastpath_enabled()
            F.scaled_dot_product_attention = scaled_dot_product_attention
            torch.backends.mha.set_fastpath_enabled(False)
        _depth += 1


def disable() -> None:
    """Undoes one :func:`enable`; the originals come back when every one is undone.

    Raises :class:`RuntimeError` when the patch is not applied (more ``disable`` than
    ``enable`` calls).
    """
    global _depth, _saved_sdpa
    with _lock:
        if _depth == 0:
            raise RuntimeError(
                "aigc_ext.integrations.patch.disable() called while the patch is not applied "
                "(more disable() than enable() calls)"
            )
        _depth -= 1
        if _depth > 0:
            return
        if F.scaled_dot_product_attention is scaled_dot_product_attention:
            F.scaled_dot_product_attention = _saved_sdpa
        else:
            warnings.warn(
                "aigc_ext.patch_sdpa: torch.nn.functional.scaled_dot_product_attention was "
                "replaced by other code while the patch was applied; leaving that replacement "
                "in place",
                stacklevel=2,
            )
        _saved_sdpa = None
        torch.backends.mha.set_fastpath_enabled(_saved_fastpath)


def is_enabled() -> bool:
    """Whether the patch is applied (by any thread)."""
    return _depth > 0


@contextlib.contextmanager
def patch_sdpa() -> Iterator[None]:
    """Routes ``torch.nn.functional.scaled_dot_product_attention`` to aigc_ext inside the block.

    Process-wide (all threads), nestable, and restored on exit even if the block raises; see
    the module docstring. Also usable as a decorator.
    """
    enable()
    try:
        yield
    finally:
        disable()
