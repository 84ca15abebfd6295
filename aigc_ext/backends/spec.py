"""What a backend declares: :class:`BackendSpec`, and how a registration call becomes one.

A backend is a name, a priority, the device types it runs on, two questions (is it available
on this machine, can it serve a given call: each answers ``None`` for yes or a sentence saying
why not) and the function that serves a call. That function receives the validated
:class:`~aigc_ext.validation.AttentionCall`, which carries the tensors and the resolved
options (``scale`` is a float, ``dropout_p`` a float), and returns the output tensor.

The older form, a function with the signature of ``scaled_dot_product_attention``
(``fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)``), is still
accepted from ``register(name, fn, devices, ...)``: :func:`from_sdpa` adapts it once, at
registration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from aigc_ext.validation import AttentionCall

__all__ = ["Availability", "BackendSpec", "Serve", "Support", "from_registration", "from_sdpa"]

Serve = Callable[["AttentionCall"], "torch.Tensor"]
Availability = Callable[[], "str | None"]  # None when available here, else the reason
Support = Callable[["AttentionCall"], "str | None"]  # None when the call is served, else why


def _check_callable(what: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not callable(value):
        raise TypeError(f"{what} must be callable{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    """One attention backend, as registered (every argument is checked here, once).

    ``devices`` are device types (``"cpu"``, ``"cuda"``); ``priority`` orders the backends
    that can serve a call (highest first; ``reference`` is the fallback whatever its priority).
    """

    name: str
    serve: Serve
    devices: tuple[str, ...] = ("cpu",)
    priority: int = 0
    description: str = ""
    unavailable_reason: Availability | None = None
    unsupported_reason: Support | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(
                f"attention backend: name must be a non-empty string, got {self.name!r}"
            )
        where = f"attention backend {self.name!r}"
        _check_callable(f"{where}: serve", self.serve)
        devices = (self.devices,) if isinstance(self.devices, str) else self.devices
        try:
            devices = tuple(devices)
        except TypeError:
            raise TypeError(
                f"{where}: devices must be a tuple of device types, got {self.devices!r}"
            ) from None
        if not devices or not all(isinstance(d, str) and d for d in devices):
            raise ValueError(
                f"{where}: devices must be non-empty device type names such as ('cpu',), "
                f"got {self.devices!r}"
            )
        object.__setattr__(self, "devices", devices)
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"{where}: priority must be an int, got {self.priority!r}")
        if not isinstance(self.description, str):
            raise TypeError(f"{where}: description must be a string, got {self.description!r}")
        _check_callable(f"{where}: unavailable_reason", self.unavailable_reason, optional=True)
        _check_callable(f"{where}: unsupported_reason", self.unsupported_reason, optional=True)


def _sdpa_adapter(fn: Callable[..., Any]) -> Serve:
    """``serve(call)`` calling ``fn`` with the eight ``scaled_dot_product_attention`` arguments;
    ``fn`` stays reachable as its ``__wrapped__``."""

    def serve(call: AttentionCall) -> torch.Tensor:
        return fn(
            call.query,
            call.key,
            call.value,
            call.attn_mask,
            call.dropout_p,
            call.is_causal,
            call.scale,
            call.enable_gqa,
        )

    serve.__wrapped__ = fn  # type: ignore[attr-defined]
    serve.__qualname__ = f"from_sdpa({getattr(fn, '__qualname__', type(fn).__name__)})"
    return serve


def from_sdpa(
    name: str,
    fn: Callable[..., Any],
    devices: tuple[str, ...] | list[str] = ("cpu",),
    *,
    priority: int = 0,
    description: str = "",
    unavailable_reason: Availability | None = None,
    unsupported_reason: Support | None = None,
) -> BackendSpec:
    """The spec of a backend given as a function with the ``scaled_dot_product_attention``
    signature (the registration form of earlier versions), adapted once."""
    _check_callable(f"attention backend {name!r}: fn", fn)
    return BackendSpec(
        name=name,
        serve=_sdpa_adapter(fn),
        devices=devices,
        priority=priority,
        description=description,
        unavailable_reason=unavailable_reason,
        unsupported_reason=unsupported_reason,
    )


def from_registration(spec: BackendSpec | str, *args: Any, **kwargs: Any) -> BackendSpec:
    """What ``register(...)`` of the ``aigc_register_attention_backends`` hook (and
    :func:`aigc_ext.register_backend`) received, as a spec: ``register(spec)``, or
    ``register(name, fn, devices=("cpu",), *, priority=0, description="",
    unavailable_reason=None, unsupported_reason=None)`` with an SDPA-signature ``fn``.

    ``trusted`` is ignored: whether a backend is trusted depends on who registers it (the
    built-in plugins), not on what it says.
    """
    kwargs.pop("trusted", None)
    if isinstance(spec, BackendSpec):
        if args or kwargs:
            raise TypeError(
                f"attention backend {spec.name!r}: register(spec) takes no further arguments, "
                f"got {len(args)} positional and {sorted(kwargs)}"
            )
        return spec
    return from_sdpa(spec, *args, **kwargs)
