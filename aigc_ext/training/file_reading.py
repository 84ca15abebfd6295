"""Reading a user's data files through Hugging Face ``datasets``, locally and with clear errors.

:func:`expand_paths` turns a path, a glob or a list of them into files (sorted glob matches, in
the order given otherwise); :func:`read_rows` reads one file with the ``datasets`` builder of
its format (:data:`FORMATS`: JSON lines or a JSON array, CSV, Parquet, plain text) into
columns of Python values. ``datasets`` runs offline (``HF_DATASETS_OFFLINE=1``) with its cache
in a temporary directory that is removed afterwards, or in ``cache_dir`` when one is given.

Every problem is a :class:`DataFileError` (a ``ValueError``) naming the file and, where it
applies, the row, the line and the field: a path that matches no file, an empty file, a file
that cannot be read or parsed (with the first bad line of a JSON-lines file), a missing field.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "DataFileError", "FileRows", "expand_paths", "read_rows"]

FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
"""File name suffix -> ``datasets`` builder (the ``format`` option names a builder directly)."""

BUILDERS = ("json", "csv", "parquet", "text")


class DataFileError(ValueError):
    """A data file is missing, empty, unreadable or holds a row that cannot be used."""


@dataclass
class FileRows:
    """The rows of one file as columns: ``columns[name][i]`` is field ``name`` of row ``i``
    (None where the row lacks it). ``lines[i]`` is row i's line number where rows are lines."""

    path: Path
    format: str
    columns: dict[str, list[Any]]
    lines: list[int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def where(self, row: int, field_name: str | None = None) -> str:
        """``"data.jsonl: row 3 (line 4), field 'text'"``, 1-based, for error messages."""
        text = f"{self.path}: row {row + 1}"
        if self.lines is not None and row < len(self.lines):
            text += f" (line {self.lines[row]})"
        if field_name is not None:
            text += f", field {field_name!r}"
        return text

    def value(self, row: int, name: str) -> Any:
        """Field ``name`` of ``row``; a DataFileError naming the file, row and field (and the
        fields the row has) when it is missing."""
        column = self.columns.get(name)
        value = None if column is None else column[row]
        if value is None:
            present = [k for k, v in self.columns.items() if v[row] is not None]
            raise DataFileError(
                f"{self.where(row, name)}: the field is missing; the row has "
                f"{', '.join(map(repr, present)) or 'no fields'}"
            )
        return value


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike], what: str) -> list[Path]:
    """The files ``paths`` names: each entry a file or a glob (``data/*.jsonl``, ``**`` for
    subdirectories), globs sorted; ``what`` names the option in messages."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not isinstance(paths, Sequence) or not paths:
        raise DataFileError(f"{what} must be a file, a glob or a list of them, got {paths!r}")
    files: list[Path] = []
    for entry in paths:
        if not isinstance(entry, str | os.PathLike) or not str(entry):
            raise DataFileError(f"{what} must hold file paths or globs, got {entry!r}")
        text = os.path.expanduser(str(entry))
        if _is_glob(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataFileError(f"{what}: no file matches {str(entry)!r}")
            files.extend(Path(p) for p in found)
            continue
        path = Path(text)
        if path.is_dir():
            raise DataFileError(
                f"{what}: {str(entry)!r} is a directory; give a file or a glob such as "
                f"{str(Path(entry) / '*.jsonl')!r}"
            )
        if not path.exists():
            raise DataFileError(f"{what}: file {str(entry)!r} not found")
        files.append(path)
    return list(dict.fromkeys(files))


def file_format(path: Path, format: str | None) -> str:
    """The ``datasets`` builder for ``path``: ``format`` when given, else by suffix."""
    if format is not None:
        if format not in BUILDERS:
            raise DataFileError(f"format must be one of {', '.join(BUILDERS)}; got {format!r}")
        return format
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataFileError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; name files "
            f"{', '.join(FORMATS)} or set format to one of {', '.join(BUILDERS)}"
        )
    return builder


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """``datasets`` imported offline, with its progress bars and log lines off."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ImportError(f"reading data files needs the package datasets: {exc}") from exc
    datasets.config.HF_DATASETS_OFFLINE = True
    loggers = [logging.getLogger(name) for name in ("datasets", "fsspec")]
    levels = [lg.level for lg in loggers]
    bars = datasets.utils.logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _json_lines(path: Path) -> list[int] | None:
    """Line numbers of the non-blank lines of a JSON-lines file (None for a JSON array)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.lstrip()[:1] == b"[":
        return None
    return [i + 1 for i, line in enumerate(data.splitlines()) if line.strip()]


def _first_bad_json_line(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as exc:
                        return f"line {number} is not valid JSON ({exc})"
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
    return None


def _unreadable(path: Path, builder: str, exc: BaseException) -> DataFileError:
    cause = _root_cause(exc)
    if "corresponds to no data" in str(cause):  # datasets' words for a table without rows
        return DataFileError(f"{path}: the file has no rows")
    detail = None
    if builder == "json":
        detail = _first_bad_json_line(path)
    if detail is None and isinstance(cause, UnicodeDecodeError):
        detail = f"not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
    if detail is None:
        detail = f"{type(cause).__name__}: {cause}"
    return DataFileError(f"{path}: cannot be read as {builder}: {detail}")


def read_rows(
    path: Path,
    format: str | None = None,
    *,
    sample_by: str = "line",
    cache_dir: str | os.PathLike | None = None,
) -> FileRows:
    """The rows of ``path`` read with the ``datasets`` builder of its format.

    ``sample_by`` (plain text only): ``"line"`` (a row per line), ``"paragraph"`` (blocks
    separated by blank lines) or ``"document"`` (the whole file). Raises
    :class:`DataFileError` for a file that is empty, unreadable or not in its format.
    """
    builder = file_format(path, format)
    if not os.access(path, os.R_OK):
        raise DataFileError(f"{path}: cannot be read (permission denied)")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise DataFileError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if not head.strip() and os.path.getsize(path) <= len(head):
        raise DataFileError(f"{path}: the file is empty")
    kwargs: dict[str, Any] = {}
    if builder == "text":
        if sample_by not in ("line", "paragraph", "document"):
            raise DataFileError(
                f"sample_by must be 'line', 'paragraph' or 'document'; got {sample_by!r}"
            )
        kwargs["sample_by"] = sample_by
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="aigc-ext-") as tmp:
        try:
            table = datasets.load_dataset(
                builder,
                data_files=[str(path)],
                split="train",
                cache_dir=str(cache_dir) if cache_dir is not None else tmp,
                keep_in_memory=True,
                **kwargs,
            )
        except Exception as exc:
            raise _unreadable(path, builder, exc) from None
        columns = table.to_dict()
    rows = FileRows(path, builder, columns)
    if len(rows) == 0:
        raise DataFileError(f"{path}: the file has no rows")
    if builder == "json":
        rows.lines = _json_lines(path)
    elif builder == "text" and sample_by == "line":
        rows.lines = list(range(1, len(rows) + 1))
    return rows
