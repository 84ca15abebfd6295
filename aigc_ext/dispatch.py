"""Backend registry and per-call backend choice.

A backend is a function with the signature of ``scaled_dot_product_attention`` plus two
questions it answers: is it available on this machine (and if not, why), and can it serve a
given call (and if not, why). Built-in backends register here exactly as third-party ones do:
through the ``aigc_register_attention_backends`` plugin hook (see :mod:`aigc_ext.plugins`).

Choice per call:

* forced with ``with use_backend(name):`` or, for a whole process, ``AIGC_EXT_BACKEND=name``:
  that backend serves the call or a :class:`BackendError` says why it cannot;
* otherwise the available backend with the highest priority that supports the call; if only the
  reference can, it serves the call with a one-time warning naming the reason.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from aigc_ext.validation import AttentionCall

__all__ = [
    "Backend",
    "BackendError",
    "BackendInfo",
    "backend_usage",
    "backends",
    "current_backend_override",
    "get_backend",
    "register_backend",
    "select_backend",
    "use_backend",
]

SdpaFn = Callable[..., object]
Availability = Callable[[], "str | None"]  # None when available, else the reason
Support = Callable[[AttentionCall], "str | None"]  # None when the call is served, else the reason

REFERENCE = "reference"


class BackendError(RuntimeError):
    """A forced backend cannot serve a call, or a backend name is unknown or unavailable."""


@dataclass(frozen=True)
class Backend:
    name: str
    fn: SdpaFn
    devices: tuple[str, ...]
    priority: int = 0
    description: str = ""
    unavailable_reason: Availability | None = None
    unsupported_reason: Support | None = None
    source: str = "aigc_ext"

    def why_unavailable(self) -> str | None:
        return self.unavailable_reason() if self.unavailable_reason is not None else None

    def why_unsupported(self, call: AttentionCall) -> str | None:
        if call.device_type not in self.devices:
            return f"runs on {', '.join(self.devices)}, not {call.device_type}"
        return self.unsupported_reason(call) if self.unsupported_reason is not None else None


@dataclass(frozen=True)
class BackendInfo:
    """One row of :func:`backends`."""

    name: str
    available: bool
    reason: str | None
    devices: tuple[str, ...]
    priority: int
    description: str
    source: str


_registry: dict[str, Backend] = {}
_by_priority: list[Backend] = []  # _registry's values, highest priority first
_unavailable: dict[str, str | None] = {}  # cached why_unavailable() per backend
_lock = threading.Lock()
_warned: set[str] = set()


class _Override(threading.local):
    """Per thread: the stack of backend names forced by :func:`use_backend`, innermost last."""

    def __init__(self) -> None:
        self.stack: list[str] = []


_override = _Override()
_plugins: ModuleType | None = None  # aigc_ext.plugins, imported on first use (see _ensure_plugins)


def register_backend(
    name: str,
    fn: SdpaFn,
    devices: tuple[str, ...] | list[str] = ("cpu",),
    *,
    priority: int = 0,
    description: str = "",
    unavailable_reason: Availability | None = None,
    unsupported_reason: Support | None = None,
    source: str = "aigc_ext",
) -> Backend:
    """Adds a backend. Registering a name twice is an error naming both sources."""
    backend = Backend(
        name=name,
        fn=fn,
        devices=tuple(devices),
        priority=priority,
        description=description,
        unavailable_reason=unavailable_reason,
        unsupported_reason=unsupported_reason,
        source=source,
    )
    with _lock:
        if name in _registry:
            raise ValueError(
                f"attention backend {name!r} is registered twice: by {_registry[name].source} "
                f"and by {source}"
            )
        _registry[name] = backend
        _reindex()
    return backend


def _reindex() -> None:
    _by_priority[:] = sorted(_registry.values(), key=lambda b: (-b.priority, b.name))
    _unavailable.clear()


def _why_unavailable(backend: Backend) -> str | None:
    """Availability does not change while the process runs: ask each backend once."""
    try:
        return _unavailable[backend.name]
    except KeyError:
        reason = _unavailable[backend.name] = backend.why_unavailable()
        return reason


def _unregister_backend(name: str) -> None:
    """Removes a backend (for tests)."""
    with _lock:
        _registry.pop(name, None)
        _reindex()


def _ensure_plugins() -> None:
    """Loads the plugins (the built-in backends among them) on first use.

    ``aigc_ext.plugins`` is imported here, not at ``import aigc_ext``; the module is kept so that
    later calls (one per attention call) skip the import statement.
    """
    global _plugins
    if _plugins is None:
        from aigc_ext import plugins

        _plugins = plugins
    _plugins.load()


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``; :class:`BackendError` lists the known ones."""
    _ensure_plugins()
    try:
        return _registry[name]
    except KeyError:
        raise BackendError(
            f"unknown attention backend {name!r}; registered: {', '.join(sorted(_registry))}"
        ) from None


def backends() -> list[BackendInfo]:
    """Every registered backend, with whether it is available here and, if not, why."""
    _ensure_plugins()
    rows = []
    for b in list(_by_priority):
        reason = _why_unavailable(b)
        rows.append(
            BackendInfo(
                name=b.name,
                available=reason is None,
                reason=reason,
                devices=b.devices,
                priority=b.priority,
                description=b.description,
                source=b.source,
            )
        )
    return rows


def current_backend_override() -> str | None:
    """The backend forced by :func:`use_backend` on this thread, else by ``AIGC_EXT_BACKEND``."""
    stack = _override.stack
    if stack:
        return stack[-1]
    return os.environ.get("AIGC_EXT_BACKEND") or None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Forces backend ``name`` for calls made on this thread inside the ``with`` block.

    Raises :class:`BackendError` at entry if the name is unknown or the backend is unavailable
    here, and at a call it cannot serve.
    """
    backend = get_backend(name)
    reason = _why_unavailable(backend)
    if reason is not None:
        raise BackendError(f"attention backend {name!r} is not available: {reason}")
    stack = _override.stack
    stack.append(name)
    try:
        yield backend
    finally:
        stack.pop()


_usage: Counter[str] = Counter()
_usage_lock = threading.Lock()


def backend_usage(reset: bool = False) -> dict[str, int]:
    """How many attention calls each backend was chosen for in this process (since the last
    ``reset``), e.g. ``{"cpu": 120}``: lets a training run or a benchmark report which backend
    actually served it. Calls inside ``torch.compile``-d code are not counted."""
    with _usage_lock:
        counts = dict(_usage)
        if reset:
            _usage.clear()
    return counts


def select_backend(call: AttentionCall) -> Backend:
    """The backend that serves ``call`` (see the module docstring for the rules)."""
    backend = _select_backend(call)
    if not torch.compiler.is_compiling():  # dynamo cannot trace the lock
        with _usage_lock:
            _usage[backend.name] += 1
    return backend


def _select_backend(call: AttentionCall) -> Backend:
    _ensure_plugins()
    forced = current_backend_override()
    if forced is not None:
        backend = get_backend(forced)
        reason = _why_unavailable(backend) or backend.why_unsupported(call)
        if reason is not None:
            raise BackendError(f"attention backend {forced!r} cannot serve this call: {reason}")
        return backend
    reasons = []
    for b in _by_priority:
        if b.name == REFERENCE:
            continue
        reason = _why_unavailable(b) or b.why_unsupported(call)
        if reason is None:
            return b
        if call.device_type in b.devices:
            reasons.append(f"{b.name}: {reason}")
    if not reasons:
        reasons.append(f"no fused backend is registered for device {call.device_type!r}")
    _warn_once(
        "aigc_ext: no fused kernel serves this attention call ("
        + "; ".join(reasons)
        + "); using the pure-PyTorch reference path"
    )
    return _registry[REFERENCE]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=5)
