"""Per-call backend choice over the registered attention backends.

A backend is declared by a :class:`~aigc_ext.backends.spec.BackendSpec`: the function that
serves a validated :class:`~aigc_ext.validation.AttentionCall`, plus two questions it answers:
is it available on this machine (and if not, why), and can it serve a given call (and if not,
why). The specs live in the ``attention_backends`` :class:`~aigc_ext.registries.Registry`;
built-in backends get there exactly as third-party ones do, through the
``aigc_register_attention_backends`` plugin hook (see :mod:`aigc_ext.plugins`). This module
keeps them ordered by priority (rebuilt when the registry changes, never per call).

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
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from aigc_ext.backends.spec import Availability, BackendSpec, Serve, Support
from aigc_ext.registries import Entry, Registry, registry
from aigc_ext.utils import warn_once
from aigc_ext.validation import AttentionCall

__all__ = [
    "CHECKED_CALLS",
    "Backend",
    "BackendError",
    "BackendInfo",
    "BackendSpec",
    "backend_usage",
    "backends",
    "current_backend_override",
    "get_backend",
    "register_backend",
    "select_backend",
    "use_backend",
]

REFERENCE = "reference"
CHECKED_CALLS = 8  # a plugin backend's first calls whose result is checked (every forced one is)


class BackendError(RuntimeError):
    """A forced backend cannot serve a call, or a backend name is unknown or unavailable."""


@dataclass(frozen=True)
class Backend:
    """A registered backend. ``fn(call)`` is what serves a call: a built-in's ``serve`` itself;
    for a plugin's backend, its ``serve`` behind the result check (the plugin's own function
    is ``fn.__wrapped__``)."""

    name: str
    fn: Serve
    devices: tuple[str, ...]
    priority: int = 0
    description: str = ""
    unavailable_reason: Availability | None = None
    unsupported_reason: Support | None = None
    source: str = "aigc_ext"
    trusted: bool = False  # built-in: ``fn`` is the backend's function itself, unchecked

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
                    stacklevel=6,  # the caller of the API (via _select_backend, select_backend, serve)
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


_registry: Registry = registry("attention_backends")  # name -> BackendSpec, with the source
_backends: dict[str, tuple[Entry, Backend]] = {}  # the Backend made from each registry entry
_by_priority: list[Backend] = []  # the registered backends, highest priority first
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
    spec: BackendSpec | str,
    *args: object,
    source: str = "aigc_ext",
    **kwargs: object,
) -> Backend:
    """Adds a backend: ``register_backend(spec)`` with a :class:`BackendSpec`, or
    ``register_backend(name, fn, devices=("cpu",), *, priority=0, description="",
    unavailable_reason=None, unsupported_reason=None)`` with ``fn`` a function of the
    ``scaled_dot_product_attention`` signature. Registering a name twice is an error naming
    both sources.

    Its result is checked on its first :data:`CHECKED_CALLS` calls and whenever it is forced
    (see the module docstring)."""
    entry = _registry.add((spec, *args), kwargs, source=source)
    return _backends[entry.name][1]


def _make_backend(entry: Entry) -> Backend:
    """The :class:`Backend` of a registry entry: a built-in's function as it is, a plugin's
    behind the result check."""
    spec: BackendSpec = entry.obj
    trusted = entry.builtin
    return Backend(
        name=spec.name,
        fn=spec.serve if trusted else _CheckedFn(spec.name, spec.serve, entry.source),
        devices=spec.devices,
        priority=spec.priority,
        description=spec.description,
        unavailable_reason=spec.unavailable_reason,
        unsupported_reason=spec.unsupported_reason,
        source=entry.source,
        trusted=trusted,
    )


def _reindex(changed: Registry) -> None:
    """Rebuilds the priority order after the registry changed; a backend whose entry did not
    change keeps its :class:`Backend` (and its result check's state)."""
    with _lock:
        made = {}
        for entry in changed.entries():
            old = _backends.get(entry.name)
            made[entry.name] = (
                old
                if old is not None and old[0] is entry
                else (
                    entry,
                    _make_backend(entry),
                )
            )
        _backends.clear()
        _backends.update(made)
        for name in [n for n in _disabled if n not in made]:
            del _disabled[name]
        _by_priority[:] = sorted((b for _, b in made.values()), key=lambda b: (-b.priority, b.name))
        _unavailable.clear()


_registry.subscribe(_reindex)


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
    _registry.unregister(name)


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
        return _backends[name][1]
    except KeyError:
        raise BackendError(
            f"unknown attention backend {name!r}; registered: {', '.join(sorted(_backends))}"
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
        stacklevel=5,  # the caller of the API (via select_backend, serve)
    )
    return _backends[REFERENCE][1]


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

    def __init__(self, name: str, serve: Serve, source: str) -> None:
        self.name = name
        self.source = source
        self.serve = serve
        self.__wrapped__ = getattr(serve, "__wrapped__", serve)  # the plugin's own function
        self.checks_left = CHECKED_CALLS

    def __repr__(self) -> str:
        return f"<checked {self.__wrapped__!r}>"

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        out = self.serve(call)
        if torch.compiler.is_compiling():
            return out
        forced = current_backend_override() == self.name
        if self.checks_left <= 0 and not forced:
            return out
        self.checks_left -= 1
        problem = _result_problem(out, call.query, call.value)
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
            stacklevel=4,  # the caller of the API (via serve)
        )
        return select_backend(call).fn(call)


def _plugin_warning() -> type[Warning]:
    """The category of warnings about a misbehaving plugin (loaded by then, see
    :func:`_ensure_plugins`)."""
    return _plugins.PluginWarning if _plugins is not None else UserWarning
