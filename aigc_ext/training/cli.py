"""``aigc-ext train``: run a training configuration or a recipe from the command line.

::

    aigc-ext train CONFIG.toml [--max-steps N] [--output DIR] [--resume] [--set KEY=VALUE ...]
    aigc-ext train --recipe NAME [...]
    aigc-ext train --list-recipes

Exit status: 0 when the run finished (``--resume`` of a run that had already finished trains
nothing, changes no file and says so), 2 for a configuration mistake (the message, no
traceback; an ``AIGC_EXT_BACKEND`` naming no usable backend among them), 1 when training failed,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  aigc-ext train run.toml
  aigc-ext train --recipe NAME --max-steps 200 --output runs/try
  aigc-ext train run.toml --set run.lr=1e-3 --set model.n_layer=4
  aigc-ext train run.toml --resume        (continue from the newest usable checkpoint)

--set KEY=VALUE reads VALUE as a TOML value (1e-3, true, "text", [1, 2], { p = 0.5 });
anything else is taken as a string. Launch with torchrun for data-parallel training.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the ``train`` subcommand to the ``aigc-ext`` parser."""
    p = sub.add_parser(
        "train",
        help="train a model from a TOML configuration or a recipe",
        description="Train a model from a TOML configuration or a named recipe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", metavar="CONFIG.toml", help="the run's configuration")
    p.add_argument("--recipe", metavar="NAME", help="start from this recipe (see --list-recipes)")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    p.add_argument("--max-steps", type=int, metavar="N", help="set run.max_steps")
    p.add_argument("--output", metavar="DIR", help="set run.output_dir")
    p.add_argument("--device", metavar="DEV", help="set run.device (auto, cpu, cuda, cuda:N)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest usable checkpoint"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration key (repeatable)",
    )
    p.set_defaults(func=run)


def _list_recipes() -> int:
    from aigc_ext.training import components

    components._load_builtins()
    if not components.RECIPES:
        print("no recipes registered")
        return 0
    width = max(len(name) for name in components.RECIPES)
    for name in sorted(components.RECIPES):
        print(f"{name:<{width}}  {components.RECIPES[name].description}")
    return 0


class _ProgressBarFilter(logging.Filter):
    """Per-step lines are left to the progress bar when the terminal shows one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "aigc_ext.training.metrics" and sys.stderr.isatty())


def _console_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    rank = os.environ.get("RANK", "0")
    handler.setLevel(logging.INFO if rank in ("", "0") else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_ProgressBarFilter())
    return handler


def run(args: argparse.Namespace) -> int:
    """Runs ``aigc-ext train`` with parsed arguments; returns the exit status."""
    if args.list_recipes:
        return _list_recipes()
    from aigc_ext.training.config import ConfigError, parse_override

    if args.config is None and args.recipe is None:
        print("aigc-ext train: give a CONFIG.toml or --recipe NAME", file=sys.stderr)
        return 2
    try:
        overrides: dict = {}
        for text in args.overrides:
            key, value = parse_override(text)
            overrides[key] = value
        if args.recipe is not None:
            overrides["recipe"] = args.recipe
        if args.max_steps is not None:
            overrides["run.max_steps"] = args.max_steps
        if args.output is not None:
            overrides["run.output_dir"] = args.output
        if args.device is not None:
            overrides["run.device"] = args.device
    except ConfigError as exc:
        print(f"aigc-ext train: {exc}", file=sys.stderr)
        return 2
    source = args.config if args.config is not None else {"recipe": args.recipe}

    from aigc_ext.training.checkpoint import CheckpointError
    from aigc_ext.training.loop import logger, train

    handler = _console_handler()
    logger.addHandler(handler)
    try:
        result = train(source, resume=args.resume, overrides=overrides)
    except ConfigError as exc:
        print(f"aigc-ext train: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"aigc-ext train: checkpoint error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aigc-ext train: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("aigc-ext train: training failed (traceback above)", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
    if os.environ.get("RANK", "0") not in ("", "0"):
        return 0
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    print(f"step {result.step}: {metrics}")
    if result.already_finished:
        print(
            f"output: {result.output_dir} (already finished at step {result.step}: "
            "nothing trained, no file changed)"
        )
    else:
        print(f"output: {result.output_dir} ({result.wall_time:.1f} s)")
    return 0
