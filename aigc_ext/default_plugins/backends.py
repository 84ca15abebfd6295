"""Default plugin: the built-in attention backends, registered from one table.

It implements the same :func:`~aigc_ext.hookspecs.aigc_register_attention_backends` hook a
third-party plugin does; the dispatcher and the benchmark only ever see the registry. A new
in-tree backend is a folder ``aigc_ext/backends/<name>/`` whose ``backend.py`` declares
``BACKEND``, plus one line in :data:`BUILTIN_BACKENDS`.
"""

from __future__ import annotations

from aigc_ext.backends.cpu import backend as cpu
from aigc_ext.backends.reference import backend as reference
from aigc_ext.backends.spec import BackendSpec
from aigc_ext.backends.triton import backend as triton
from aigc_ext.hookspecs import hookimpl

__all__ = ["BUILTIN_BACKENDS", "aigc_register_attention_backends"]

BUILTIN_BACKENDS: tuple[BackendSpec, ...] = (
    cpu.BACKEND,
    triton.BACKEND,
    reference.BACKEND,
)


@hookimpl
def aigc_register_attention_backends(register):
    """Registers every backend of :data:`BUILTIN_BACKENDS`."""
    for spec in BUILTIN_BACKENDS:
        register(spec)
