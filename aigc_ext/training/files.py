"""Durable writes for a run's files: default permissions, fsync, atomic replacement.

A file that a crash must never leave half-written (``config.json``, ``model.json``, the final
weights, ``checkpoints/latest``) is written under a temporary name in the same directory,
fsynced and renamed over the target with :func:`atomic_write` / :func:`atomic_write_text`:
afterwards the target holds either the old contents or the new ones. Every training module
writes such files through these two functions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir", "fsync_file", "set_default_mode"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike) -> None:
    """Gives a file or directory the permissions a plain ``open``/``mkdir`` would (safetensors
    and ``tempfile`` create them private), so others who may read the run can read it."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes a file's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a directory's entries (a rename in it) to the disk, where the platform can."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Replaces ``path`` with the file that ``write(temporary_path)`` creates.

    The temporary file (``.<name>-XXXXXXXX`` beside ``path``) gets the default permissions and
    is fsynced before the rename; the directory is fsynced after it. If ``write`` raises, the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        set_default_mode(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` with ``text`` (UTF-8) atomically, as :func:`atomic_write` does."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
