"""What a training run leaves in its output directory, and what it reports.

::

    <output_dir>/config.json         the complete configuration (loads back unchanged)
    <output_dir>/metrics.jsonl       one JSON object per logged step and per evaluation
    <output_dir>/train.log           the run's log lines
    <output_dir>/model.safetensors   the final weights
    <output_dir>/model.json          the step, the components and the last metrics
    <output_dir>/adapter/            a run with adapters (LoRA): the adapter alone
    <output_dir>/hf/                 a transformers model: save_pretrained of the model and
                                     its tokenizer (see :mod:`aigc_ext.training.hf_export`)
    <output_dir>/checkpoints/        see :mod:`aigc_ext.training.checkpoint`

Every file but the appended ``metrics.jsonl`` and ``train.log`` is replaced atomically
(:mod:`aigc_ext.training.files`), so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aigc_ext.training.files import atomic_write, atomic_write_text

__all__ = [
    "ADAPTER_DIR",
    "CONFIG_FILE",
    "LOG_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "MODEL_INFO_FILE",
    "MetricsWriter",
    "RunResult",
    "describe_attention",
    "final_model_step",
    "jsonable",
    "truncate_metrics",
    "write_adapter",
    "write_checkpoint_hf",
    "write_config",
    "write_final_model",
]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
MODEL_INFO_FILE = "model.json"
ADAPTER_DIR = "adapter"  # runs with adapters: the adapter alone, see write_adapter
LOG_FILE = "train.log"


@dataclass
class RunResult:
    """What a finished (or stopped) run reports.

    ``metrics`` holds the last training metrics (``loss``, ``lr``, ``grad_norm``) and the last
    evaluation's (``eval/...``); ``attention`` how many attention calls each aigc_ext backend
    served during the run; ``model`` the trained model (not wrapped for DDP).

    ``already_finished`` is set when a resumed run had already reached its last step: nothing
    was built, trained or written; ``metrics`` are those its last checkpoint recorded and
    ``model`` is None (the weights are in ``<output_dir>/model.safetensors``).
    """

    output_dir: Path
    step: int
    epoch: int
    metrics: dict[str, float]
    wall_time: float
    attention: dict[str, int]
    checkpoint: Path | None = None
    resumed_from: Path | None = None
    stopped_early: bool = False
    already_finished: bool = False
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)


def describe_attention(usage: Mapping[str, int]) -> str:
    """``{"cpu": 1234}`` -> ``"cpu (1234 calls)"``."""
    if not usage:
        return "none (the model made no aigc_ext attention calls)"
    return ", ".join(f"{name} ({count} calls)" for name, count in sorted(usage.items()))


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (anything JSON cannot hold becomes its ``repr``)."""
    return json.loads(json.dumps(value, default=repr))


def _plain_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a dataset's ``info`` that are plain data (not the tokenizer)."""
    out = {}
    for key, value in info.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


# --- metrics.jsonl -------------------------------------------------------------------------------


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed at once."""

    def __init__(self, path: Path, append: bool):
        self.path = path
        self._file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drops records past ``step`` (written after the checkpoint a run resumes from) and a
    partial last line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# --- the final model -----------------------------------------------------------------------------


def final_model_step(output_dir: Path) -> int | None:
    """The step ``model.json`` records when the final weights are in place, else None."""
    if not (output_dir / MODEL_FILE).is_file():
        return None
    try:
        info = json.loads((output_dir / MODEL_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return None
    step = info.get("step") if isinstance(info, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _adapter_saver(finetuner: object | None) -> Callable[[torch.nn.Module, Path], object] | None:
    """``finetuner.save_adapter`` (the finetuner protocol's method, which the built-in ``lora``
    finetuner has), or None when the finetuner has none."""
    save = getattr(finetuner, "save_adapter", None)
    return save if callable(save) else None


def write_adapter(output_dir: Path, model: torch.nn.Module, finetuner: object | None) -> Path:
    """Saves ``model``'s adapter alone to ``<output_dir>/adapter`` with the finetuner's
    ``save_adapter(model, path)``, built under a temporary name and renamed into place so a
    crash never leaves half of one. Returns the adapter directory."""
    save = _adapter_saver(finetuner)
    if save is None:
        raise TypeError(f"finetuner {finetuner!r} has no save_adapter(model, directory)")
    target = output_dir / ADAPTER_DIR
    tmp = output_dir / f".{ADAPTER_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tmp)
    old = output_dir / f".{ADAPTER_DIR}.old-{os.getpid()}"
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def write_final_model(
    output_dir: Path,
    model: torch.nn.Module,
    step: int,
    *,
    config: Mapping[str, Any],
    data_info: Mapping[str, Any],
    metrics: Mapping[str, float],
    finetuner: object | None = None,
    save_hf: bool = False,
    merge_lora: bool = False,
) -> None:
    """Writes ``model.safetensors`` (the weights at ``step``), the adapter of a model that has
    one (``peft_config``: see :func:`write_adapter`), with ``save_hf`` the transformers
    checkpoint ``hf/`` (:func:`~aigc_ext.training.hf_export.write_hf`; a LoRA model merged when
    ``merge_lora``), and ``model.json``, last: it marks the final model as complete.

    ``config`` is the run's configuration as plain data (``TrainConfig.to_dict()``);
    ``model.json`` records its components, the plain entries of ``data_info`` and ``metrics``.
    """
    from safetensors.torch import save_model

    def weights(tmp: Path) -> None:
        save_model(model, str(tmp), metadata={"format": "pt", "step": str(step)})

    atomic_write(output_dir / MODEL_FILE, weights)
    if getattr(model, "peft_config", None) and _adapter_saver(finetuner) is not None:
        write_adapter(output_dir, model, finetuner)
    if save_hf:
        from aigc_ext.training.hf_export import write_hf

        write_hf(output_dir, model, data_info.get("tokenizer"), merge_lora=merge_lora)
    info = {
        "step": step,
        **{
            name: config.get(name)
            for name in ("model", "data", "objective", "finetune", "transfer")
        },
        "data_info": _plain_info(data_info),
        "metrics": dict(metrics),
    }
    atomic_write_text(output_dir / MODEL_INFO_FILE, json.dumps(jsonable(info), indent=2) + "\n")


def write_checkpoint_hf(
    checkpoint: Path, model: torch.nn.Module, data_info: Mapping[str, Any], merge_lora: bool
) -> None:
    """Writes the transformers checkpoint ``hf/`` into a finished checkpoint directory
    (``run.save_hf = "checkpoints"``), pruned with it."""
    from aigc_ext.training.hf_export import write_hf

    write_hf(checkpoint, model, data_info.get("tokenizer"), merge_lora=merge_lora)


def write_config(output_dir: Path, text: str) -> None:
    """Writes ``config.json`` (``TrainConfig.to_json()``)."""
    atomic_write_text(output_dir / CONFIG_FILE, text + "\n")
