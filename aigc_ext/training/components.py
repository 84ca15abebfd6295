"""Named models, datasets and recipes the training runner can build from a configuration.

Model and dataset factories register by decorator; recipes are complete default
configurations. A configuration names them (``[model] name = "gpt"``), so a TOML file stays
declarative and a new model or dataset only needs a decorated factory. The three tables are
:class:`~aigc_ext.registries.Registry` instances of the registry floor (families ``models``,
``datasets``, ``recipes``); the built-in ones are registered by the default plugin
:mod:`aigc_ext.default_plugins.training` through the ``aigc_register_models`` /
``_datasets`` / ``_recipes`` hooks, as a third-party plugin registers its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from aigc_ext.registries import Registry, registry

__all__ = [
    "DATASETS",
    "MODELS",
    "RECIPES",
    "DataBundle",
    "Recipe",
    "builtin_table",
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

MODELS: Registry = registry("models")  # name -> ModelFactory
DATASETS: Registry = registry("datasets")  # name -> DatasetFactory
RECIPES: Registry = registry("recipes")  # name -> Recipe


def _register(table: Registry, kind: str, name: str, obj: Any) -> None:
    source = getattr(obj, "__module__", None) or "aigc_ext.training"
    table.register(name, obj, source=source)


def builtin_table() -> tuple[dict[str, Any], Callable[[str], Callable[[Any], Any]]]:
    """A table and a decorator filling it, for a module of built-in factories: they are listed
    there at import and registered by the default plugin through the hook (not at import)."""
    table: dict[str, Any] = {}

    def register(name: str) -> Callable[[Any], Any]:
        def deco(fn: Any) -> Any:
            if name in table:
                raise ValueError(f"{name!r} is listed twice")
            table[name] = fn
            return fn

        return deco

    return table, register


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


def _load_builtins() -> None:
    """Loads the plugins: the default plugin registers the built-in models, datasets and
    recipes, installed plugins theirs (once per process; an error in a built-in is raised)."""
    from aigc_ext import plugins

    plugins.load()
