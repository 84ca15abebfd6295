"""Default plugin: the built-in attention backends, registered from one table.

It implements the same :func:`~aigc_ext.hookspecs.aigc_register_attention_backends` hook a
third-party plugin does; the dispatcher and the benchmark only ever see the registry.

:data:`BUILTIN_BACKENDS` names folders of ``aigc_ext/backends/``; each has a ``backend.py``
that declares its backend as ``BACKEND`` (an :class:`~aigc_ext.backends.spec.BackendSpec`). A
new in-tree backend is one such folder plus its name in the table (see docs/backends.md).
"""

from __future__ import annotations

import importlib

from aigc_ext.backends.spec import BackendSpec
from aigc_ext.hookspecs import hookimpl

__all__ = ["BUILTIN_BACKENDS", "aigc_register_attention_backends", "builtin_specs"]

BUILTIN_BACKENDS: tuple[str, ...] = (
    "cpu",
    "triton",
    "cuda",
    "reference",
)


def builtin_specs() -> list[BackendSpec]:
    """The ``BACKEND`` of ``aigc_ext.backends.<name>.backend`` for every name of the table."""
    specs = []
    for name in BUILTIN_BACKENDS:
        spec = importlib.import_module(f"aigc_ext.backends.{name}.backend").BACKEND
        if not isinstance(spec, BackendSpec) or spec.name != name:
            raise TypeError(
                f"aigc_ext.backends.{name}.backend.BACKEND must be a BackendSpec named {name!r}, "
                f"got {spec!r}"
            )
        specs.append(spec)
    return specs


@hookimpl
def aigc_register_attention_backends(register):
    """Registers every backend of :data:`BUILTIN_BACKENDS`."""
    for spec in builtin_specs():
        register(spec)
