#!/usr/bin/env python
"""Times the fused CPU attention kernel against torch's own scaled_dot_product_attention.

Three implementations run in the same process on the same inputs:

* ``ours``        ``aigc_ext.scaled_dot_product_attention`` inside ``aigc_ext.use_backend("cpu")``
* ``torch-flash`` ``torch.nn.functional.scaled_dot_product_attention`` restricted to
  ``SDPBackend.FLASH_ATTENTION``
* ``torch-math``  the same restricted to ``SDPBackend.MATH`` (only up to ``--math-max-seq``)

Within each repetition the implementations run one after the other, in an order that reverses
from one repetition to the next (ours, torch-flash, torch-math, then torch-math, torch-flash,
ours, ...), so machine noise and whatever one call leaves behind in the caches fall on all of
them alike. The reported time is the median over ``--reps`` repetitions, after ``--warmup``
untimed rounds.

Throughput counts FLOPs with :func:`aigc_ext.bench.flops.attention_flop`, FlashAttention's
convention: forward 4*B*H*L*S*E (two matmuls), halved with ``is_causal``; forward+backward
counts 3.5x the forward (the backward does 2.5x the forward's work).
``ours/flash`` and ``ours/math`` are throughput ratios, above 1 when ours is faster: the median
over repetitions of the ratio of the two times measured in that repetition. Pairing the times
of one repetition cancels slow drifts of a shared machine's speed (other tenants, clock
changes) that a ratio of two separate medians would keep.

``--memory`` measures instead the peak resident memory a call needs beyond its inputs and
outputs, each configuration in a fresh process.

Examples::

    python benchmarks/bench_cpu_attention.py --quick
    python benchmarks/bench_cpu_attention.py --dtypes bf16 --seqs 2048 4096 --modes fwd
    python benchmarks/bench_cpu_attention.py --json bench-results/cpu.json
    python benchmarks/bench_cpu_attention.py --memory
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import hashlib
import json
import math
import multiprocessing
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import aigc_ext
from aigc_ext.bench import emulate
from aigc_ext.bench.flops import attention_flop
from aigc_ext.bench.measure import reset_peak_rss, status_kib
from aigc_ext.bench.roofline import CPU_KERNEL_BACKEND, Peaks, cpu_peaks
from aigc_ext.cpu_family import cpu_family

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}
DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
}
MODES = {
    "fwd": "fwd",
    "forward": "fwd",
    "fwdbwd": "fwd+bwd",
    "fwd+bwd": "fwd+bwd",
    "forward+backward": "fwd+bwd",
}
CAUSAL = {"off": False, "on": True, "false": False, "true": True, "0": False, "1": True}
IMPLS = ("ours", "torch-flash", "torch-math")
IMPL_ALIASES = {
    "ours": "ours",
    "flash": "torch-flash",
    "torch-flash": "torch-flash",
    "math": "torch-math",
    "torch-math": "torch-math",
}

QUICK = {
    "dtypes": ["fp32", "bf16"],
    "seqs": [1024, 2048],
    "head_dims": [64],
    "causal": [False, True],
    "modes": ["fwd"],
    "reps": 3,
}
DEFAULTS = {
    "dtypes": ["fp32", "bf16"],
    "seqs": [512, 1024, 2048, 4096],
    "head_dims": [64, 128],
    "causal": [False, True],
    "modes": ["fwd", "fwd+bwd"],
    "reps": 9,
}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _split(values: list[str] | None) -> list[str] | None:
    """Accepts both ``--x a b`` and ``--x a,b``."""
    if values is None:
        return None
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


def _pick(table: dict, values: list[str], what: str) -> list:
    out = []
    for v in values:
        key = v.lower()
        if key == "both" and what == "--causal":
            out.extend([False, True])
            continue
        if key not in table:
            raise SystemExit(f"{what}: unknown value {v!r}; expected one of {', '.join(table)}")
        if table[key] not in out:
            out.append(table[key])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="List options take space- or comma-separated values.",
    )
    p.add_argument("--dtypes", nargs="+", help="fp32 bf16 fp16 fp64 (default: fp32 bf16)")
    p.add_argument("--seqs", nargs="+", help="L = S values (default: 512 1024 2048 4096)")
    p.add_argument("--head-dims", nargs="+", help="E values (default: 64 128)")
    p.add_argument("--batch", type=int, default=1, help="B (default: 1)")
    p.add_argument("--heads", type=int, default=8, help="H (default: 8)")
    p.add_argument("--modes", nargs="+", help="fwd fwdbwd (default: both)")
    p.add_argument("--causal", nargs="+", help="off on (default: both)")
    p.add_argument("--impls", nargs="+", help="subset of: ours flash math (default: all three)")
    p.add_argument("--reps", type=int, help="timed repetitions per cell (default: 9, quick: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per cell (default: 1)")
    p.add_argument(
        "--math-max-seq",
        type=int,
        default=2048,
        help="run torch-math only where L and S are at most this (default: 2048)",
    )
    p.add_argument("--threads", type=int, help="intra-op threads (default: os.cpu_count())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="small grid (fp32 bf16, L 1024 2048, E 64, causal off/on, fwd, 3 reps); "
        "explicit options still override it",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="measure peak memory beyond inputs and outputs instead of time",
    )
    p.add_argument(
        "--memory-seq", type=int, default=16384, help="L = S for forward (default: 16384)"
    )
    p.add_argument(
        "--memory-bwd-seq",
        type=int,
        default=8192,
        help="L = S for forward+backward, 0 to skip (default: 8192)",
    )
    p.add_argument("--memory-head-dim", type=int, default=64, help="E (default: 64)")
    p.add_argument("--json", metavar="PATH", help="also write rows and machine info as JSON")
    p.add_argument(
        "--cpu-kernel",
        nargs="+",
        metavar="KEY=VALUE",
        default=[],
        help="cpu_kernel_config settings for the run, e.g. use_amx=0 use_brgemm=0 "
        "use_avx512_bf16=1 (the AVX-512-without-AMX paths on an AMX CPU) or isa=avx2",
    )
    p.add_argument(
        "--emulate",
        choices=sorted(emulate.EMULATIONS),
        help="run as a smaller CPU family, torch included: avx2 (AMD Zen 2/3) or avx512 "
        "(AVX512_BF16 without AMX, as on Zen 4); restarts the run with MKL, oneDNN and ATen "
        "limited to it and the kernel set to match (see aigc_ext.bench.emulate)",
    )
    args = p.parse_args(argv)
    args.cpu_kernel = _kernel_settings(p, args.cpu_kernel)
    if args.emulate:
        script_argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
        try:
            emulate.reexec(args.emulate, script_argv, _cpu_flags())
        except ValueError as e:
            p.error(str(e))
        args.cpu_kernel = {**emulate.EMULATIONS[args.emulate].kernel, **args.cpu_kernel}

    preset = QUICK if args.quick else DEFAULTS
    dtypes = _split(args.dtypes) or preset["dtypes"]
    args.dtypes = _pick(DTYPES, dtypes, "--dtypes")
    args.seqs = [int(s) for s in (_split(args.seqs) or preset["seqs"])]
    args.head_dims = [int(e) for e in (_split(args.head_dims) or preset["head_dims"])]
    args.modes = _pick(MODES, _split(args.modes) or preset["modes"], "--modes")
    causal = _split(args.causal)
    args.causal = _pick(CAUSAL, causal, "--causal") if causal else preset["causal"]
    args.impls = _pick(IMPL_ALIASES, _split(args.impls) or list(IMPLS), "--impls")
    if "ours" not in args.impls:
        raise SystemExit("--impls must include ours")
    args.impls = [i for i in IMPLS if i in args.impls]  # fixed alternation order
    if args.reps is None:
        args.reps = preset["reps"]
    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("--reps must be >= 1 and --warmup >= 0")
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    return args


# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _extension_file() -> dict:
    """Path, modification time and hash of the loaded aigc_ext._C (it may be rebuilt often)."""
    try:
        from aigc_ext import _C

        path = Path(_C.__file__)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
        return {"path": str(path), "mtime": mtime.isoformat(timespec="seconds"), "sha256": digest}
    except Exception as exc:  # informational only
        return {"error": repr(exc)}


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(threads: int) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_family": cpu_family().label(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aigc_ext_version": aigc_ext.__version__,
        "cpu_kernel_config": aigc_ext.ops.cpu_kernel_config(),
        "extension": _extension_file(),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def print_machine_info(info: dict) -> None:
    family = f" [{info['cpu_family']}]" if info.get("cpu_family") else ""
    flags = ", ".join(info["cpu_flags"]) or "no flags read"
    print(f"cpu:        {info['cpu_model']}{family} ({flags})")
    print(f"threads:    {info['torch_threads']} (os.cpu_count() = {info['cpu_count']})")
    print(f"torch:      {info['torch_version']} (cpu capability {info['torch_cpu_capability']})")
    print(f"aigc_ext:   {info['aigc_ext_version']}  {info['cpu_kernel_config']}")
    if info.get("emulation"):
        print(f"emulating:  {info['emulation']}")
    ext = info["extension"]
    if "sha256" in ext:
        print(f"extension:  {ext['path']} ({ext['mtime']}, sha256 {ext['sha256']})")
    print(f"date:       {info['date']}")
    if "peaks" in info:
        print(f"peak:       {info['peaks']['summary']}")


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------


def _context(impl: str) -> contextlib.AbstractContextManager:
    if impl == "ours":
        return aigc_ext.use_backend("cpu")
    if impl == "torch-flash":
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    if impl == "torch-math":
        return sdpa_kernel(SDPBackend.MATH)
    raise ValueError(impl)


def _function(impl: str) -> Callable[..., torch.Tensor]:
    return (
        aigc_ext.scaled_dot_product_attention if impl == "ours" else F.scaled_dot_product_attention
    )


def make_inputs(
    batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, grad: bool, seed: int
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, length, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    if not grad:
        return q, k, v, None
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, torch.randn(shape, generator=gen, dtype=dtype)


def run_once(
    impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out, causal: bool
) -> tuple[float, list[torch.Tensor]]:
    """One call (plus its backward when ``grad_out`` is given); returns seconds and results."""
    fn = _function(impl)
    if grad_out is not None:
        for t in (q, k, v):
            t.grad = None
    with _context(impl):
        start = time.perf_counter()
        out = fn(q, k, v, is_causal=causal)
        if grad_out is not None:
            out.backward(grad_out)
        elapsed = time.perf_counter() - start
    if grad_out is None:
        return elapsed, [out]
    return elapsed, [out.detach(), q.grad, k.grad, v.grad]


# ---------------------------------------------------------------------------------------------
# Timing grid
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    dtype: str
    mode: str
    causal: bool
    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    gflop: float
    times_s: dict[str, list[float]] = field(default_factory=dict)
    median_s: dict[str, float] = field(default_factory=dict)
    gflops: dict[str, float] = field(default_factory=dict)
    ratio_flash: float | None = None
    ratio_math: float | None = None
    max_abs_diff: float | None = None
    spread: float | None = None
    errors: dict[str, str] = field(default_factory=dict)
    # Our kernel's GFLOP/s over the peak of the path it takes here (roofline.Peaks.for_row with
    # the cpu backend: fp32 FMA, vdpbf16ps or AMX); None without a peak (fp64, --memory).
    peak_gflops: float | None = None
    peak_fraction: float | None = None


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def bench_cell(args, dtype, mode, causal, length, head_dim) -> Row:
    grad = mode == "fwd+bwd"
    flop = attention_flop(
        args.batch, args.heads, length, length, head_dim, causal=causal, mode=mode
    )
    row = Row(
        dtype=DTYPE_NAMES[dtype],
        mode=mode,
        causal=causal,
        batch=args.batch,
        heads=args.heads,
        seq_q=length,
        seq_kv=length,
        head_dim=head_dim,
        gflop=flop / 1e9,
    )
    impls = [i for i in args.impls if i != "torch-math" or length <= args.math_max_seq]
    q, k, v, grad_out = make_inputs(
        args.batch, args.heads, length, head_dim, dtype, grad, args.seed
    )
    results: dict[str, list[torch.Tensor]] = {}
    times: dict[str, list[float]] = {i: [] for i in impls}
    for rnd in range(args.warmup + args.reps):
        for impl in impls if rnd % 2 == 0 else impls[::-1]:
            if impl in row.errors:
                continue
            try:
                elapsed, res = run_once(impl, q, k, v, grad_out, causal)
            except Exception as exc:  # e.g. a torch backend that refuses this dtype
                row.errors[impl] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                continue
            if impl not in results and impl in ("ours", "torch-flash"):
                results[impl] = [r.detach().clone() for r in res]
            del res
            if rnd >= args.warmup:
                times[impl].append(elapsed)
    for impl in impls:
        if impl in row.errors or not times[impl]:
            continue
        ts = times[impl]
        row.times_s[impl] = ts
        row.median_s[impl] = statistics.median(ts)
        row.gflops[impl] = row.gflop / row.median_s[impl]
    row.ratio_flash = _paired_ratio(row.times_s, "torch-flash")
    row.ratio_math = _paired_ratio(row.times_s, "torch-math")
    if "ours" in results and "torch-flash" in results:
        row.max_abs_diff = _max_abs_diff(results["ours"], results["torch-flash"])
    spreads = [(max(t) - min(t)) / statistics.median(t) for t in row.times_s.values() if t]
    row.spread = max(spreads) if spreads else None
    return row


def _paired_ratio(times: dict[str, list[float]], other: str) -> float | None:
    """Median over repetitions of time(other) / time(ours), both timed in that repetition."""
    ours, theirs = times.get("ours"), times.get(other)
    if not ours or not theirs or len(ours) != len(theirs):
        return None
    return statistics.median(t / o for o, t in zip(ours, theirs, strict=True))


TABLE = [
    # header, width, getter
    ("dtype", 5, lambda r: r.dtype),
    ("mode", 7, lambda r: r.mode),
    ("causal", 6, lambda r: "on" if r.causal else "off"),
    ("L=S", 6, lambda r: str(r.seq_q)),
    ("E", 4, lambda r: str(r.head_dim)),
    ("ours ms", 9, lambda r: _fmt(r.median_s.get("ours"), 1e3, ".2f")),
    ("ours GF/s", 9, lambda r: _fmt(r.gflops.get("ours"), 1, ".1f")),
    ("flash GF/s", 10, lambda r: _fmt(r.gflops.get("torch-flash"), 1, ".1f")),
    ("math GF/s", 9, lambda r: _fmt(r.gflops.get("torch-math"), 1, ".1f")),
    ("% peak", 6, lambda r: _percent_of_peak(r.peak_fraction)),
    ("ours/flash", 10, lambda r: _fmt(r.ratio_flash, 1, ".2f")),
    ("ours/math", 9, lambda r: _fmt(r.ratio_math, 1, ".2f")),
    ("max|diff|", 9, lambda r: _fmt(r.max_abs_diff, 1, ".1e")),
    ("spread", 6, lambda r: _fmt(r.spread, 100, ".0f", "%")),
]


def _percent_of_peak(fraction: float | None) -> str:
    """At most 100%: above it (a peak probed while other work loaded the machine) reads
    "100%*", as in aigc-ext bench."""
    if fraction is None:
        return "-"
    return "100%*" if fraction > 1.0 else f"{fraction * 100:.0f}%"


def _fmt(value: float | None, mult: float, spec: str, suffix: str = "") -> str:
    if value is None:
        return "-"
    return format(value * mult, spec) + suffix


def _line(cells: list[str]) -> str:
    """Fixed-width line: the first three columns left-aligned, the numbers right-aligned."""
    parts = []
    for i, (cell, (_, width, _)) in enumerate(zip(cells, TABLE, strict=True)):
        parts.append(cell.ljust(width) if i < 3 else cell.rjust(width))
    return "  ".join(parts)


def print_header() -> None:
    print(_line([h for h, _, _ in TABLE]))
    print(_line(["-" * w for _, w, _ in TABLE]))


def print_row(row: Row) -> None:
    print(_line([get(row) for _, _, get in TABLE]), flush=True)
    for impl, err in row.errors.items():
        print(f"    {impl} failed: {err}", flush=True)


def _cell_name(r: Row) -> str:
    return f"L={r.seq_q} E={r.head_dim} causal={'on' if r.causal else 'off'}"


def summarize(rows: list[Row]) -> list[dict]:
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.dtype, r.mode), []).append(r)
    summary = []
    for (dtype, mode), rs in groups.items():
        entry: dict = {"dtype": dtype, "mode": mode, "cells": len(rs)}
        for key, attr in (("flash", "ratio_flash"), ("math", "ratio_math")):
            cells = [r for r in rs if getattr(r, attr) is not None]
            if not cells:
                continue
            ratios = [getattr(r, attr) for r in cells]
            worst = min(cells, key=lambda r, a=attr: getattr(r, a))
            entry[key] = {
                "cells": len(cells),
                "median": statistics.median(ratios),
                "min": getattr(worst, attr),
                "min_cell": _cell_name(worst),
            }
        # The roofline: the best cell, and the range over the long ones (L >= 2048, E >= 128),
        # where the two GEMMs dominate.
        scaled = [r for r in rs if r.peak_fraction is not None]
        if scaled:
            best = max(scaled, key=lambda r: r.peak_fraction)
            long = [r.peak_fraction for r in scaled if r.seq_q >= 2048 and r.head_dim >= 128]
            entry["peak"] = {
                "gflops": best.peak_gflops,
                "best": best.peak_fraction,
                "best_cell": _cell_name(best),
                "long_min": min(long) if long else None,
                "long_max": max(long) if long else None,
            }
        summary.append(entry)
    return summary


def print_summary(summary: list[dict]) -> None:
    print()
    print("summary (throughput ratio, > 1 means ours is faster):")
    for e in summary:
        parts = []
        for key in ("flash", "math"):
            s = e.get(key)
            if s is None:
                parts.append(f"vs torch-{key}: -")
                continue
            parts.append(
                f"vs torch-{key}: median {s['median']:.2f}, min {s['min']:.2f} "
                f"({s['min_cell']}) over {s['cells']} cells"
            )
        print(f"  {e['dtype']:<4} {e['mode']:<7}  " + "; ".join(parts))
    peaks = [e for e in summary if "peak" in e]
    if peaks:
        print(
            "ours as % of the peak of its path (peak line above; 100%* = above a peak probed low):"
        )
    for e in peaks:
        p = e["peak"]
        text = f"best {_percent_of_peak(p['best'])} ({p['best_cell']})"
        if p["long_min"] is not None:
            lo, hi = _percent_of_peak(p["long_min"]), _percent_of_peak(p["long_max"])
            text += f"; L >= 2048, E >= 128: {lo}" + (f" to {hi}" if hi != lo else "")
        print(f"  {e['dtype']:<4} {e['mode']:<7}  of {p['gflops']:.1f} GFLOP/s: {text}")


def set_peak_fraction(row: Row, peaks: Peaks | None) -> None:
    """Our kernel's fraction of the peak of its path (the cpu backend's rows of the roofline)."""
    peak = peaks.for_row(row.dtype, CPU_KERNEL_BACKEND) if peaks is not None else None
    ours = row.gflops.get("ours")
    if peak and ours is not None:
        row.peak_gflops = peak
        row.peak_fraction = ours / peak


def run_grid(args) -> tuple[list[Row], list[dict]]:
    print(
        f"grid: B={args.batch} H={args.heads}, reps={args.reps} (median), warmup={args.warmup}, "
        f"torch-math only where L <= {args.math_max_seq}; order per rep: {', '.join(args.impls)}, reversed every other rep"
    )
    print()
    print_header()
    rows = []
    for dtype in args.dtypes:
        for mode in args.modes:
            for causal in args.causal:
                for length in args.seqs:
                    for head_dim in args.head_dims:
                        row = bench_cell(args, dtype, mode, causal, length, head_dim)
                        set_peak_fraction(row, args.peaks)
                        print_row(row)
                        rows.append(row)
                        gc.collect()
    summary = summarize(rows)
    print_summary(summary)
    return rows, summary


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


# /proc/self/status readings and the VmHWM reset are shared with `aigc-ext bench`.
_proc_status_kib = status_kib
_reset_peak_rss = reset_peak_rss


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak_kib(method: str) -> int:
    if method == "VmHWM":
        return _proc_status_kib("VmHWM")["VmHWM"]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _rss_kib() -> int:
    return _proc_status_kib("VmRSS")["VmRSS"]


def measure_memory(cfg: dict) -> dict:
    """Runs in a fresh process: peak RSS of one call beyond its inputs and outputs."""
    torch.set_num_threads(cfg["threads"])
    build = _extension_file().get("sha256")
    dtype = DTYPES[cfg["dtype"]]
    grad = cfg["mode"] == "fwd+bwd"
    # A small call first, so thread pools, lazily loaded code and GEMM kernels exist already.
    small = make_inputs(1, 2, 256, cfg["head_dim"], dtype, grad, 1)
    run_once(cfg["impl"], *small, cfg["causal"])
    del small
    q, k, v, grad_out = make_inputs(
        cfg["batch"], cfg["heads"], cfg["seq"], cfg["head_dim"], dtype, grad, cfg["seed"]
    )
    _trim_heap()
    method = "VmHWM" if _reset_peak_rss() else "ru_maxrss"
    base = _rss_kib() if method == "VmHWM" else _peak_kib(method)
    elapsed, results = run_once(cfg["impl"], q, k, v, grad_out, cfg["causal"])
    peak = _peak_kib(method)
    after = _rss_kib()
    out_bytes = sum(r.numel() * r.element_size() for r in results)
    in_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, grad_out) if t is not None)
    mib = 1024.0
    return {
        "method": method,
        "extension_sha256": build,
        "elapsed_s": elapsed,
        "inputs_mib": in_bytes / 2**20,
        "outputs_mib": out_bytes / 2**20,
        "peak_growth_mib": (peak - base) / mib,
        "peak_extra_mib": (peak - base) / mib - out_bytes / 2**20,
        "retained_extra_mib": (after - base) / mib - out_bytes / 2**20,
    }


def _memory_child(conn, cfg: dict) -> None:
    try:
        result = measure_memory(cfg)
    except BaseException as exc:
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
    conn.send(result)
    conn.close()


def _in_fresh_process(cfg: dict) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child, args=(child, cfg))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": "child process died"}
    proc.join()
    if proc.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"child exit code {proc.exitcode}"
    if proc.exitcode is not None and proc.exitcode < 0:
        sig = signal.Signals(-proc.exitcode)
        hint = " (out of memory?)" if sig == signal.SIGKILL else ""
        result["error"] = f"child process ended by {sig.name}{hint}"
    return result


def _memory_configs(args) -> Iterator[dict]:
    plan = [("fwd", args.memory_seq)]
    if args.memory_bwd_seq > 0:
        plan.append(("fwd+bwd", args.memory_bwd_seq))
    for mode, seq in plan:
        impls = [i for i in args.impls if i != "torch-math" or seq <= args.math_max_seq]
        for dtype in args.dtypes:
            for causal in args.causal:
                for impl in impls:
                    yield {
                        "impl": impl,
                        "dtype": DTYPE_NAMES[dtype],
                        "mode": mode,
                        "causal": causal,
                        "batch": args.batch,
                        "heads": args.heads,
                        "seq": seq,
                        "head_dim": args.memory_head_dim,
                        "threads": args.threads,
                        "seed": args.seed,
                    }


def run_memory(args) -> list[dict]:
    print(
        "peak resident memory of one call beyond its inputs and outputs (MiB), each in a fresh "
        f"process; B={args.batch} H={args.heads} E={args.memory_head_dim}"
    )
    print(
        "method: VmHWM reset through /proc/self/clear_refs just before the call "
        "(ru_maxrss growth where that is not possible)"
    )
    print()
    head = (
        f"{'dtype':<5}  {'mode':<7}  {'causal':<6}  {'L=S':>6}  {'impl':<11}  {'extra MiB':>9}  "
        f"{'retained':>8}  {'in MiB':>7}  {'out MiB':>7}  {'1 score matrix':>14}  {'time s':>7}"
    )
    print(head)
    print("-" * len(head))
    rows = []
    for cfg in _memory_configs(args):
        res = _in_fresh_process(cfg)
        row = {**cfg, **res}
        # One fp32 (B, H, L, S) score matrix: what a non-fused implementation materializes.
        row["score_matrix_mib"] = 4.0 * cfg["batch"] * cfg["heads"] * cfg["seq"] ** 2 / 2**20
        rows.append(row)
        prefix = (
            f"{cfg['dtype']:<5}  {cfg['mode']:<7}  {'on' if cfg['causal'] else 'off':<6}  "
            f"{cfg['seq']:>6}  {cfg['impl']:<11}  "
        )
        if "error" in res:
            print(prefix + f"failed: {res['error']}", flush=True)
            continue
        method = "" if res["method"] == "VmHWM" else f"  ({res['method']})"
        if res.get("extension_sha256") != args.extension_sha256:
            method += f"  (other aigc_ext build: {res.get('extension_sha256')})"
        print(
            prefix + f"{res['peak_extra_mib']:>9.1f}  {res['retained_extra_mib']:>8.1f}  "
            f"{res['inputs_mib']:>7.1f}  {res['outputs_mib']:>7.1f}  "
            f"{row['score_matrix_mib']:>14.0f}  {res['elapsed_s']:>7.2f}{method}",
            flush=True,
        )
    print()
    print(
        "extra MiB: peak RSS during the call minus RSS before it, minus the outputs "
        "(out, and grad_q/k/v for fwd+bwd); retained: the same after the call returned"
    )
    return rows


def warn_if_rebuilt(info: dict) -> dict | None:
    """The extension file as it is now, if it differs from the one described in ``info``."""
    now = _extension_file()
    if now.get("sha256") == info["extension"].get("sha256"):
        return None
    print(
        f"WARNING: {now.get('path', 'aigc_ext._C')} changed on disk during the run "
        f"(sha256 {info['extension'].get('sha256')} at start, {now.get('sha256')} now): "
        "the results may mix two builds"
    )
    return now


# ---------------------------------------------------------------------------------------------


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _kernel_settings(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    """``--cpu-kernel`` items as keyword arguments of ``cpu_kernel_config``."""
    known = {"isa": str, "use_brgemm": bool, "use_amx": bool, "use_avx512_bf16": bool}
    settings: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            parser.error(
                f"--cpu-kernel: {item!r} is not KEY=VALUE with KEY one of {', '.join(known)}"
            )
        if known[key] is bool and value != "auto":
            if value.lower() not in ("0", "1", "true", "false", "on", "off"):
                parser.error(f"--cpu-kernel: {key} takes 0/1, true/false or on/off, not {value!r}")
            settings[key] = value.lower() in ("1", "true", "on")
        else:
            settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cpu_kernel:
        aigc_ext.ops.cpu_kernel_config(**args.cpu_kernel)
    info = machine_info(args.threads)
    args.peaks = None
    if args.emulate:
        info["emulation"] = emulate.EMULATIONS[args.emulate].describe()
    if not args.memory:
        # The roofline of aigc-ext bench: fp32 FMA probe, a bounded bf16/fp16 matmul only where
        # the CPU has hardware for the dtype (about a second per probe on any machine).
        names = [DTYPE_NAMES[d] for d in args.dtypes if DTYPE_NAMES[d] != "fp64"]
        args.peaks = cpu_peaks(list(dict.fromkeys(names)), args.threads)
        info["peaks"] = args.peaks.as_dict()
    print_machine_info(info)
    print()
    report: dict = {
        "machine": info,
        "argv": sys.argv[1:] if argv is None else argv,
        "settings": {
            "dtypes": [DTYPE_NAMES[d] for d in args.dtypes],
            "seqs": args.seqs,
            "head_dims": args.head_dims,
            "batch": args.batch,
            "heads": args.heads,
            "modes": args.modes,
            "causal": args.causal,
            "impls": args.impls,
            "reps": args.reps,
            "warmup": args.warmup,
            "math_max_seq": args.math_max_seq,
            "cpu_kernel": args.cpu_kernel,
            "emulate": args.emulate,
            "flop_model": "fwd 4*B*H*L*S*E (halved if causal); fwd+bwd 3.5x fwd",
        },
    }
    args.extension_sha256 = info["extension"].get("sha256")
    start = time.perf_counter()
    if args.memory:
        report["memory_rows"] = run_memory(args)
    else:
        rows, summary = run_grid(args)
        report["rows"] = [asdict(r) for r in rows]
        report["summary"] = summary
    report["wall_s"] = time.perf_counter() - start
    report["extension_at_end"] = warn_if_rebuilt(info) or info["extension"]
    print(f"\nwall time: {report['wall_s']:.1f} s")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(report), indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
