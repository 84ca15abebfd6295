"""Default plugin: the built-in models, datasets and recipes of ``aigc-ext train``.

The training modules list them (``BUILTIN_MODELS`` of :mod:`aigc_ext.training.models`,
:mod:`aigc_ext.training.vision` and :mod:`aigc_ext.training.hf_models`, ``BUILTIN_DATASETS`` of
:mod:`aigc_ext.training.data` and :mod:`aigc_ext.training.file_data`,
``RECIPES_CONFIG`` of :mod:`aigc_ext.training.recipes`); this plugin registers them through the
``aigc_register_models`` / ``_datasets`` / ``_recipes`` hooks a third-party plugin implements,
into the registries the training code looks names up in.
"""

from __future__ import annotations

import copy
import importlib

from aigc_ext.hookspecs import hookimpl

__all__ = [
    "DATASET_MODULES",
    "MODEL_MODULES",
    "aigc_register_datasets",
    "aigc_register_models",
    "aigc_register_recipes",
]

MODEL_MODULES = (  # BUILTIN_MODELS
    "aigc_ext.training.models",
    "aigc_ext.training.vision",
    "aigc_ext.training.hf_models",
)
DATASET_MODULES = ("aigc_ext.training.data", "aigc_ext.training.file_data")  # BUILTIN_DATASETS


def _summary(obj: object) -> str:
    """The first line of ``obj``'s docstring (the description ``aigc-ext plugins`` shows)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _register_tables(register, modules: tuple[str, ...], table: str) -> None:
    for module in modules:
        for name, factory in getattr(importlib.import_module(module), table).items():
            register(name, factory, description=_summary(factory))


@hookimpl
def aigc_register_models(register):
    """Registers ``gpt``, ``bert-mlm``, ``t5``, ``minilm-classifier``, ``vit`` and ``hf``."""
    _register_tables(register, MODEL_MODULES, "BUILTIN_MODELS")


@hookimpl
def aigc_register_datasets(register):
    """Registers ``text-corpus``, ``prompt-response``, ``sentiment``, ``digits`` and ``files``."""
    _register_tables(register, DATASET_MODULES, "BUILTIN_DATASETS")


@hookimpl
def aigc_register_recipes(register):
    """Registers the recipes of :mod:`aigc_ext.training.recipes` (each with its own copy of
    the configuration, so that a run cannot change the table)."""
    from aigc_ext.training import recipes
    from aigc_ext.training.components import Recipe

    for name, (description, config) in recipes.RECIPES_CONFIG.items():
        register(name, Recipe(name, description, copy.deepcopy(config)), description=description)
