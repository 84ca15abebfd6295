"""Benchmark and correctness check of every attention implementation available here.

``aigc-ext bench`` is a thin layer over this API::

    from aigc_ext import bench

    config = bench.quick_config().with_overrides(dtype=["bf16"], mode=["fwd"])
    rows = bench.run(config)             # one Row per (case, backend)
    bench.print_table(rows)
    exit_code = bench.exit_code(rows)    # 1 when a row fails the error rule

    bench.main(["--quick", "--json", "out.json"])  # the command line, returns the exit code

Modules: :mod:`~aigc_ext.bench.config` (the sweep), :mod:`~aigc_ext.bench.impls` (the
implementations), :mod:`~aigc_ext.bench.measure` (clocks, memory, matmul peak),
:mod:`~aigc_ext.bench.correctness` (the error rule), :mod:`~aigc_ext.bench.runner` (the sweep
loop), :mod:`~aigc_ext.bench.report` (table, JSON, CSV, plot), :mod:`~aigc_ext.bench.compare`
and :mod:`~aigc_ext.bench.cli`.
"""

from __future__ import annotations

from aigc_ext.bench.cli import main
from aigc_ext.bench.config import (
    BenchConfig,
    Case,
    UsageError,
    attention_flop,
    full_config,
    quick_config,
)
from aigc_ext.bench.report import SCHEMA, ResultWriter, print_table, record, write_plot
from aigc_ext.bench.runner import Row, exit_code, measure_peaks, run

__all__ = [
    "SCHEMA",
    "BenchConfig",
    "Case",
    "ResultWriter",
    "Row",
    "UsageError",
    "attention_flop",
    "exit_code",
    "full_config",
    "main",
    "measure_peaks",
    "print_table",
    "quick_config",
    "record",
    "run",
    "write_plot",
]
