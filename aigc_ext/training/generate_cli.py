"""``aigc-ext generate``: sample text from a trained causal language model.

::

    aigc-ext generate RUN_OR_CHECKPOINT_DIR --prompt "TEXT" [--prompt "TEXT" ...]
        [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--device DEV] [--json]
    aigc-ext generate DIR --prompt-file PROMPTS.txt|PROMPTS.jsonl [...]

A prompt file holds one prompt per line, or JSON lines with a ``"prompt"`` field (a file whose
first non-blank line starts with ``{``); blank lines are skipped. The text output is each
prompt followed by its continuation, a blank line between prompts; ``--json`` prints one JSON
object per prompt (``prompt``, ``completion``, ``tokens``: the number of new tokens,
``finish_reason``, ``seed``).

Exit status: 0 on success, 2 for bad input (a missing directory, one without a causal LM, an
empty prompt file, an option out of range: one line naming it), 1 when generation failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

__all__ = ["add_parser", "read_prompt_file", "run"]

EPILOG = """\
examples:
  aigc-ext generate runs/clm-pretrain --prompt "Return the" --seed 0
  aigc-ext generate runs/my-sft/hf --prompt-file prompts.jsonl --json --temperature 0
  aigc-ext generate runs/clm-pretrain/checkpoints/step-200 --prompt "The " --top-p 0.9

--temperature 0 is greedy decoding; the same --seed gives the same text.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the ``generate`` subcommand to the ``aigc-ext`` parser."""
    from aigc_ext.training.generate import SamplingOptions

    defaults = SamplingOptions()
    p = sub.add_parser(
        "generate",
        help="sample text from a trained causal language model",
        description="Continue prompts with the causal LM of a run, a checkpoint or a "
        "save_pretrained directory (KV cache, aigc_ext attention).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="DIR", help="a run's output, a checkpoint or a model dir")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    prompts.add_argument(
        "--prompt-file", metavar="FILE", help="one prompt per line, or JSONL with 'prompt'"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        metavar="N",
        help=f"tokens to add at most (default {defaults.max_new_tokens})",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        metavar="T",
        help=f"softmax temperature, 0 for greedy (default {defaults.temperature})",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=defaults.top_p,
        metavar="P",
        help=f"nucleus sampling mass in (0, 1] (default {defaults.top_p})",
    )
    p.add_argument("--seed", type=int, metavar="S", help="seed (default: a random one)")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=run)


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of ``path``: JSON lines with a ``"prompt"`` string when the first
    non-blank line starts with ``{``, else one prompt per line; blank lines are skipped.

    Raises :class:`~aigc_ext.training.generate_sources.GenerationError` naming the file (and
    the line) for a missing, unreadable or empty file and a JSON line without a prompt.
    """
    from aigc_ext.training.generate_sources import GenerationError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenerationError(f"--prompt-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GenerationError(f"--prompt-file {path}: unreadable: {exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise GenerationError(f"--prompt-file {path}: no prompts (the file is empty)")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise GenerationError(f"--prompt-file {path}, line {n}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise GenerationError(
                f"--prompt-file {path}, line {n}: expected an object with a string 'prompt' field"
            )
        prompts.append(row["prompt"])
    return prompts


def run(args: argparse.Namespace) -> int:
    """Runs ``aigc-ext generate`` with parsed arguments; returns the exit status."""
    from aigc_ext.training.generate import generate
    from aigc_ext.training.generate_sources import GenerationError

    try:
        prompts = args.prompt if args.prompt else read_prompt_file(args.prompt_file)
        completions = generate(
            args.source,
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            device=args.device,
        )
    except GenerationError as exc:
        print(f"aigc-ext generate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aigc-ext generate: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("aigc-ext generate: generation failed (traceback above)", file=sys.stderr)
        return 1
    for i, c in enumerate(completions):
        if args.json:
            print(json.dumps(c.as_dict(), ensure_ascii=False))
        else:
            print(("\n" if i else "") + c.prompt + c.completion)
    return 0
