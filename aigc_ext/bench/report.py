"""Results out: records (JSON/CSV, schema ``aigc_ext.bench/1``), the terminal table, the plot.

JSON document::

    {"schema": "aigc_ext.bench/1", "complete": bool, "created": ISO time, "updated": ISO time,
     "machine": {...}, "config": {...}, "rows": [record, ...]}

``complete`` stays false until the sweep ends; the file is rewritten atomically (temporary
file + ``os.replace``) after every case, so a run that dies midway leaves every finished row
readable. The CSV file has one line per record plus the machine columns of :data:`CSV_MACHINE`,
and is written the same way.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import torch

from aigc_ext.bench.config import BenchConfig
from aigc_ext.bench.roofline import Peaks
from aigc_ext.bench.runner import Row
from aigc_ext.utils import atomic_write_text

__all__ = [
    "CSV_FIELDS",
    "SCHEMA",
    "ResultWriter",
    "machine_description",
    "print_table",
    "record",
    "write_plot",
]

SCHEMA = "aigc_ext.bench/1"

# Record fields, in CSV column order (the JSON record also has "times_ms" and "errors").
CSV_FIELDS = [
    "key",
    "backend",
    "kind",
    "device",
    "status",
    "reason",
    "mode",
    "dtype",
    "batch",
    "heads",
    "kv_heads",
    "seq_q",
    "seq_kv",
    "head_dim",
    "head_dim_v",
    "causal",
    "mask",
    "flop",
    "reps",
    "time_ms",
    "time_p20_ms",
    "time_p80_ms",
    "gflops",
    "peak_gflops",
    "peak_fraction",
    "peak_capped",
    "mem_mib",
    "speedup_vs_torch",
    "torch_best",
    "max_err",
    "correct",
    "compile_s",
]
CSV_MACHINE = ["schema", "date", "cpu_model", "cpu_isa", "threads", "gpu", "torch", "aigc_ext"]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _num(x: float | None, digits: int = 6) -> float | None:
    """JSON-safe number: None for missing or non-finite values, rounded to ``digits`` figures."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _ms(x: float | None) -> float | None:
    return _num(x * 1e3) if x is not None else None


def _peak_fraction(row: Row) -> tuple[float | None, bool]:
    """The row's fraction of its peak, at most 1, and whether it was above (then the peak was
    measured low: a machine busy with other work while the probe ran)."""
    f = row.peak_fraction
    if f is None or not math.isfinite(f):
        return None, False
    return min(f, 1.0), f > 1.0


def record(row: Row) -> dict:
    """The JSON record of a row (schema ``aigc_ext.bench/1``); ``peak_fraction`` is at most 1,
    ``peak_capped`` says where the row measured above its peak."""
    c = row.case
    fraction, capped = _peak_fraction(row)
    rec = {
        "key": row.key,
        "backend": row.backend,
        "kind": row.kind,
        "device": row.device,
        "status": row.status,
        "reason": row.reason,
        **c.as_dict(),
        "flop": c.flop,
        "reps": len(row.times_s),
        "time_ms": _ms(row.median_s),
        "time_p20_ms": _ms(row.p20_s),
        "time_p80_ms": _ms(row.p80_s),
        "times_ms": [_ms(t) for t in row.times_s],
        "gflops": _num(row.gflops),
        "peak_gflops": _num(row.peak_gflops),
        "peak_fraction": _num(fraction, 4),
        "peak_capped": capped,
        "mem_mib": _num(row.mem_mib, 4),
        "speedup_vs_torch": _num(row.speedup, 4),
        "torch_best": row.torch_best,
        "max_err": _num(row.max_err, 4),
        "correct": row.correct,
        "errors": None,
        "compile_s": _num(row.compile_s, 4),
    }
    if row.check is not None:
        rec["errors"] = {
            name: {"max_err": _num(err, 4), "bound": _num(row.check.bounds[name], 4)}
            for name, err in row.check.errors.items()
        }
    return rec


def machine_description(
    config: BenchConfig, peaks: Mapping[str, float] | None = None
) -> dict[str, object]:
    """The machine block: ``aigc-ext info`` (versions, CPU model and ISA, GPUs, backends) plus
    the threads and device of this run, the peak per dtype (``peak_gflops``), what each peak
    is (``peaks``: :meth:`~aigc_ext.bench.roofline.Peaks.as_dict`) and the matmul probes that
    ran (``matmul_peak_gflops``)."""
    from aigc_ext import info

    doc = info.describe()
    doc["date"] = _now()
    doc["threads"] = torch.get_num_threads()
    doc["device"] = config.device
    doc["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or None
    doc["peak_gflops"] = {k: _num(v) for k, v in (peaks or {}).items()}
    if isinstance(peaks, Peaks):
        doc["peaks"] = _json_numbers(peaks.as_dict())
        doc["matmul_peak_gflops"] = {k: _num(v) for k, v in peaks.matmul_gflops.items()}
    else:  # a plain mapping from the caller: only its numbers are known
        given = ", ".join(f"{k} {v:.4g} GFLOP/s" for k, v in (peaks or {}).items())
        doc["peaks"] = {"summary": f"given: {given}" if given else None}
    doc.setdefault("python", platform.python_version())
    return doc


def _json_numbers(value: object) -> object:
    """``value`` with every float through :func:`_num` (rounded, None when not finite)."""
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    return value


def _csv_machine(machine: dict) -> dict[str, object]:
    cpu = machine.get("cpu", {})
    return {
        "schema": SCHEMA,
        "date": machine.get("date"),
        "cpu_model": cpu.get("model"),
        "cpu_isa": " ".join(cpu.get("isa", [])),
        "threads": machine.get("threads"),
        "gpu": "; ".join(machine.get("gpu") or []),
        "torch": machine.get("torch"),
        "aigc_ext": machine.get("aigc_ext"),
    }


class ResultWriter:
    """Keeps the JSON and CSV files (either may be None) up to date as rows arrive."""

    def __init__(
        self,
        json_path: str | os.PathLike | None,
        csv_path: str | os.PathLike | None,
        machine: dict,
        config: BenchConfig,
    ) -> None:
        self.json_path = Path(json_path) if json_path else None
        self.csv_path = Path(csv_path) if csv_path else None
        self.machine = machine
        self.config = config
        self.created = _now()
        self.records: list[dict] = []
        self.complete = False
        for path in (self.json_path, self.csv_path):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        self._flush()

    def add(self, row: Row) -> None:
        """Adds a row and rewrites the files."""
        self.records.append(record(row))
        self._flush()

    def finish(self) -> None:
        self.complete = True
        self._flush()

    def document(self) -> dict:
        return {
            "schema": SCHEMA,
            "complete": self.complete,
            "created": self.created,
            "updated": _now(),
            "machine": self.machine,
            "config": self.config.as_dict(),
            "rows": self.records,
        }

    def _flush(self) -> None:
        if self.json_path is not None:
            text = json.dumps(self.document(), indent=1, allow_nan=False)
            atomic_write_text(self.json_path, text + "\n")
        if self.csv_path is not None:
            atomic_write_text(self.csv_path, self._csv_text())

    def _csv_text(self) -> str:
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS + CSV_MACHINE, extrasaction="ignore")
        writer.writeheader()
        machine = _csv_machine(self.machine)
        for rec in self.records:
            writer.writerow({**rec, **machine})
        return buf.getvalue()


# ----------------------------------------------------------------------------- terminal table


_DIMS = (
    ("mode", lambda c: c.mode),
    ("dtype", lambda c: c.dtype),
    ("B", lambda c: f"B={c.batch}"),
    ("H", lambda c: f"H={c.heads}" if c.heads == c.kv_heads else f"H={c.heads}/{c.kv_heads}"),
    ("L", lambda c: f"L={c.seq_q}"),
    ("S", lambda c: f"S={c.seq_kv}"),
    ("E", lambda c: f"E={c.head_dim}" + (f"/{c.head_dim_v}" if c.head_dim_v != c.head_dim else "")),
    ("causal", lambda c: "causal" if c.causal else "full"),
    ("mask", lambda c: f"mask={c.mask}"),
)


def _case_labels(rows: list[Row]) -> tuple[dict, str]:
    """A short label per case (the dimensions that vary) and the dimensions common to all."""
    cases = list(dict.fromkeys(r.case for r in rows))
    varying = [(n, f) for n, f in _DIMS if len({f(c) for c in cases}) > 1] or list(_DIMS[:2])
    common = [f(cases[0]) for n, f in _DIMS if (n, f) not in varying] if cases else []
    labels = {}
    for c in cases:
        parts = [f(c) for _, f in varying]
        if c.seq_q == c.seq_kv and any(n == "L" for n, _ in varying):  # L=S=1024, not both
            parts = [x for x in parts if not x.startswith("S=")]
            parts = [f"L=S={c.seq_q}" if x.startswith("L=") else x for x in parts]
        labels[c] = " ".join(parts)
    return labels, " ".join(common)


def _fmt(x: float | None, spec: str, mult: float = 1.0, suffix: str = "") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x * mult, spec) + suffix


def skipped_everywhere(rows: list[Row]) -> dict[str, str]:
    """Backends skipped on every case for one and the same reason: {name: reason}."""
    by_backend: dict[str, set] = {}
    for r in rows:
        by_backend.setdefault(r.backend, set()).add((r.status, r.reason))
    return {
        name: next(iter(states))[1] or ""
        for name, states in by_backend.items()
        if len(states) == 1 and next(iter(states))[0] == "skipped"
    }


_CAPPED = "*"
_CAPPED_NOTE = (
    "above its peak, shown as 100%: that peak is too low, most often because other work loaded "
    "the machine while the probe ran; rerun for a better figure"
)


def _percent_of_peak(row: Row) -> str:
    """The % peak cell: never above 100; a row above its peak reads ``100%*``."""
    fraction, capped = _peak_fraction(row)
    if fraction is None:
        return "-"
    return "100%" + _CAPPED if capped else f"{min(fraction * 100, 100.0):.0f}%"


_ROW_STYLE = {"fail": "bold red", "error": "bold red", "oom": "yellow", "skipped": "dim"}


def print_table(
    rows: list[Row],
    console: object | None = None,
    machine: dict | None = None,
) -> None:
    """Prints the rows as a rich table, one section per case; failing rows in red.

    Reasons (why a row was skipped, failed or ran out of memory) are numbered notes below the
    table; backends skipped on every case for the same reason are listed once there too.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    if not rows:
        console.print("no rows")
        return
    gpu = rows[0].device.startswith("cuda")
    unit, scale = ("TFLOP/s", 1e-3) if gpu else ("GFLOP/s", 1.0)
    labels, common = _case_labels(rows)
    everywhere = skipped_everywhere(rows)
    threads = f", {torch.get_num_threads()} threads" if not gpu else ""
    table = Table(
        title=f"aigc-ext bench on {rows[0].device}{threads}: {common}",
        caption="time: median (p20-p80 range) of the timed runs; % peak: of the peak of the "
        "path the row's kernel takes (peak line above), at most 100; mem: peak extra memory of "
        "one call; vs torch: speedup over torch's fastest SDPA backend on the case; err: max "
        "|x - fp64 reference| over out (and dq, dk, dv)",
        caption_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
    )
    columns = [
        ("case", 12),
        ("backend", 10),
        ("status", 6),
        ("ms", None),
        ("p20-p80 ms", None),
        (unit, None),
        ("% peak", None),
        ("vs torch", None),
        ("err", None),
        ("mem MiB", None),
    ]
    for name, text_min_width in columns:
        # Numbers never wrap: on a narrow terminal the text columns fold instead.
        numeric = text_min_width is None
        table.add_column(
            name,
            justify="right" if numeric else "left",
            no_wrap=numeric,
            min_width=text_min_width,
            overflow="fold",
        )
    notes: dict[str, int] = {}  # reason -> note number, printed below the table
    last_case = None
    for r in (r for r in rows if r.backend not in everywhere):
        if last_case is not None and r.case != last_case:
            table.rows[-1].end_section = True
        first, last_case = r.case != last_case, r.case
        status = r.status
        if r.reason:
            status += f" [{notes.setdefault(r.reason, len(notes) + 1)}]"
        table.add_row(
            Text(labels[r.case] if first else ""),
            Text(r.backend),
            Text(status),
            _fmt(r.median_s, ".3g", 1e3),
            f"{_fmt(r.p20_s, '.3g', 1e3)}-{_fmt(r.p80_s, '.3g', 1e3)}" if r.timed else "-",
            _fmt(r.gflops, ".4g", scale),
            _percent_of_peak(r),
            _fmt(r.speedup, ".2f", suffix="x"),
            _fmt(r.max_err, ".1e"),
            _fmt(r.mem_mib, ".1f"),
            style=_ROW_STYLE.get(r.status),
        )
    peak_text = ((machine or {}).get("peaks") or {}).get("summary")
    if machine is not None:
        console.print(Text(f"peak: {peak_text or 'not measured'}"))
    console.print(table)
    if any(_peak_fraction(r)[1] for r in rows):
        console.print(Text(f"{_CAPPED} {_CAPPED_NOTE}"))
    if machine is not None:
        from aigc_ext.info import cpu_summary

        cpu = machine.get("cpu", {})
        console.print(
            Text(
                f"machine: {cpu_summary(cpu)}, "
                f"torch {machine.get('torch')}, aigc_ext {machine.get('aigc_ext')}"
            )
        )
    for reason, number in notes.items():
        console.print(Text(f"[{number}] {reason}"))
    for name, reason in everywhere.items():
        console.print(Text(f"skipped on every case: {name}: {reason}", style="dim"))
    bad = [r for r in rows if r.status in ("fail", "error")]
    if bad:
        console.print(Text(f"{len(bad)} row(s) failed the error rule or raised", style="bold red"))


# ----------------------------------------------------------------------------- plot


def write_plot(rows: list[Row], path: str | os.PathLike) -> Path:
    """Throughput against sequence length, one line per backend, one panel per configuration.

    The x axis is the query length ``L`` (the KV length ``S`` for decode rows); a panel holds
    the cases that agree on everything else. Failing rows are drawn with a red cross.
    Requires matplotlib (the ``bench`` extra); uses the Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xval(c) -> int:
        return c.seq_kv if c.mode == "decode" else c.seq_q

    def panel(c) -> tuple:
        return (
            c.mode,
            c.dtype,
            c.causal,
            c.mask,
            c.batch,
            c.heads,
            c.kv_heads,
            c.head_dim,
            c.head_dim_v,
            *((c.seq_q,) if c.mode == "decode" else ()),
            *((c.seq_kv,) if c.mode != "decode" and c.seq_kv != c.seq_q else ()),
        )

    timed = [r for r in rows if r.timed]
    panels = list(dict.fromkeys(panel(r.case) for r in timed))
    gpu = bool(rows) and rows[0].device.startswith("cuda")
    unit, scale = ("TFLOP/s", 1e-3) if gpu else ("GFLOP/s", 1.0)
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    backends = list(dict.fromkeys(r.backend for r in timed))
    colors = {b: f"C{i % 10}" for i, b in enumerate(backends)}
    for ax, key in zip(axes.flat, panels, strict=False):
        prow = [r for r in timed if panel(r.case) == key]
        for b in backends:
            pts = sorted((xval(r.case), r) for r in prow if r.backend == b)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = [r.gflops * scale for _, r in pts]
            ax.plot(xs, ys, marker="o", color=colors[b], label=b)
            for x, r in pts:
                if r.status == "fail":
                    ax.plot([x], [r.gflops * scale], marker="x", color="red", markersize=12)
        c = prow[0].case
        heads = f"H={c.heads}" + (f"/{c.kv_heads}" if c.kv_heads != c.heads else "")
        e = f"E={c.head_dim}" + (f"/{c.head_dim_v}" if c.head_dim_v != c.head_dim else "")
        title = f"{c.mode} {c.dtype} {'causal' if c.causal else 'full'} B={c.batch} {heads} {e}"
        if c.mask != "none":
            title += f" mask={c.mask}"
        ax.set_title(title, fontsize=9)
        ax.set_xscale("log", base=2)
        ticks = sorted({xval(r.case) for r in prow})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("KV length S" if c.mode == "decode" else "sequence length L")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
