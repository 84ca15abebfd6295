"""``aigc-ext bench --feature NAME``: the feature benchmarks from the bench command line.

The options it takes are the bench command's ``--quick`` (and ``--full``, the default sizes),
``--dtype``, ``--mode``, ``--reps``, ``--warmup``, ``--threads``, ``--seed``, ``--max-time``,
``--json`` and ``--no-progress``; every sweep option (``--seq``, ``--backends``, ...) is a usage error here.
Exit codes: 0 every row ran and passed its output check (a missed target is reported, not an
error), 1 a check failed or an operator raised, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from aigc_ext.bench.features.config import (
    FeatureConfig,
    UsageError,
    full_feature_config,
    parse_features,
    quick_feature_config,
)

__all__ = ["ACCEPTED_OPTIONS", "config_from_args", "run_command"]

ACCEPTED_OPTIONS = (
    "--quick",
    "--full",
    "--dtype",
    "--mode",
    "--reps",
    "--warmup",
    "--threads",
    "--seed",
    "--max-time",
    "--json",
    "--no-progress",
)
# The sweep's options (argparse destinations), which mean nothing to the feature benchmarks.
_SWEEP_ONLY = (
    "batch",
    "heads",
    "kv_heads",
    "seq",
    "kv_seq",
    "decode_seq",
    "head_dim",
    "head_dim_v",
    "causal",
    "mask",
    "backends",
    "shape",
    "flex_compile_budget",
    "no_memory",
    "csv",
    "plot",
)
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def _split(values: list[str]) -> tuple[str, ...]:
    return tuple(part.strip() for v in values for part in v.split(",") if part.strip())


def config_from_args(args: argparse.Namespace) -> FeatureConfig:
    """The :class:`FeatureConfig` of the parsed bench options; :class:`UsageError` for an
    option that does not apply or a bad value."""
    for name in _SWEEP_ONLY:
        if getattr(args, name, None) not in (None, False):
            option = "--" + name.replace("_", "-")
            raise UsageError(
                f"{option} does not apply to --feature (it takes {', '.join(ACCEPTED_OPTIONS)})"
            )
    device = getattr(args, "device", None)
    if device is not None and device != "cpu":
        raise UsageError(f"--device {device}: the feature benchmarks run on the CPU only")
    config = quick_feature_config() if getattr(args, "quick", False) else full_feature_config()
    over: dict[str, object] = {"features": parse_features(args.feature)}
    if getattr(args, "dtype", None):
        over["dtypes"] = tuple(_DTYPE_ALIASES.get(d.lower(), d.lower()) for d in _split(args.dtype))
    if getattr(args, "mode", None):
        over["modes"] = tuple(m.lower() for m in _split(args.mode))
    for option, name in (
        ("reps", "reps"),
        ("warmup", "warmup"),
        ("threads", "threads"),
        ("seed", "seed"),
        ("max_time", "max_time_s"),
    ):
        if getattr(args, option, None) is not None:
            over[name] = getattr(args, option)
    config = config.with_overrides(**over)
    config.validate()
    return config


def _error(message: str) -> int:
    print(f"aigc-ext bench: error: {message}", file=sys.stderr)
    return 2


def _stdout():
    from rich.console import Console

    # Not a terminal (a pipe, a file): wide enough for the tables instead of rich's 80 columns.
    return Console(width=None if sys.stdout.isatty() else 200)


def run_command(args: argparse.Namespace) -> int:
    """Runs the feature benchmarks the options describe, prints the tables; the exit code."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from aigc_ext.bench.features.report import machine, print_feature_tables, write_json
    from aigc_ext.bench.features.runner import exit_code, plan, run_features

    try:
        config = config_from_args(args)
        plan(config)  # validates, and asks the CPU about bf16 before anything runs
    except UsageError as exc:
        return _error(str(exc))
    err = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=getattr(args, "no_progress", False) or not err.is_terminal,
    )
    rows: list = []
    interrupted = False
    with progress:
        task = progress.add_task("features", total=None)

        def on_progress(done: int, total: int, text: str) -> None:
            progress.update(task, completed=done, total=total, description=text)

        def on_warning(text: str) -> None:
            err.print(f"warning: {text}", style="yellow", highlight=False, soft_wrap=True)

        try:
            run_features(config, on_row=rows.append, on_progress=on_progress, on_warning=on_warning)
        except KeyboardInterrupt:
            interrupted = True
    machine_doc = machine()
    if config.threads is not None:
        machine_doc["cpu"]["threads"] = config.threads
    print_feature_tables(rows, console=_stdout(), machine_doc=machine_doc)
    if getattr(args, "json", None):
        path = write_json(args.json, rows, config, machine_doc, complete=not interrupted)
        print(f"json: {path}" + (" (incomplete: interrupted)" if interrupted else ""))
    if interrupted:
        return 130
    return exit_code(rows)
