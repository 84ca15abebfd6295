"""Default plugin: the built-in training strategies, one module per family.

Pretraining objectives (:mod:`.objectives`, :mod:`.span_corruption`), fine-tuning methods
(:mod:`.finetuning`), data augmentations (:mod:`.text_augmentations`,
:mod:`.image_augmentations`) and transfer-learning strategies (:mod:`.transfer`); they share
:mod:`.helpers` (option checks, seeded randomness). This module only implements the hooks, the
same a third-party plugin implements, and imports the family modules when they are called.
"""

from __future__ import annotations

from aigc_ext.hookspecs import hookimpl

__all__ = [
    "aigc_register_augmentations",
    "aigc_register_finetuners",
    "aigc_register_objectives",
    "aigc_register_transfer_strategies",
]


@hookimpl
def aigc_register_objectives(register):
    from aigc_ext.default_plugins.strategies import objectives

    objectives.register_all(register)


@hookimpl
def aigc_register_finetuners(register):
    from aigc_ext.default_plugins.strategies import finetuning

    finetuning.register_all(register)


@hookimpl
def aigc_register_augmentations(register):
    from aigc_ext.default_plugins.strategies import image_augmentations, text_augmentations

    text_augmentations.register_all(register)
    image_augmentations.register_all(register)


@hookimpl
def aigc_register_transfer_strategies(register):
    from aigc_ext.default_plugins.strategies import transfer

    transfer.register_all(register)
