"""``aigc-ext bench compare A.json B.json``: B's rows relative to A's.

Rows are matched by their key (case + backend). For each pair timed in both files the ratio
``time_B / time_A`` is printed; above ``1 + threshold`` it is a regression. A row that was
``ok`` in A and fails the error rule, raises or runs out of memory in B is a regression too.
Rows present in only one file, or not timed in one of them (skipped), are listed but are not
failures. Exit code: 0 without regressions, 1 with, 2 when a file cannot be read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

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


def load_results(path: str | os.PathLike) -> dict:
    """Reads a ``--json`` file; :class:`UsageError` when it is missing or not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"compare: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"compare: {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise UsageError(
            f"compare: {str(path)!r} has schema {found!r}; expected {SCHEMA!r} "
            "(written by aigc-ext bench --json)"
        )
    if not isinstance(doc.get("rows"), list):
        raise UsageError(f"compare: {str(path)!r} has no 'rows' list")
    return doc


def compare_docs(
    a: dict, b: dict, threshold: float = 0.05
) -> tuple[list[Comparison], list[str], list[str]]:
    """Pairs the rows of two result documents.

    Returns (comparisons in A's order, keys only in A, keys only in B).
    """
    if threshold < 0:
        raise UsageError(f"threshold: must be >= 0, got {threshold}")
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
    m = doc.get("machine") or {}
    cpu = (m.get("cpu") or {}).get("model", "?")
    gpu = ", ".join(m.get("gpu") or []) or "no GPU"
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
