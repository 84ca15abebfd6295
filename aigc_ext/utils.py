"""Small helpers used across the package, each defined once here.

* :func:`warn_once`: a warning shown once per key, e.g. once per fallback reason;
* :func:`atomic_write_text`: replaces a file's contents so that a reader (or a crash) sees the
  old file or the new one, never half of one.

This module imports nothing from ``aigc_ext``, so any module may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Hashable
from pathlib import Path

__all__ = ["atomic_write_text", "warn_once"]

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
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Makes a rename in ``path`` durable; a no-op where directories cannot be opened."""
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


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` through a temporary file in the same directory, renamed over
    ``path`` with :func:`os.replace`; returns the path.

    The text is written as given (no newline translation, UTF-8) and flushed to disk before the
    rename, and the rename itself is flushed, so after a crash ``path`` holds either its old or
    its new contents. The file gets the permissions a plain ``open`` would give it (``tempfile``
    creates it private). On any error the temporary file is removed and the error raised; the
    directory must exist.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path
