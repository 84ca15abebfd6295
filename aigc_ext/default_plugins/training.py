"""Default plugin: the built-in models, datasets and recipes of ``aigc-ext train``.

The training modules list them (:data:`aigc_ext.training.models.BUILTIN_MODELS`,
:data:`aigc_ext.training.data.BUILTIN_DATASETS`,
:data:`aigc_ext.training.recipes.RECIPES_CONFIG`); this plugin registers them through the
``aigc_register_models`` / ``_datasets`` / ``_recipes`` hooks a third-party plugin implements,
into the registries the training code looks names up in.
"""

from __future__ import annotations

import copy

from aigc_ext.hookspecs import hookimpl

__all__ = ["aigc_register_datasets", "aigc_register_models", "aigc_register_recipes"]


def _summary(obj: object) -> str:
    """The first line of ``obj``'s docstring (the description ``aigc-ext plugins`` shows)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


@hookimpl
def aigc_register_models(register):
    """Registers ``gpt``, ``bert-mlm``, ``t5``, ``minilm-classifier`` and ``vit``."""
    from aigc_ext.training import models

    for name, factory in models.BUILTIN_MODELS.items():
        register(name, factory, description=_summary(factory))


@hookimpl
def aigc_register_datasets(register):
    """Registers ``text-corpus``, ``prompt-response``, ``sentiment`` and ``digits``."""
    from aigc_ext.training import data

    for name, factory in data.BUILTIN_DATASETS.items():
        register(name, factory, description=_summary(factory))


@hookimpl
def aigc_register_recipes(register):
    """Registers the recipes of :mod:`aigc_ext.training.recipes` (each with its own copy of
    the configuration, so that a run cannot change the table)."""
    from aigc_ext.training import recipes
    from aigc_ext.training.components import Recipe

    for name, (description, config) in recipes.RECIPES_CONFIG.items():
        register(name, Recipe(name, description, copy.deepcopy(config)), description=description)
