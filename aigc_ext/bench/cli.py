"""``aigc-ext bench``: the command line over :func:`aigc_ext.bench.run`.

Exit codes: 0 every row that ran is correct; 1 a row fails the error rule or an aigc_ext
backend raised (``compare``: a regression); 2 usage error (unknown backend, impossible shape,
bad value, unreadable file), reported before anything runs; 130 interrupted (the rows done so
far are printed and saved).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from aigc_ext.bench.config import BenchConfig, UsageError, full_config, quick_config

__all__ = ["add_arguments", "add_parser", "config_from_args", "main"]

DESCRIPTION = """\
Times every attention implementation available here (aigc_ext backends, torch SDPA backends,
FlexAttention, flash-attn, xformers) on a sweep of shapes, checks each result against a float64
reference with FlashAttention's error rule, and prints a table (optionally JSON, CSV, a plot).
"""

EPILOG = """\
List options take space- or comma-separated values; options given with --quick or --full
override the preset. Exit codes: 0 ok, 1 a row fails the error rule (or an aigc_ext backend
raised), 2 usage error, 130 interrupted.
Compare two runs: aigc-ext bench compare A.json B.json [--threshold 0.05].
FlashAttention features instead of the sweep: aigc-ext bench --feature all [--quick].
"""

_SWEEP_INT = {
    "batch": "batch sizes B",
    "heads": "query heads H",
    "kv_heads": "key/value heads (grouped-query attention; default: = heads)",
    "seq": "query lengths L",
    "kv_seq": "key lengths S (default: S = L)",
    "decode_seq": "KV cache lengths of decode rows (default: --kv-seq or --seq)",
    "head_dim": "query/key head dims E",
    "head_dim_v": "value head dims Ev (default: = E)",
}
_SWEEP_STR = {
    "dtype": "fp32 bf16 fp16",
    "causal": "on off",
    "mask": "none padding arbitrary",
    "mode": "fwd bwd fwd+bwd decode",
    "backends": "implementation names (default: all; see aigc-ext info and torch-*)",
}
_CAUSAL = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``aigc-ext bench`` (shared by the subcommand and :func:`main`)."""
    preset = p.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick",
        action="store_true",
        help="small sweep, within a minute on 2 CPU cores: fp32 bf16, causal L=S 256 1024, "
        "E 64, H 8, fwd fwd+bwd, decode at S 4096, no warm-up, 3 reps, no FlexAttention",
    )
    preset.add_argument(
        "--full",
        action="store_true",
        help="fp32 bf16 fp16, L=S 512..4096, E 64 128, causal on off, masks none padding, "
        "fwd bwd fwd+bwd, decode at S 4096 16384",
    )
    for name, text in _SWEEP_INT.items():
        p.add_argument(f"--{name.replace('_', '-')}", nargs="+", metavar="N", help=text)
    for name, text in _SWEEP_STR.items():
        p.add_argument(f"--{name.replace('_', '-')}", nargs="+", metavar="X", help=text)
    p.add_argument(
        "--shape",
        nargs=3,
        action="append",
        metavar=("Q", "K", "V"),
        help="an explicit problem as query, key and value shapes B,H,L,E B,HKV,S,E B,HKV,S,EV "
        "(repeatable; replaces the shape options)",
    )
    p.add_argument("--reps", type=int, help="timed runs per row (default: 5, --quick: 3)")
    p.add_argument(
        "--warmup", type=int, help="untimed rounds before the checked call (default 1, --quick 0)"
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's current count)")
    p.add_argument("--device", help="cpu (default) or cuda[:N]")
    p.add_argument("--seed", type=int, help="input seed (default 0)")
    p.add_argument(
        "--flex-compile-budget",
        type=float,
        metavar="SECONDS",
        help="total torch.compile time FlexAttention may spend (default 120; 0 skips it, "
        "as --quick does)",
    )
    p.add_argument(
        "--max-time",
        type=float,
        metavar="SECONDS",
        help="stop timing an implementation on a row once its timed runs add up to this "
        "(it always gets one; default 10, --quick 0.15)",
    )
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--json", metavar="PATH", help="write the rows and the machine as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of throughput vs length")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--feature",
        nargs="+",
        metavar="NAME",
        help="instead of the sweep, benchmark FlashAttention features of the CPU operators: "
        "varlen window softcap paged-decode, or all (takes --quick --dtype --mode --reps "
        "--warmup --threads --seed --max-time --json; see docs/benchmarking.md)",
    )


def _add_compare(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "compare",
        help="compare two --json results (B relative to A)",
        description="Per-row time ratios B/A, matched by case and backend; exit 1 when a row "
        "regressed beyond the threshold.",
    )
    c.add_argument("a", metavar="A.json")
    c.add_argument("b", metavar="B.json")
    c.add_argument(
        "--threshold",
        type=float,
        default=0.05,
        help="allowed slow-down before a row counts as a regression (default 0.05 = 5%%)",
    )


def _build_parser(prog: str = "aigc-ext bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)
    return p


def _configure(p: argparse.ArgumentParser) -> None:
    add_arguments(p)
    sub = p.add_subparsers(dest="bench_command", metavar="{compare}")
    _add_compare(sub)
    p.set_defaults(func=_dispatch)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds ``bench`` (and ``bench compare``) to the ``aigc-ext`` parser."""
    p = sub.add_parser(
        "bench",
        help="benchmark and check the attention implementations",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)


# ----------------------------------------------------------------------------- parsing


def _split(values: list[str]) -> list[str]:
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


def _ints(option: str, values: list[str]) -> list[int]:
    out = []
    for v in _split(values):
        try:
            out.append(int(v))
        except ValueError:
            raise UsageError(f"--{option}: expected integers, got {v!r}") from None
    return out


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(
            f"--shape: expected comma-separated integers B,H,L,E, got {text!r}"
        ) from None


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` the options describe (preset, then explicit options)."""
    if args.quick:
        config = quick_config()
    elif args.full:
        config = full_config()
    else:
        config = BenchConfig()
    over: dict[str, object] = {}
    for name in _SWEEP_INT:
        values = getattr(args, name)
        if values is not None:
            over[name] = _ints(name.replace("_", "-"), values)
    for name in _SWEEP_STR:
        values = getattr(args, name)
        if values is not None:
            over[name] = _split(values)
    if "causal" in over:
        causal = []
        for v in over["causal"]:
            if v.lower() == "both":
                causal += [False, True]
            elif v.lower() in _CAUSAL:
                causal.append(_CAUSAL[v.lower()])
            else:
                raise UsageError(f"--causal: unknown value {v!r}; expected on, off or both")
        over["causal"] = list(dict.fromkeys(causal))
    if "dtype" in over:  # accept torch's spellings too
        alias = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
        over["dtype"] = [alias.get(d.lower(), d.lower()) for d in over["dtype"]]
    if args.shape:
        over["shapes"] = [tuple(_shape(s) for s in triple) for triple in args.shape]
    for option, name in (
        ("reps", "reps"),
        ("warmup", "warmup"),
        ("threads", "threads"),
        ("device", "device"),
        ("seed", "seed"),
        ("flex_compile_budget", "flex_compile_budget_s"),
        ("max_time", "max_time_s"),
    ):
        if getattr(args, option) is not None:
            over[name] = getattr(args, option)
    if args.no_memory:
        over["memory"] = False
    known = {f.name for f in fields(BenchConfig)}
    assert set(over) <= known, set(over) - known
    config = config.with_overrides(**over)
    config.validate()
    return config


# ----------------------------------------------------------------------------- commands


def _error(message: str) -> int:
    print(f"aigc-ext bench: error: {message}", file=sys.stderr)
    return 2


def _dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", None) == "compare":
        return _compare(args)
    if getattr(args, "feature", None) is not None:
        from aigc_ext.bench.features.cli import run_command

        return run_command(args)
    return _bench(args)


def _compare(args: argparse.Namespace) -> int:
    from aigc_ext.bench.compare import compare_docs, load_results, print_comparison

    try:
        a, b = load_results(args.a), load_results(args.b)
        comparisons, only_a, only_b = compare_docs(a, b, args.threshold)
    except UsageError as exc:
        return _error(str(exc))
    print_comparison(a, b, comparisons, only_a, only_b, args.threshold, console=_stdout())
    return 1 if any(c.regressed for c in comparisons) else 0


def _stdout():
    from rich.console import Console

    # Not a terminal (a pipe, a file): wide enough for the table instead of rich's 80 columns.
    return Console(width=None if sys.stdout.isatty() else 200)


def _bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from aigc_ext.bench.report import ResultWriter, machine_description, print_table, write_plot
    from aigc_ext.bench.runner import exit_code, measure_peaks, prepare, run

    try:
        config = config_from_args(args)
        prepare(config)  # unknown backends, device: before anything runs
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UsageError(
                    "--plot needs matplotlib (pip install 'aigc_ext[bench]')"
                ) from None
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
        disable=args.no_progress or not err.is_terminal,
    )
    rows: list = []
    interrupted = False
    with progress:
        task = progress.add_task("peak probes", total=len(config.cases()))
        peaks = measure_peaks(config)
        machine = machine_description(config, peaks)
        writer = None
        if args.json or args.csv:
            writer = ResultWriter(args.json, args.csv, machine, config)

        def on_row(row) -> None:
            rows.append(row)
            if writer is not None:
                writer.add(row)

        def on_progress(done: int, total: int, text: str) -> None:
            progress.update(task, completed=done, description=text[-90:])

        try:
            run(config, peaks=peaks, on_row=on_row, on_progress=on_progress)
        except KeyboardInterrupt:
            interrupted = True
    print_table(rows, console=_stdout(), machine=machine)
    if writer is not None and not interrupted:
        writer.finish()
    if args.plot and rows:
        path = write_plot(rows, args.plot)
        print(f"plot: {path}")
    for what, path in (("json", args.json), ("csv", args.csv)):
        if path:
            print(f"{what}: {path}" + (" (incomplete: interrupted)" if interrupted else ""))
    if interrupted:
        return 130
    return exit_code(rows)


def main(argv: list[str] | None = None) -> int:
    """``aigc-ext bench`` as a function: returns the exit code (argparse errors: 2)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse usage error (2)
        return int(exc.code or 0)
    return args.func(args)
