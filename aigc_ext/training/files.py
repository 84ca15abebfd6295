"""Durable writes for a run's files: default permissions, fsync, atomic replacement.

A file that a crash must never leave half-written (``config.json``, ``model.json``, the final
weights, ``checkpoints/latest``) is written under a temporary name in the same directory,
fsynced and renamed over the target with :func:`atomic_write` / :func:`atomic_write_text`:
afterwards the target holds either the old contents or the new ones. Every training module
writes such files through these functions, which are :mod:`aigc_ext.utils`' (defined once
there, for the benchmark's result files too).
"""

from __future__ import annotations

from aigc_ext.utils import atomic_write, atomic_write_text, fsync_dir, fsync_file, set_default_mode

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir", "fsync_file", "set_default_mode"]
