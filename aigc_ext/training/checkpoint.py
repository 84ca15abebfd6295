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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aigc_ext.training.files import atomic_write_text, fsync_dir, fsync_file, set_default_mode

__all__ = [
    "CHECKPOINTS",
    "FORMAT_VERSION",
    "LATEST",
    "CheckpointError",
    "LoadedCheckpoint",
    "find_resume_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "read_latest",
    "save_checkpoint",
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

# bytes per element of each safetensors dtype
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read besides the model and optimiser it filled in."""

    path: Path
    state: dict[str, Any]
    rng: dict[str, torch.Tensor]


# --- writing -----------------------------------------------------------------------------------


def _file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_model(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path), metadata=metadata)
    set_default_mode(path)
    fsync_file(path)


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    set_default_mode(path)
    fsync_file(path)


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True, allow_nan=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _json_value(value: Any, where: str) -> Any:
    """Checks that optimiser metadata is plain data (so no pickling is needed)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v, where) for k, v in value.items()}
    raise CheckpointError(
        f"cannot store {where} in a checkpoint: {type(value).__name__} {value!r} is not plain data"
    )


def optimizer_to_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Splits ``optimizer.state_dict()`` into tensors (``state.<index>.<name>``) and plain data
    (``param_groups`` and non-tensor per-parameter state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = _json_value(
                    value, f"optimizer state {index}.{name}"
                )
    meta = {
        "param_groups": _json_value(state_dict["param_groups"], "optimizer param_groups"),
        "scalar_state": scalars,
    }
    return tensors, meta


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    """The inverse of :func:`optimizer_to_tensors`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise ValueError(f"unexpected tensor {key!r} (expected state.<index>.<name>)")
        state.setdefault(int(parts[1]), {})[parts[2]] = value
    for index, values in meta.get("scalar_state", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


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
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rng: dict[str, torch.Tensor],
    keep: int = 2,
) -> Path:
    """Writes checkpoint ``step-<step>`` under ``root`` atomically and returns its path.

    ``trainer_state`` holds everything of :data:`STATE_KEYS` but ``step``, ``format_version``
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
        _write_model(model, tmp / MODEL_FILE, meta)
        tensors, opt_meta = optimizer_to_tensors(optimizer.state_dict())
        _write_tensors(
            tensors,
            tmp / OPTIMIZER_FILE,
            {
                **meta,
                "param_groups": json.dumps(opt_meta["param_groups"]),
                "scalar_state": json.dumps(opt_meta["scalar_state"]),
            },
        )
        _write_tensors(rng, tmp / RNG_FILE, meta)
        state = dict(trainer_state)
        state.update(
            format_version=FORMAT_VERSION,
            step=step,
            files={name: _file_record(tmp / name) for name in TENSOR_FILES},
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


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is corrupt") from None


def _safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Parses and checks a safetensors file's header against the file's size.

    Returns ``(metadata, tensors)``; raises :class:`CheckpointError` for a missing, truncated
    or malformed file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes, no safetensors header)")
            length = int.from_bytes(prefix, "little")
            if 8 + length > size:
                raise CheckpointError(
                    f"{path}: truncated (the header needs {8 + length} bytes, the file has {size})"
                )
            raw = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable: {exc}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            nbytes = math.prod(shape) * _DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}") from None
        if stop - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r} (offsets)")
        end = max(end, stop)
    if 8 + length + end != size:
        what = "truncated" if 8 + length + end > size else "has trailing bytes"
        raise CheckpointError(
            f"{path}: {what} (the header describes {8 + length + end} bytes, the file has {size})"
        )
    return metadata, header


def validate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Checks every file of checkpoint ``path`` without loading tensors; returns its
    trainer state. Raises :class:`CheckpointError` naming the file and the problem."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    state = _read_json(path / STATE_FILE)
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
        metadata, tensors = _safetensors_header(file)
        if metadata.get("step") != str(step):
            raise CheckpointError(
                f"{file}: written at step {metadata.get('step')!r}, the checkpoint is step {step} "
                "(files of different checkpoints are mixed)"
            )
        record = files.get(name) if isinstance(files, dict) else None
        if not isinstance(record, dict) or "size" not in record or "sha256" not in record:
            raise CheckpointError(f"{state_path}: no size and sha256 recorded for {name}")
        actual = _file_record(file)
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
    does not fit (other parameter names, shapes or groups) is a :class:`CheckpointError`.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, load_model

    path = Path(path)
    state = validate_checkpoint(path)
    device = str(device)
    if model is not None:
        try:
            load_model(model, str(path / MODEL_FILE), strict=True, device=device)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path / MODEL_FILE}: does not fit the model: {exc}") from None
    if optimizer is not None:
        file = path / OPTIMIZER_FILE
        try:
            with safe_open(str(file), framework="pt", device=device) as f:
                metadata = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = {k: json.loads(metadata[k]) for k in ("param_groups", "scalar_state")}
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
