"""Integrations with other libraries.

Each submodule imports its library lazily, inside the functions that need it, so importing
``aigc_ext`` or ``aigc_ext.integrations`` never imports a third-party package.

* :mod:`aigc_ext.integrations.torch_provider`: aigc_ext as a flash-attention provider of torch's
  dispatcher (``torch.nn.attention.activate_flash_attention_impl("aigc_ext")``).
* :mod:`aigc_ext.integrations.patch`: route ``torch.nn.functional.scaled_dot_product_attention``
  to aigc_ext.
* :mod:`aigc_ext.integrations.transformers`: ``attn_implementation="aigc_ext"`` for Hugging Face
  transformers models.

:func:`when_imported` runs a function once a module has been imported, without importing it: how
the transformers integration registers itself whatever the import order.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings
from collections.abc import Callable
from types import ModuleType

__all__ = ["when_imported"]

_lock = threading.RLock()
_pending: dict[str, list[Callable[[ModuleType], None]]] = {}  # module name -> callbacks


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Calls ``callback(module)`` once module ``name`` has been executed: now if it already is
    in ``sys.modules``, else right after its import finishes executing it (a finder on
    ``sys.meta_path`` wraps that module's loader; nothing is imported here).

    An exception in ``callback`` becomes a warning: it must not break the import it follows.
    """
    module = sys.modules.get(name)
    if module is not None and not _initializing(module):
        _call(callback, module)
        return
    with _lock:
        _pending.setdefault(name, []).append(callback)
        if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportFinder())


def _initializing(module: ModuleType) -> bool:
    """Whether ``module`` is still being executed (in ``sys.modules`` but not finished)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _call(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        callback(module)
    except Exception as exc:
        warnings.warn(
            f"aigc_ext: a hook run after importing {module.__name__} failed: {exc!r}",
            stacklevel=2,
        )


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module with pending callbacks it asks the finders after it
    for the spec and has that spec's loader run the callbacks after executing the module."""

    def find_spec(self, fullname, path, target=None):
        with _lock:
            if fullname not in _pending:
                return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _PostImportFinder):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        _wrap_exec_module(loader, fullname)
        return spec


def _wrap_exec_module(loader, fullname: str) -> None:
    """Makes ``loader.exec_module`` run the callbacks of ``fullname`` after the module's code.

    The wrapper is an attribute of this loader object only (each module gets its own loader)
    and removes itself when called, so the module keeps its real loader as ``__loader__``.
    """
    original = loader.exec_module

    def exec_module(module: ModuleType) -> None:
        if module.__name__ != fullname:  # a loader shared by several modules
            original(module)
            return
        try:
            del loader.exec_module
        except AttributeError:
            pass
        original(module)
        with _lock:
            callbacks = _pending.pop(fullname, [])
        for callback in callbacks:
            _call(callback, module)

    try:
        loader.exec_module = exec_module
    except (AttributeError, TypeError):  # a loader that takes no attributes: no hook
        pass
