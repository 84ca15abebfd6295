"""The registry floor: one :class:`Registry` class for every family of named objects.

Attention backends, training strategies (objectives, finetuners, augmentations, transfer
strategies), models, datasets and recipes are each one :class:`Registry`, created here and
listed in :data:`FAMILIES` with the plugin hook that fills it. The plugin manager
(:mod:`aigc_ext.plugins`) walks that table and knows no consumer; consumers look names up in
the registry of their family (:func:`registry` here, which loads nothing, or
:func:`aigc_ext.plugins.get_registry`, which loads the plugins first).

A registry is also a mapping from name to object (``registry[name]``, ``name in registry``,
iteration over the names), so that code which kept a dict of its own reads the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from aigc_ext.backends.spec import BackendSpec, from_registration

__all__ = ["FAMILIES", "Entry", "Family", "Registry", "registry"]

_MISSING = object()


@dataclass(frozen=True)
class Entry:
    """One registered object: its name, the object, who registered it, what it is, and whether
    a built-in plugin registered it (a built-in's objects are trusted)."""

    name: str
    obj: Any
    source: str
    description: str = ""
    builtin: bool = False


def _plain(name: str, obj: Any, *, description: str = "") -> tuple[str, Any, str]:
    """The ``register(name, obj, *, description="")`` form of most families."""
    return name, obj, description


def _backend(*args: Any, **kwargs: Any) -> tuple[str, Any, str]:
    """The ``register`` forms of attention backends (see
    :func:`aigc_ext.backends.spec.from_registration`)."""
    spec = from_registration(*args, **kwargs)
    return spec.name, spec, spec.description


class Registry:
    """The objects of one family, by name; thread-safe.

    ``label`` is the singular used in messages (``"augmentation"``). ``callables``: the objects
    must be callable. ``parse`` turns the arguments of a plugin's ``register(...)`` call into
    ``(name, obj, description)``; by default ``register(name, obj, *, description="")``.
    ``kind``: the objects must be instances of it.
    """

    def __init__(
        self,
        family: str,
        *,
        label: str | None = None,
        callables: bool = True,
        kind: type | None = None,
        parse: Callable[..., tuple[str, Any, str]] = _plain,
    ) -> None:
        self.family = family
        self.label = label or family.rstrip("s").replace("_", " ")
        self._callables = callables
        self._kind = kind
        self._parse = parse
        self._entries: dict[str, Entry] = {}
        self._listeners: list[Callable[[Registry], None]] = []
        self._lock = threading.RLock()

    # --- adding and removing ------------------------------------------------------------------

    def _check(self, name: object, obj: object) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.family}: a name must be a non-empty string, not {name!r}")
        if self._kind is not None and not isinstance(obj, self._kind):
            raise TypeError(
                f"{self.family}: {name!r} must be a {self._kind.__name__}, got {type(obj).__name__}"
            )
        if self._callables and not callable(obj):
            raise TypeError(f"{self.family}: {name!r} must be callable, got {type(obj).__name__}")

    def register(
        self,
        name: str,
        obj: Any,
        *,
        description: str = "",
        source: str = "",
        builtin: bool = False,
    ) -> Entry:
        """Adds ``obj`` as ``name``; a name registered twice is an error naming both sources."""
        self._check(name, obj)
        entry = Entry(name, obj, source, description, builtin)
        with self._lock:
            if name in self._entries:
                raise ValueError(
                    f"{self.label} {name!r} is registered twice: "
                    f"by {self._entries[name].source} and by {source}"
                )
            self._entries[name] = entry
            self._changed()
        return entry

    def add(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        source: str = "",
        builtin: bool = False,
    ) -> Entry:
        """Registers what a ``register(*args, **kwargs)`` call of the family's hook describes
        (its form is the family's, see the hook specifications)."""
        name, obj, description = self._parse(*args, **kwargs)
        return self.register(name, obj, description=description, source=source, builtin=builtin)

    def unregister(self, name: str) -> None:
        """Removes ``name`` if it is registered."""
        with self._lock:
            if self._entries.pop(name, None) is not None:
                self._changed()

    def subscribe(self, listener: Callable[[Registry], None]) -> None:
        """Calls ``listener(registry)`` after every change (and once now), under the lock."""
        with self._lock:
            self._listeners.append(listener)
            listener(self)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener(self)

    # --- lookups ------------------------------------------------------------------------------

    def get(self, name: str, default: Any = _MISSING) -> Any:
        """The object registered as ``name``; without ``default``, ``KeyError`` lists the known
        names."""
        try:
            return self._entries[name].obj
        except KeyError:
            if default is not _MISSING:
                return default
            raise KeyError(
                f"unknown {self.label} {name!r}; "
                f"registered: {', '.join(sorted(self._entries)) or 'none'}"
            ) from None

    def entry(self, name: str) -> Entry:
        """The :class:`Entry` of ``name`` (``KeyError`` as :meth:`get`)."""
        self.get(name)
        return self._entries[name]

    def entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    # --- the mapping interface ----------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __setitem__(self, name: str, obj: Any) -> None:
        """Registers ``obj`` as ``name``, replacing what was there (as a dict assignment does;
        :meth:`register` refuses a second registration instead)."""
        self._check(name, obj)
        with self._lock:
            self._entries[name] = Entry(name, obj, "")
            self._changed()

    def __delitem__(self, name: str) -> None:
        with self._lock:
            self.get(name)
            self.unregister(name)

    def pop(self, name: str, default: Any = _MISSING) -> Any:
        """Removes ``name`` and returns its object (``default`` if it is not registered)."""
        with self._lock:
            obj = self.get(name, default)
            self.unregister(name)
            return obj

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {self.names()})"


class Family(NamedTuple):
    """A row of :data:`FAMILIES`: the registration hook and the registry it fills."""

    hook: str
    registry: Registry


FAMILIES: dict[str, Family] = {
    "attention_backends": Family(
        "aigc_register_attention_backends",
        Registry(
            "attention_backends",
            label="attention backend",
            kind=BackendSpec,
            callables=False,
            parse=_backend,
        ),
    ),
    "objectives": Family("aigc_register_objectives", Registry("objectives")),
    "finetuners": Family("aigc_register_finetuners", Registry("finetuners")),
    "augmentations": Family("aigc_register_augmentations", Registry("augmentations")),
    "transfer_strategies": Family(
        "aigc_register_transfer_strategies",
        Registry("transfer_strategies", label="transfer strategy"),
    ),
    "models": Family("aigc_register_models", Registry("models")),
    "datasets": Family("aigc_register_datasets", Registry("datasets")),
    "recipes": Family("aigc_register_recipes", Registry("recipes", callables=False)),
}


def registry(family: str) -> Registry:
    """The registry of ``family`` (one of :data:`FAMILIES`), without loading any plugin."""
    try:
        return FAMILIES[family].registry
    except KeyError:
        raise KeyError(f"unknown plugin family {family!r}; known: {', '.join(FAMILIES)}") from None
