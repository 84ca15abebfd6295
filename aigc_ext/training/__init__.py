"""Training: a configurable loop for the models, datasets and strategies aigc_ext knows.

::

    from aigc_ext.training import train

    result = train("configs/tiny.toml", overrides=["run.max_steps=100"])
    print(result.metrics, result.attention)

or ``aigc-ext train CONFIG.toml``. See docs/training.md. The names below are imported on first
use, so ``import aigc_ext.training`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CheckpointError",
    "ComponentConfig",
    "ConfigError",
    "DataBundle",
    "DataOrder",
    "Recipe",
    "Resolved",
    "RunConfig",
    "RunResult",
    "TrainConfig",
    "WarmupCosine",
    "check_backend_override",
    "derive_seed",
    "describe_attention",
    "load_checkpoint",
    "load_config",
    "lr_multiplier",
    "read_config",
    "register_dataset",
    "register_model",
    "register_recipe",
    "resolve",
    "resolve_device",
    "train",
]

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "ComponentConfig": "config",
    "ConfigError": "config",
    "RunConfig": "config",
    "TrainConfig": "config",
    "load_config": "build",
    "read_config": "config",
    "DataBundle": "components",
    "Recipe": "components",
    "register_dataset": "components",
    "register_model": "components",
    "register_recipe": "components",
    "Resolved": "build",
    "resolve": "build",
    "check_backend_override": "distributed",
    "resolve_device": "distributed",
    "train": "loop",
    "RunResult": "outputs",
    "describe_attention": "outputs",
    "WarmupCosine": "schedule",
    "lr_multiplier": "schedule",
    "DataOrder": "seeding",
    "derive_seed": "seeding",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
