"""The feature tables (rich, one per problem) and the JSON document of a run."""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

import torch

from aigc_ext.bench.features.config import FeatureConfig
from aigc_ext.bench.features.rows import FeatureRow
from aigc_ext.bench.features.timing import Stats
from aigc_ext.utils import atomic_write_text

__all__ = ["SCHEMA", "document", "machine_line", "print_feature_tables", "write_json"]

SCHEMA = "aigc_ext.bench.features/1"

CAPTION = (
    "ms: median (min-max) over the timed runs (runs: how many); in every run each contender runs "
    "once, one after another, in rotating order. value: median (min-max) of the per-run ratios. holds: the "
    "median against the target. max|diff|: max |measured - against| over the output, where "
    "both compute the same attention."
)


def machine() -> dict:
    """CPU model and flags, threads, torch and aigc_ext versions (as aigc-ext info reports)."""
    from aigc_ext._version import __version__
    from aigc_ext.info import cpu_document

    return {
        "cpu": cpu_document(),
        "torch": torch.__version__,
        "aigc_ext": __version__,
    }


def machine_line(doc: dict | None = None) -> str:
    from aigc_ext.info import cpu_summary

    doc = doc or machine()
    cpu = doc["cpu"]
    return (
        f"machine: {cpu_summary(cpu)}, "
        f"{cpu['threads']} threads, torch {doc['torch']}, aigc_ext {doc['aigc_ext']}"
    )


def _num(x: float) -> str:
    """Milliseconds with three or four significant digits and no exponent."""
    if x >= 99.95:
        return f"{x:.0f}"
    return f"{x:.1f}" if x >= 9.995 else f"{x:.3g}"


def _ms(s: Stats | None) -> str:
    if s is None:
        return "-"
    return f"{_num(s.median)} ({_num(s.min)}-{_num(s.max)})"


def _ratio(s: Stats | None) -> str:
    if s is None:
        return "-"
    return f"{s.median:.2f}x ({s.min:.2f}-{s.max:.2f})"


def _diff(row: FeatureRow) -> str:
    if row.max_diff is None:
        return "-"
    text = f"{row.max_diff:.1e}" if math.isfinite(row.max_diff) else str(row.max_diff)
    return text + (" FAIL" if row.status == "fail" else "")


def _holds(row: FeatureRow) -> str:
    return {None: "-", True: "yes", False: "NO"}[row.holds]


def _groups(rows: list[FeatureRow]) -> dict[str, list[FeatureRow]]:
    groups: dict[str, list[FeatureRow]] = {}
    for r in rows:
        groups.setdefault(r.problem, []).append(r)
    return groups


def print_feature_tables(
    rows: list[FeatureRow], console: object | None = None, machine_doc: dict | None = None
) -> None:
    """One rich table per problem (feature and sizes), then the machine and a summary."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    console.print(Text(machine_line(machine_doc)))
    if not rows:
        console.print("no rows")
        return
    for problem, group in _groups(rows).items():
        table = Table(
            title=problem,
            caption=next((r.note for r in group if r.note), None),
            caption_justify="left",
            header_style="bold",
            box=box.SIMPLE_HEAD,
            collapse_padding=True,
            title_justify="left",
        )
        for name, min_width in (
            ("dtype", 4),
            ("mode", 4),
            ("measured", 12),
            ("ms", None),
            ("against", 12),
            ("ms ", None),
            ("runs", None),
            ("ratio", 10),
            ("value", None),
            ("target", None),
            ("holds", 3),
            ("max|diff|", None),
        ):
            # Numbers never wrap: on a narrow terminal the text columns fold instead.
            numeric = min_width is None
            table.add_column(
                name,
                justify="right" if numeric else "left",
                no_wrap=numeric,
                min_width=min_width,
                overflow="fold",
            )
        for r in group:
            style = {"fail": "bold red", "error": "bold red"}.get(r.status)
            if r.holds is False and style is None:
                style = "yellow"
            table.add_row(
                Text(r.dtype),
                Text(r.mode),
                Text(r.subject if r.status != "error" else f"error: {r.reason}"),
                _ms(r.subject_ms),
                Text(r.baseline),
                _ms(r.baseline_ms),
                "-" if r.ratio is None else str(r.ratio.n),
                Text(r.ratio_name),
                _ratio(r.ratio),
                "-" if r.target is None else str(r.target),
                _holds(r),
                _diff(r),
                style=style,
            )
        console.print(table)
    console.print(Text(CAPTION, style="dim"))
    targeted = [r for r in rows if r.holds is not None]
    held = sum(1 for r in targeted if r.holds)
    console.print(Text(f"targets: {held} of {len(targeted)} hold"))
    bad = [r for r in rows if r.status != "ok"]
    if bad:
        console.print(
            Text(f"{len(bad)} row(s) failed the output check or raised", style="bold red")
        )


def document(
    rows: list[FeatureRow],
    config: FeatureConfig,
    machine_doc: dict | None = None,
    complete: bool = True,
) -> dict:
    """The JSON document: schema, completeness, time, machine, configuration and rows."""
    return {
        "schema": SCHEMA,
        "complete": complete,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_doc or machine(),
        "config": config.as_dict(),
        "rows": [r.as_dict() for r in rows],
    }


def write_json(
    path: str | os.PathLike,
    rows: list[FeatureRow],
    config: FeatureConfig,
    machine_doc: dict | None = None,
    complete: bool = True,
) -> Path:
    """Writes :func:`document` atomically (temporary file, then rename)."""
    doc = document(rows, config, machine_doc, complete)
    text = json.dumps(doc, indent=2, allow_nan=False)
    return atomic_write_text(path, text + "\n")
