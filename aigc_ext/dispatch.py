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

A plugin's backend cannot break calls it does not serve, nor the listing of backends: an
``unavailable_reason`` that raises makes it unavailable (the reason says what was raised), an
``unsupported_reason`` that raises skips it for the call (one warning), and its result is checked
(a Tensor of the call's shape, dtype and device) on its first :data:`CHECKED_CALLS` calls and on
every call that forces it: a wrong result disables it with a warning and the call runs on the
next backend, or, when forced, raises :class:`BackendError`. The built-in backends are
registered the same way but trusted: their functions are called as they are, unchecked.
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

from aigc_ext.utils import warn_once
from aigc_ext.validation import AttentionCall, validate_sdpa_args

__all__ = [
    "CHECKED_CALLS",
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
CHECKED_CALLS = 8  # a plugin backend's first calls whose result is checked (every forced one is)


class BackendError(RuntimeError):
    """A forced backend cannot serve a call, or a backend name is unknown or unavailable."""


@dataclass(frozen=True)
class Backend:
    """A registered backend. ``fn`` is what serves a call: for a plugin's backend, the plugin's
    function behind the result check (the plugin's own function is ``fn.__wrapped__``)."""

    name: str
    fn: SdpaFn
    devices: tuple[str, ...]
    priority: int = 0
    description: str = ""
    unavailable_reason: Availability | None = None
    unsupported_reason: Support | None = None
    source: str = "aigc_ext"
    trusted: bool = False  # built-in: ``fn`` is the function itself, its result unchecked

    def why_unavailable(self) -> str | None:
        """None when available here, else why not; a check that raises makes it unavailable."""
        if self.unavailable_reason is None:
            return None
        try:
            return self.unavailable_reason()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            return (
                f"its unavailable_reason check raised {_describe_exc(exc)} (plugin {self.source})"
            )

    def why_unsupported(self, call: AttentionCall) -> str | None:
        """None when the backend serves ``call``, else why not. A check that raises makes it
        skip the call, with a one-time warning (none when the backend is forced: the
        :class:`BackendError` of the call says it)."""
        if call.device_type not in self.devices:
            return f"runs on {', '.join(self.devices)}, not {call.device_type}"
        if self.unsupported_reason is None:
            return None
        try:
            return self.unsupported_reason(call)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            reason = (
                f"its unsupported_reason check raised {_describe_exc(exc)} (plugin {self.source})"
            )
            if current_backend_override() != self.name:
                warn_once(
                    f"aigc_ext: attention backend {self.name!r}: {reason}; the backend is "
                    "skipped for such calls",
                    key=("unsupported_reason raised", self.name),
                    seen=_warned,
                    stacklevel=5,
                    category=_plugin_warning(),
                )
            return reason


def _describe_exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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
_disabled: dict[str, str] = {}  # backends turned off for this process (a wrong result): why
_lock = threading.Lock()
_warned: set[object] = set()  # messages (or keys) of the one-time warnings shown


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
    """Adds a backend. Registering a name twice is an error naming both sources.

    Its result is checked on its first :data:`CHECKED_CALLS` calls and whenever it is forced
    (see the module docstring)."""
    return _add_backend(
        name,
        fn,
        devices,
        priority=priority,
        description=description,
        unavailable_reason=unavailable_reason,
        unsupported_reason=unsupported_reason,
        source=source,
        trusted=False,
    )


def _add_backend(
    name: str,
    fn: SdpaFn,
    devices: tuple[str, ...] | list[str] = ("cpu",),
    *,
    priority: int = 0,
    description: str = "",
    unavailable_reason: Availability | None = None,
    unsupported_reason: Support | None = None,
    source: str = "aigc_ext",
    trusted: bool = False,
) -> Backend:
    """:func:`register_backend`, for the plugin manager: ``trusted`` for the built-in plugins,
    whose ``fn`` is then called as it is."""
    backend = Backend(
        name=name,
        fn=fn if trusted else _CheckedFn(name, fn, source),
        devices=tuple(devices),
        priority=priority,
        description=description,
        unavailable_reason=unavailable_reason,
        unsupported_reason=unsupported_reason,
        source=source,
        trusted=trusted,
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
        reason = _disabled.get(backend.name) or backend.why_unavailable()
        _unavailable[backend.name] = reason
        return reason


def _disable(name: str, reason: str) -> None:
    """Makes backend ``name`` unavailable for the rest of the process, saying ``reason``."""
    with _lock:
        _disabled[name] = _unavailable[name] = reason


def _unregister_backend(name: str) -> None:
    """Removes a backend (for tests)."""
    with _lock:
        _registry.pop(name, None)
        _disabled.pop(name, None)
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
    warn_once(
        "aigc_ext: no fused kernel serves this attention call ("
        + "; ".join(reasons)
        + "); using the pure-PyTorch reference path",
        seen=_warned,
        stacklevel=4,
    )
    return _registry[REFERENCE]


def _result_problem(out: object, query: torch.Tensor, value: torch.Tensor) -> str | None:
    """What is wrong with ``out`` as the result of attention over ``query`` and ``value``: a
    Tensor of shape ``(*query.shape[:-1], value.shape[-1])``, query's dtype and device."""
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, not a Tensor"
    expected = (*query.shape[:-1], value.shape[-1])
    if tuple(out.shape) != expected:
        return (
            f"returned shape {tuple(out.shape)}, expected {expected} (query "
            f"{tuple(query.shape)}, value {tuple(value.shape)})"
        )
    if out.dtype != query.dtype:
        return f"returned dtype {out.dtype}, expected the query's {query.dtype}"
    if out.device != query.device:
        return f"returned a tensor on {out.device}, expected the query's device {query.device}"
    return None


class _CheckedFn:
    """A plugin backend's function, its result checked on the first :data:`CHECKED_CALLS`
    calls and on every call that forces the backend.

    A wrong result disables the backend (with a warning) and the call is made again on the
    backend chosen without it; when the backend is forced, :class:`BackendError` is raised."""

    def __init__(self, name: str, fn: SdpaFn, source: str) -> None:
        self.name = name
        self.source = source
        self.__wrapped__ = fn
        self.checks_left = CHECKED_CALLS

    def __repr__(self) -> str:
        return f"<checked {self.__wrapped__!r}>"

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        out = self.__wrapped__(*args)
        if torch.compiler.is_compiling():
            return out
        forced = current_backend_override() == self.name
        if self.checks_left <= 0 and not forced:
            return out
        self.checks_left -= 1
        problem = _result_problem(out, query, value)
        if problem is None:
            return out
        where = f"attention backend {self.name!r} (plugin {self.source})"
        if forced:
            raise BackendError(f"{where} {problem}")
        _disable(self.name, f"disabled: it {problem}")
        warnings.warn(
            f"aigc_ext: {where} {problem}; it is disabled for this process and the call runs "
            "on the next backend",
            _plugin_warning(),
            stacklevel=3,
        )
        call = validate_sdpa_args(*args)
        fallback = select_backend(call)
        return fallback.fn(
            query, key, value, attn_mask, call.dropout_p, call.is_causal, call.scale, enable_gqa
        )


def _plugin_warning() -> type[Warning]:
    """The category of warnings about a misbehaving plugin (loaded by then, see
    :func:`_ensure_plugins`)."""
    return _plugins.PluginWarning if _plugins is not None else UserWarning
