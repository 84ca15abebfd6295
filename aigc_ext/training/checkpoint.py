"""Training checkpoints: written atomically, validated on load, nothing pickled.

Layout of ``<output_dir>/checkpoints/``::

    step-<N>/model.safetensors       the model's weights (tied weights stored once)
    step-<N>/optimizer.safetensors   optimiser state tensors as "state.<param index>.<name>";
                                     param_groups and non-tensor state as JSON in the metadata
    step-<N>/rng.safetensors         torch RNG states: "cpu.<rank>", "cuda.<rank>"
    step-<N>/trainer_state.json      step, epoch, position in the epoch, scheduler, Python and
                                     NumPy RNG states, GradScaler state, configuration hash, and
                                     the size and SHA-256 of each of the three files above
    latest                           the name of the newest complete checkpoint (for tools;
                                     resuming takes the newest valid ``step-<N>``)

A checkpoint is built in a temporary directory beside the others (``.tmp-step-<N>-...``), every
file and the directory are fsynced, then the directory is renamed to ``step-<N>``: a crash leaves
either the complete checkpoint or none. ``latest`` is replaced (temporary file + ``os.replace``)
only after that, and older checkpoints are deleted only after the new one is complete.

Every file of a checkpoint also records its step, so loading notices a file from another
checkpoint; a truncated or altered file fails its size or SHA-256 check. All problems are a
:class:`CheckpointError` naming the file.

A run sharded with FSDP writes the same files: its full weights and optimiser state are
gathered to the first process (:func:`aigc_ext.training.fsdp.full_states`) and sharded again
when loaded, so any number of processes resumes from any checkpoint.

A run's state beyond the weights: :func:`trainer_state` and :func:`rng_tensors` capture it for
:func:`save_checkpoint`; :func:`restore_training_state` (model, optimiser, scheduler,
GradScaler) and :func:`restore_random_state` (Python, NumPy, torch RNGs) put it back on resume.
The file-level details are in :mod:`aigc_ext.training.checkpoint_files`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aigc_ext.training import checkpoint_files, fsdp, seeding
from aigc_ext.training.checkpoint_files import (
    CheckpointError,
    optimizer_from_tensors,
    optimizer_to_tensors,
)
from aigc_ext.training.config import TrainConfig
from aigc_ext.training.files import atomic_write_text, fsync_dir, set_default_mode
from aigc_ext.training.fsdp import FullState
from aigc_ext.training.outputs import jsonable

if TYPE_CHECKING:
    from aigc_ext.training.distributed import DistContext

__all__ = [
    "CHECKPOINTS",
    "FORMAT_VERSION",
    "LATEST",
    "CheckpointError",
    "LoadedCheckpoint",
    "config_changes",
    "config_diff",
    "find_resume_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "read_latest",
    "restore_random_state",
    "restore_training_state",
    "rng_tensors",
    "save_checkpoint",
    "saved_metrics",
    "trainer_state",
    "validate_checkpoint",
]

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
TENSOR_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE)
STATE_KEYS = (
    "format_version",
    "step",
    "epoch",
    "batch_in_epoch",
    "scheduler",
    "python_random",
    "numpy_random",
    "grad_scaler",
    "config_hash",
    "files",
)
_NAME_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read besides the model and optimiser it filled in."""

    path: Path
    state: dict[str, Any]
    rng: dict[str, torch.Tensor]


# --- writing -----------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True, allow_nan=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_name(step: int) -> str:
    return f"step-{step}"


def _write_latest(root: Path, name: str) -> None:
    atomic_write_text(root / LATEST, name + "\n")


def _remove_temporaries(root: Path) -> None:
    """Removes what a crashed save left (only one process writes checkpoints)."""
    for entry in root.iterdir():
        if entry.name.startswith(_TMP_PREFIX) or entry.name.startswith(".latest-"):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module | FullState,
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    trainer_state: dict[str, Any],
    rng: dict[str, torch.Tensor],
    keep: int = 2,
) -> Path:
    """Writes checkpoint ``step-<step>`` under ``root`` atomically and returns its path.

    ``model`` is the model, or the full weights of a sharded one gathered to this process
    (:func:`aigc_ext.training.fsdp.full_states`); ``optimizer`` the optimiser or its full state
    dict in single-process form. ``trainer_state`` holds everything of :data:`STATE_KEYS` but ``step``, ``format_version``
    and ``files``, which are filled in here. Afterwards ``latest`` names it and only the
    ``keep`` newest checkpoints at or below ``step`` remain (checkpoints of a later step are
    leftovers of a run resumed from an earlier one and are removed as well).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(root)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=root))
    meta = {"format": "aigc_ext.checkpoint", "step": str(step)}
    try:
        set_default_mode(tmp)
        if isinstance(model, FullState):  # tied names recorded as save_model does
            checkpoint_files.write_tensors(
                model.tensors, tmp / MODEL_FILE, {**model.aliases, **meta}
            )
        else:
            checkpoint_files.write_model(model, tmp / MODEL_FILE, meta)
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer.state_dict()
        tensors, opt_meta = optimizer_to_tensors(optimizer)
        checkpoint_files.write_tensors(
            tensors,
            tmp / OPTIMIZER_FILE,
            {
                **meta,
                "param_groups": json.dumps(opt_meta["param_groups"]),
                "scalar_state": json.dumps(opt_meta["scalar_state"]),
            },
        )
        checkpoint_files.write_tensors(rng, tmp / RNG_FILE, meta)
        state = dict(trainer_state)
        state.update(
            format_version=FORMAT_VERSION,
            step=step,
            files={name: checkpoint_files.file_record(tmp / name) for name in TENSOR_FILES},
        )
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"trainer_state lacks {', '.join(missing)}")
        _write_json(tmp / STATE_FILE, state)
        fsync_dir(tmp)
        if final.exists():  # a leftover of an abandoned run: replace it
            stale = root / f"{_TMP_PREFIX}stale-{final.name}-{os.getpid()}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(root, final.name)
    _prune(root, keep, step)
    return final


def _prune(root: Path, keep: int, step: int) -> None:
    found = list_checkpoints(root)
    later = [p for s, p in found if s > step]
    earlier = [p for s, p in found if s <= step]
    for path in later + earlier[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# --- reading -----------------------------------------------------------------------------------


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-<N>`` directory under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def read_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, or None (no file, or it names nothing usable)."""
    root = Path(root)
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not _NAME_RE.match(name):
        return None
    return root / name


def validate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Checks every file of checkpoint ``path`` without loading tensors; returns its
    trainer state. Raises :class:`CheckpointError` naming the file and the problem."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    state = checkpoint_files.read_json(path / STATE_FILE)
    state_path = path / STATE_FILE
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path}: expected a JSON object")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{state_path}: missing key(s) {', '.join(missing)}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path}: format_version {state['format_version']!r}, "
            f"this version reads {FORMAT_VERSION}"
        )
    step = state["step"]
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{state_path}: step must be a non-negative integer, got {step!r}")
    match = _NAME_RE.match(path.name)
    if match and int(match.group(1)) != step:
        raise CheckpointError(f"{state_path}: step {step} does not match the directory name")
    files = state["files"]
    for name in TENSOR_FILES:
        file = path / name
        metadata, tensors = checkpoint_files.safetensors_header(file)
        if metadata.get("step") != str(step):
            raise CheckpointError(
                f"{file}: written at step {metadata.get('step')!r}, the checkpoint is step {step} "
                "(files of different checkpoints are mixed)"
            )
        record = files.get(name) if isinstance(files, dict) else None
        if not isinstance(record, dict) or "size" not in record or "sha256" not in record:
            raise CheckpointError(f"{state_path}: no size and sha256 recorded for {name}")
        actual = checkpoint_files.file_record(file)
        if actual["size"] != record["size"]:
            raise CheckpointError(
                f"{file}: {actual['size']} bytes, {record['size']} expected (truncated or replaced)"
            )
        if actual["sha256"] != record["sha256"]:
            raise CheckpointError(f"{file}: SHA-256 mismatch; the file is corrupt")
        if name == OPTIMIZER_FILE:
            for key in ("param_groups", "scalar_state"):
                try:
                    json.loads(metadata[key])
                except (KeyError, ValueError):
                    raise CheckpointError(f"{file}: metadata {key!r} missing or corrupt") from None
        if name == RNG_FILE and "cpu.0" not in tensors:
            raise CheckpointError(f"{file}: no torch CPU RNG state ('cpu.0')")
    return state


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Validates checkpoint ``path``, loads its weights into ``model`` and its state into
    ``optimizer`` (each if given), and returns the trainer state and RNG tensors.

    Nothing is unpickled: the tensors are safetensors, the rest JSON. A model or optimiser that
    does not fit (other parameter names, shapes or groups) is a :class:`CheckpointError`. A
    sharded (FSDP) model and its optimiser are given the full state, read on the CPU by every
    process, of which each keeps its shard (:mod:`aigc_ext.training.fsdp`).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, load_model

    path = Path(path)
    state = validate_checkpoint(path)
    device = str(device)
    sharded = model is not None and fsdp.is_sharded(model)
    if model is not None:
        try:
            if sharded:  # full weights, each process keeps its shard
                fsdp.load_model_state(model, load_file(str(path / MODEL_FILE)))
            else:
                load_model(model, str(path / MODEL_FILE), strict=True, device=device)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path / MODEL_FILE}: does not fit the model: {exc}") from None
    if optimizer is not None:
        file = path / OPTIMIZER_FILE
        try:
            with safe_open(str(file), framework="pt", device="cpu" if sharded else device) as f:
                metadata = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = {k: json.loads(metadata[k]) for k in ("param_groups", "scalar_state")}
            if sharded:
                fsdp.load_optimizer_state(model, optimizer, optimizer_from_tensors(tensors, meta))
            else:
                optimizer.load_state_dict(optimizer_from_tensors(tensors, meta))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{file}: does not fit the optimizer: {exc}") from None
    rng = load_file(str(path / RNG_FILE))
    return LoadedCheckpoint(path=path, state=state, rng=rng)


def find_resume_checkpoint(
    root: str | os.PathLike, *, warn: bool = True
) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid checkpoint under ``root`` and its trainer state.

    Tries the checkpoints newest first (a ``step-<N>`` directory only exists once complete, so
    one newer than ``latest`` - a crash between the rename and the update of ``latest`` - is
    used too); each unusable one is reported with a warning saying why. Returns None when there
    is no checkpoint at all and raises :class:`CheckpointError` (listing the reasons) when none
    is usable.
    """
    root = Path(root)
    candidates = [p for _, p in reversed(list_checkpoints(root))]
    if not candidates:
        return None
    problems = []
    for i, path in enumerate(candidates):
        try:
            return path, validate_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            if warn:
                following = (
                    f"falling back to {candidates[i + 1].name}"
                    if i + 1 < len(candidates)
                    else "no other checkpoint to fall back to"
                )
                warnings.warn(
                    f"checkpoint {path.name} is unusable: {exc}; {following}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(problems))


# --- a run's state -------------------------------------------------------------------------------

_TRAIN_METRICS = ("loss", "lr", "grad_norm")


def trainer_state(
    *,
    step: int,
    steps_per_epoch: int,
    world_size: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    elapsed: float,
    metrics: Mapping[str, float],
) -> dict[str, Any]:
    """The ``trainer_state`` that :func:`save_checkpoint` stores for a run at ``step``.

    Where the run is in its data (epoch, batch in the epoch, steps per epoch and processes:
    a resume with other values warns that the data order differs), the scheduler's state
    without its ``lr_lambdas`` (the schedule comes from the configuration), the Python and
    NumPy RNG states, the GradScaler's state, the configuration and its hash, the training
    time so far and the last metrics.
    """
    schedule = scheduler.state_dict()
    schedule.pop("lr_lambdas", None)
    return {
        "epoch": step // steps_per_epoch,
        "batch_in_epoch": step % steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "world_size": world_size,
        "scheduler": jsonable(schedule),
        "python_random": seeding.python_random_state(),
        "numpy_random": seeding.numpy_random_state(),
        "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "config_hash": config.hash(),
        "config": jsonable(config.to_dict()),
        "elapsed": elapsed,
        "metrics": dict(metrics),
    }


def rng_tensors(dist: DistContext, device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's torch RNG states, ``cpu.<rank>`` (and ``cuda.<rank>`` on CUDA), for
    :func:`save_checkpoint`'s ``rng``. A collective call under DDP: every process makes it."""
    rng = {f"cpu.{r}": t for r, t in enumerate(dist.all_gather(torch.get_rng_state()))}
    if device.type == "cuda":
        states = dist.all_gather(torch.cuda.get_rng_state(device))
        rng.update({f"cuda.{r}": t for r, t in enumerate(states)})
    return rng


def restore_training_state(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> LoadedCheckpoint:
    """Loads checkpoint ``path`` into the model and the optimiser and restores the scheduler
    and the GradScaler; the random states are left to :func:`restore_random_state`."""
    loaded = load_checkpoint(path, model=model, optimizer=optimizer, device=device)
    state = dict(loaded.state["scheduler"])
    state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(state)
    if scaler.is_enabled() and loaded.state["grad_scaler"]:
        scaler.load_state_dict(loaded.state["grad_scaler"])
    return loaded


def restore_random_state(
    loaded: LoadedCheckpoint, *, rank: int, device: torch.device, seed: int
) -> None:
    """Restores the Python, NumPy and torch RNG states of process ``rank`` from ``loaded``.

    A checkpoint without this rank's torch state (written by fewer processes) reseeds
    dropout from ``(seed, "torch", rank, step)`` with a warning.
    """
    state = loaded.state
    seeding.set_python_random_state(state["python_random"])
    seeding.set_numpy_random_state(state["numpy_random"])
    cpu = loaded.rng.get(f"cpu.{rank}")
    if cpu is None:
        warnings.warn(
            f"resume: {loaded.path.name} has no RNG state for rank {rank}; dropout is reseeded",
            RuntimeWarning,
            stacklevel=5,
        )
        seeding.seed_torch(seed, "torch", rank, int(state["step"]))
    else:
        torch.set_rng_state(cpu)
    cuda = loaded.rng.get(f"cuda.{rank}")
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def config_changes(state: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """The dotted keys in which ``config`` differs from the configuration a checkpoint's
    trainer ``state`` was saved with; none when the hashes agree. ``run.output_dir`` does not
    count: a moved run is the same run."""
    changed = config_diff(state.get("config", {}), jsonable(config.to_dict()))
    changed = [key for key in changed if key != "run.output_dir"]
    return changed if state["config_hash"] != config.hash() else []


def saved_metrics(value: Any) -> tuple[dict[str, float], dict[str, float]]:
    """``(training, evaluation)`` metrics of a checkpoint's record (its ``name: number``
    entries), in the order a run reports them: loss, lr, grad_norm, then ``eval/...``."""
    if not isinstance(value, Mapping):
        return {}, {}
    numbers = {
        str(k): float(v)
        for k, v in value.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    order = sorted(numbers, key=lambda k: (k.startswith("eval/"), _rank(k), k))
    train = {k: numbers[k] for k in order if not k.startswith("eval/")}
    return train, {k: numbers[k] for k in order if k.startswith("eval/")}


def _rank(name: str) -> int:
    return _TRAIN_METRICS.index(name) if name in _TRAIN_METRICS else len(_TRAIN_METRICS)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``to_dict()`` configurations."""
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, where + ".")
        elif a != b:
            out.append(where)
    return out
