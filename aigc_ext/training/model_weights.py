"""Starting a built-in model from the weights of a previous run (the ``init_from`` option).

:func:`find_weights` finds the ``model.safetensors`` that a run's output directory, one of its
checkpoint directories or a path names; :func:`load_weights` loads it strictly except for the
output head, so a classifier can start from a model trained with another number of labels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

__all__ = ["HEAD_MODULE_NAMES", "WEIGHTS_NAME", "find_weights", "load_weights"]

HEAD_MODULE_NAMES = ("head", "classifier", "score", "lm_head")
"""Top-level module names treated as an output head by :func:`load_weights`."""

WEIGHTS_NAME = "model.safetensors"


def find_weights(init_from: str | Path) -> Path | None:
    """The weights file that ``init_from`` names, or None if there is none.

    ``init_from`` is a ``.safetensors`` file, or a directory holding ``model.safetensors``
    (a run's output directory or one of its checkpoint directories).
    """
    path = Path(init_from).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    return None


def _is_head(key: str) -> bool:
    return key.split(".", 1)[0] in HEAD_MODULE_NAMES


def load_weights(model: nn.Module, init_from: str | Path, *, optional: bool = False) -> list[str]:
    """Loads the weights that ``init_from`` names (see :func:`find_weights`) into ``model``.

    Strict, except for the output head: every parameter and buffer outside the head must be in
    the file with the same shape, and the file must hold nothing the model lacks; head entries
    (top-level modules named as in :data:`HEAD_MODULE_NAMES`) whose shape differs or that are
    absent keep their fresh initialisation, so a classifier can start from a model trained with
    another number of labels. Parameters tied to a loaded one (GPT-2's output embedding) count
    as loaded. Returns the names left at their initialisation. Without a weights file: raises
    ``FileNotFoundError``, or with ``optional=True`` warns and returns every parameter name.
    """
    from safetensors.torch import load_file

    path = find_weights(init_from)
    if path is None:
        message = (
            f"init_from={str(init_from)!r}: no weights found (expected a .safetensors file or "
            f"a directory holding {WEIGHTS_NAME})"
        )
        if optional:
            warnings.warn(f"{message}; starting from a random initialisation", stacklevel=2)
            return list(model.state_dict())
        raise FileNotFoundError(message)
    state = load_file(str(path))
    own = model.state_dict()
    if any(k.startswith("base_model.model.") for k in state) and not any(
        k.startswith("base_model.model.") for k in own
    ):
        raise ValueError(
            f"init_from={str(path)!r} holds a model wrapped with LoRA adapters; merge them "
            "into the base model first (aigc_ext_strategies.finetuning.merge_lora)"
        )
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise ValueError(
            f"init_from={str(path)!r} has weights this model lacks: {_names(unexpected)}; "
            "was it saved from another architecture or size?"
        )
    fresh = []
    for key, value in list(state.items()):
        if own[key].shape != value.shape:
            if not _is_head(key):
                raise ValueError(
                    f"init_from={str(path)!r}: {key} has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(own[key].shape)}"
                )
            fresh.append(key)
            del state[key]
    # Tied parameters share storage: loading one name loads all of them.
    storage = {k: (v.untyped_storage().data_ptr(), v.storage_offset()) for k, v in own.items()}
    loaded = {storage[k] for k in state}
    missing = [k for k in own if k not in state and storage[k] not in loaded]
    not_head = [k for k in missing if not _is_head(k)]
    if not_head:
        raise ValueError(f"init_from={str(path)!r} lacks weights for {_names(not_head)}")
    model.load_state_dict(state, strict=False)
    return sorted(set(fresh) | set(missing))


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
