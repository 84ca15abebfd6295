"""``aigc-ext bench compare A.json B.json``: B's rows relative to A's.

Rows are matched by their key (case + backend). For each pair timed in both files the ratio
``time_B / time_A`` is printed; above ``1 + threshold`` it is a regression. A row that was
``ok`` in A and fails the error rule, raises or runs out of memory in B is a regression too.
Rows present in only one file, or not timed in one of them (skipped), are listed but are not
failures. Exit code: 0 without regressions, 1 with, 2 when a file cannot be read.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass

from aigc_ext.bench.config import UsageError
from aigc_ext.bench.report import SCHEMA

__all__ = ["Comparison", "compare_docs", "load_results", "print_comparison"]


@dataclass
class Comparison:
    key: str
    backend: str
    time_a_ms: float | None
    time_b_ms: float | None
    status_a: str
    status_b: str
    ratio: float | None  # time_B / time_A
    regressed: bool
    note: str = ""


# A results file of even a very long sweep is a few MiB; this only stops a wrong path (a device,
# a huge unrelated file) from being read whole.
MAX_RESULTS_BYTES = 256 << 20


def _read_text(path: str | os.PathLike) -> str:
    """The text of a results file: refused unless a regular file of at most
    :data:`MAX_RESULTS_BYTES` (checked before reading: ``/dev/zero`` would be read forever)
    holding UTF-8 text."""
    where = f"compare: {str(path)!r}"
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise UsageError(f"{where} is {kind}; expected a results file (aigc-ext bench --json)")
        if info.st_size > MAX_RESULTS_BYTES:
            raise UsageError(f"{where} is larger than {MAX_RESULTS_BYTES >> 20} MiB")
        with open(path, "rb") as f:
            data = f.read(MAX_RESULTS_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_RESULTS_BYTES:
        raise UsageError(f"{where} is larger than {MAX_RESULTS_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "expected a results file (aigc-ext bench --json)"
        ) from None


def _check_rows(rows: list, where: str) -> None:
    """The fields the comparison reads: ``key`` a string, ``backend`` and ``status`` strings
    when present, ``time_ms`` a finite number >= 0 or null."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UsageError(f"{where}: rows[{i}] must be an object, got {type(row).__name__}")
        key = row.get("key")
        if not isinstance(key, str):
            raise UsageError(f"{where}: rows[{i}]: field 'key' must be a string, got {key!r}")
        for name in ("backend", "status"):
            if name in row and not isinstance(row[name], str):
                raise UsageError(
                    f"{where}: rows[{i}] ({key}): field {name!r} must be a string, "
                    f"got {row[name]!r}"
                )
        t = row.get("time_ms")
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < math.inf:
            raise UsageError(
                f"{where}: rows[{i}] ({key}): field 'time_ms' must be a finite number >= 0 "
                f"or null, got {t!r}"
            )


def load_results(path: str | os.PathLike) -> dict:
    """Reads a ``--json`` file; :class:`UsageError` naming the file (and the row and field)
    when it is missing, unreadable, not one, or holds a value the comparison cannot use."""
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"compare: {str(path)!r} is not JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"compare: {str(path)!r}: JSON nested too deeply to read") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise UsageError(
            f"compare: {str(path)!r} has schema {found!r}; expected {SCHEMA!r} "
            "(written by aigc-ext bench --json)"
        )
    if not isinstance(doc.get("rows"), list):
        raise UsageError(f"compare: {str(path)!r} has no 'rows' list")
    _check_rows(doc["rows"], f"compare: {str(path)!r}")
    return doc


def compare_docs(
    a: dict, b: dict, threshold: float = 0.05
) -> tuple[list[Comparison], list[str], list[str]]:
    """Pairs the rows of two result documents.

    Returns (comparisons in A's order, keys only in A, keys only in B).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise UsageError(f"threshold (--threshold): must be a number, got {threshold!r}")
    if not 0 <= threshold < math.inf:
        raise UsageError(f"threshold (--threshold): must be a finite number >= 0, got {threshold}")
    rows_a = {r["key"]: r for r in a["rows"]}
    rows_b = {r["key"]: r for r in b["rows"]}
    out = []
    for key, ra in rows_a.items():
        rb = rows_b.get(key)
        if rb is None:
            continue
        ta, tb = ra.get("time_ms"), rb.get("time_ms")
        sa, sb = ra.get("status", "?"), rb.get("status", "?")
        ratio = tb / ta if ta and tb else None
        regressed, note = False, ""
        if sa == "ok" and sb in ("fail", "error", "oom"):
            regressed, note = True, f"status {sa} -> {sb}"
        elif ratio is not None and ratio > 1 + threshold:
            regressed, note = True, f"{(ratio - 1) * 100:.1f}% slower"
        elif ratio is None:
            note = "not timed in " + ("both" if not ta and not tb else "A" if not ta else "B")
        elif ratio < 1 - threshold:
            note = f"{(1 - ratio) * 100:.1f}% faster"
        out.append(Comparison(key, ra.get("backend", ""), ta, tb, sa, sb, ratio, regressed, note))
    only_a = [k for k in rows_a if k not in rows_b]
    only_b = [k for k in rows_b if k not in rows_a]
    return out, only_a, only_b


def _machine_line(doc: dict) -> str:
    m = doc.get("machine") if isinstance(doc.get("machine"), dict) else {}
    cpu = m.get("cpu") if isinstance(m.get("cpu"), dict) else {}
    cpu = cpu.get("model", "?")
    gpus = m.get("gpu") if isinstance(m.get("gpu"), list) else []
    gpu = ", ".join(map(str, gpus)) or "no GPU"
    return (
        f"{cpu}, {gpu}, {m.get('threads', '?')} threads, torch {m.get('torch', '?')}, "
        f"aigc_ext {m.get('aigc_ext', '?')}, {m.get('date', '?')}"
    )


def print_comparison(
    a: dict,
    b: dict,
    comparisons: list[Comparison],
    only_a: list[str],
    only_b: list[str],
    threshold: float,
    console: object | None = None,
) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    console.print(Text(f"A: {_machine_line(a)}"))
    console.print(Text(f"B: {_machine_line(b)}"))
    table = Table(
        title=f"B relative to A (regression: time B/A > {1 + threshold:.3g} or ok -> failing)",
        header_style="bold",
    )
    for name, justify in (
        ("row", "left"),
        ("A ms", "right"),
        ("B ms", "right"),
        ("B/A time", "right"),
        ("note", "left"),
    ):
        table.add_column(name, justify=justify, overflow="fold")
    for c in comparisons:
        style = "bold red" if c.regressed else ("dim" if c.ratio is None else None)
        table.add_row(
            Text(c.key),
            "-" if c.time_a_ms is None else f"{c.time_a_ms:.3g}",
            "-" if c.time_b_ms is None else f"{c.time_b_ms:.3g}",
            "-" if c.ratio is None else f"{c.ratio:.3f}",
            c.note,
            style=style,
        )
    console.print(table)
    for label, keys in (("only in A", only_a), ("only in B", only_b)):
        if keys:
            console.print(Text(f"{len(keys)} row(s) {label} (not compared):"))
            for k in keys:
                console.print(Text(f"  {k}"))
    n = sum(c.regressed for c in comparisons)
    if n:
        console.print(f"[bold red]{n} regression(s) beyond {threshold:.1%}[/bold red]")
    else:
        console.print(f"no regression beyond {threshold:.1%} in {len(comparisons)} matched rows")
