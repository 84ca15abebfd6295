"""Name -> object registries for the strategy families plugins contribute.

Every family's objects are callables (the protocols are documented on the registration hooks in
:mod:`aigc_ext.hookspecs`). Attention backends have their own registry in
:mod:`aigc_ext.dispatch`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["FAMILIES", "Entry", "Registry"]

# family -> registration hook
FAMILIES = {
    "objectives": "aigc_register_objectives",
    "finetuners": "aigc_register_finetuners",
    "augmentations": "aigc_register_augmentations",
    "transfer_strategies": "aigc_register_transfer_strategies",
}


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    source: str
    description: str = ""


class Registry:
    """The objects of one family, by name."""

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def register(self, name: str, obj: Any, *, description: str = "", source: str = "") -> Entry:
        """Adds ``obj``; a name registered twice is an error naming both sources."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.family}: a name must be a non-empty string, not {name!r}")
        if not callable(obj):
            raise TypeError(f"{self.family}: {name!r} must be callable, got {type(obj).__name__}")
        entry = Entry(name, obj, source, description)
        with self._lock:
            if name in self._entries:
                raise ValueError(
                    f"{self.family[:-1].replace('_', ' ')} {name!r} is registered twice: "
                    f"by {self._entries[name].source} and by {source}"
                )
            self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)

    def get(self, name: str) -> Any:
        """The object registered as ``name``; ``KeyError`` lists the known names."""
        try:
            return self._entries[name].obj
        except KeyError:
            raise KeyError(
                f"unknown {self.family[:-1].replace('_', ' ')} {name!r}; "
                f"registered: {', '.join(sorted(self._entries)) or 'none'}"
            ) from None

    def entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {self.names()})"
