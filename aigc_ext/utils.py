"""Small helpers used across the package, each defined once here.

* :func:`warn_once`: a warning shown once per key, e.g. once per fallback reason;
* :func:`atomic_write` / :func:`atomic_write_text`: replace a file so that a reader (or a
  crash) sees the old file or the new one, never half of one; with :func:`set_default_mode`,
  :func:`fsync_file` and :func:`fsync_dir`, the durable-write helpers of the training run's
  files (:mod:`aigc_ext.training.files`) and the benchmark's result files.

This module imports nothing from ``aigc_ext``, so any module may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Hashable
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "set_default_mode",
    "warn_once",
]

_shown: set[Hashable] = set()  # the keys of warn_once calls that pass no ``seen`` of their own


def warn_once(
    message: str,
    *,
    key: Hashable = None,
    seen: set | None = None,
    category: type[Warning] = UserWarning,
    stacklevel: int = 2,
) -> bool:
    """Warns ``message`` unless a warning with the same ``key`` (default: the message) was
    already shown; returns whether it warned.

    ``seen`` is the set of keys shown so far: a module passes its own set so that its one-time
    warnings can be forgotten together (tests reset them); without one a shared set is used.
    ``stacklevel`` counts from the caller, as for :func:`warnings.warn` called in its place.
    """
    shown = _shown if seen is None else seen
    key = message if key is None else key
    if key in shown:
        return False
    shown.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike) -> None:
    """Gives a file or directory the permissions a plain ``open``/``mkdir`` would (safetensors
    and ``tempfile`` create them private), so others who may read it can."""
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
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Replaces ``path`` with the file that ``write(temporary_path)`` creates; returns the path.

    The temporary file (``.<name>-XXXXXXXX`` beside ``path``) gets the permissions a plain
    ``open`` would give it and is flushed to disk before it is renamed over ``path`` with
    :func:`os.replace`; the rename is flushed too. So after a crash ``path`` holds either its
    old or its new contents. If ``write`` raises, the temporary file is removed and ``path`` is
    left as it was; the directory must exist.
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
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replaces ``path`` with ``text`` as :func:`atomic_write` does: written as given (UTF-8, no
    newline translation)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)
