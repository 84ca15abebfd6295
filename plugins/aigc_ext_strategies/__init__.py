"""Built-in training strategies of aigc_ext, shipped as a plugin.

Registered through the ``aigc_ext`` entry-point group (``strategies``), exactly as a third-party
plugin is: pretraining objectives, fine-tuning methods, data augmentations and transfer-learning
strategies. Each family lives in its own module; this module only implements the hooks.
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
    from aigc_ext_strategies import objectives

    objectives.register_all(register)


@hookimpl
def aigc_register_finetuners(register):
    from aigc_ext_strategies import finetuning

    finetuning.register_all(register)


@hookimpl
def aigc_register_augmentations(register):
    from aigc_ext_strategies import augmentation

    augmentation.register_all(register)


@hookimpl
def aigc_register_transfer_strategies(register):
    from aigc_ext_strategies import transfer

    transfer.register_all(register)
