"""Named models, datasets and recipes the training runner can build from a configuration.

Model and dataset factories register here by decorator; recipes are complete default
configurations. A configuration names them (``[model] name = "gpt"``), so a TOML file stays
declarative and a new model or dataset only needs a decorated factory.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DATASETS",
    "MODELS",
    "RECIPES",
    "DataBundle",
    "Recipe",
    "get_dataset",
    "get_model",
    "get_recipe",
    "register_dataset",
    "register_model",
    "register_recipe",
]


@dataclass
class DataBundle:
    """What a dataset factory returns.

    ``train``/``eval`` yield dicts of tensors (one example each); ``collate`` turns a list of them
    into a batch; ``info`` carries what models and strategies need to know about the data
    (``vocab_size``, ``pad_token_id``, ``num_labels``, ...) and fills their options by name.
    """

    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset | None
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A named, complete training configuration with embedded defaults."""

    name: str
    description: str
    config: dict[str, Any]


ModelFactory = Callable[..., torch.nn.Module]
DatasetFactory = Callable[..., DataBundle]

MODELS: dict[str, ModelFactory] = {}
DATASETS: dict[str, DatasetFactory] = {}
RECIPES: dict[str, Recipe] = {}


def _register(table: dict, kind: str, name: str, obj: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} name must be a non-empty string, not {name!r}")
    if name in table:
        raise ValueError(f"{kind} {name!r} is registered twice")
    table[name] = obj


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: ``factory(info: dict, **options) -> nn.Module`` becomes model ``name``."""

    def deco(fn: ModelFactory) -> ModelFactory:
        _register(MODELS, "model", name, fn)
        return fn

    return deco


def register_dataset(name: str) -> Callable[[DatasetFactory], DatasetFactory]:
    """Decorator: ``factory(*, seed: int, **options) -> DataBundle`` becomes dataset ``name``."""

    def deco(fn: DatasetFactory) -> DatasetFactory:
        _register(DATASETS, "dataset", name, fn)
        return fn

    return deco


def register_recipe(name: str, description: str, config: dict[str, Any]) -> Recipe:
    """Registers a recipe: a complete configuration run by ``aigc-ext train --recipe name``."""
    recipe = Recipe(name, description, config)
    _register(RECIPES, "recipe", name, recipe)
    return recipe


def _lookup(table: dict, kind: str, name: str) -> Any:
    _load_builtins()
    try:
        return table[name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} {name!r}; available: {', '.join(sorted(table)) or 'none'}"
        ) from None


def get_model(name: str) -> ModelFactory:
    """The model factory ``name``; an unknown name lists the available ones."""
    return _lookup(MODELS, "model", name)


def get_dataset(name: str) -> DatasetFactory:
    """The dataset factory ``name``; an unknown name lists the available ones."""
    return _lookup(DATASETS, "dataset", name)


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``; an unknown name lists the available ones."""
    return _lookup(RECIPES, "recipe", name)


BUILTIN_MODULES = ("data", "models", "vision", "recipes")


def _load_builtins() -> None:
    """Imports the modules that register the built-in models, datasets and recipes.

    A module that does not exist is skipped (its names are then simply not available); an
    error inside an existing module is raised.
    """
    for name in BUILTIN_MODULES:
        module = f"aigc_ext.training.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
