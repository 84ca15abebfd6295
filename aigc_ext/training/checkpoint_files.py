"""The files of a checkpoint: safetensors written durably and their headers checked on reading,
optimiser state split into tensors and plain data, JSON read with clear errors.

:mod:`aigc_ext.training.checkpoint` puts these together into a checkpoint directory. Nothing
here unpickles: tensors are safetensors, everything else JSON. Every problem is a
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from aigc_ext.training.files import fsync_file, set_default_mode

__all__ = [
    "CheckpointError",
    "file_record",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "read_json",
    "safetensors_header",
    "write_model",
    "write_tensors",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run."""


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


# --- writing -----------------------------------------------------------------------------------


def file_record(path: Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file, as the trainer state records each tensor file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def write_model(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Saves ``model``'s weights (tied ones once) as safetensors with ``metadata``, fsynced."""
    from safetensors.torch import save_model

    save_model(model, str(path), metadata=metadata)
    set_default_mode(path)
    fsync_file(path)


def write_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Saves ``tensors`` (copied to the CPU, contiguous) as safetensors with ``metadata``,
    fsynced."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    set_default_mode(path)
    fsync_file(path)


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


# --- reading -----------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a missing, unreadable or invalid file is a :class:`CheckpointError`."""
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


def safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
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
