"""Helpers for testing plugins.

::

    from aigc_ext import hookimpl
    from aigc_ext.testing import register_plugin

    class Plugin:
        @hookimpl
        def aigc_register_augmentations(self, register):
            register("noop", lambda batch, *, generator=None: batch)

    def test_noop():
        with register_plugin(Plugin()):
            assert "noop" in aigc_ext.plugins.get_registry("augmentations")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aigc_ext import plugins

__all__ = ["register_plugin"]


@contextlib.contextmanager
def register_plugin(plugin: object, name: str | None = None) -> Iterator[plugins.PluginInfo]:
    """Registers ``plugin`` for the ``with`` block; afterwards it and its registrations are gone.

    Faults raise :class:`aigc_ext.plugins.PluginError` (strict mode) at entry.
    """
    plugins.load()
    info = plugins.add_plugin(plugin, name, strict=True)
    assert info is not None
    try:
        yield info
    finally:
        plugins.remove_plugin(info.name)
