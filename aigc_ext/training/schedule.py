"""The learning-rate schedule of a training run: linear warm-up, then cosine decay.

:func:`lr_multiplier` is the factor on the base learning rate at each optimiser step;
:class:`WarmupCosine` is the same function as the ``lr_lambda`` of a ``LambdaLR``, a class
rather than a closure so that the scheduler's state stays plain data in checkpoints.
"""

from __future__ import annotations

import math

__all__ = ["WarmupCosine", "lr_multiplier"]


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The factor on the base learning rate for optimiser step ``step`` (0-based).

    Linear warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (so the
    first step already learns); then cosine decay from 1 to ``min_lr_ratio``, reached at
    ``step == max_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max_steps - warmup_steps
    if span <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """:func:`lr_multiplier` as the ``lr_lambda`` of a ``LambdaLR`` (one for every group, so
    per-group learning rates keep their ratios)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float):
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_multiplier(
            step,
            warmup_steps=self.warmup_steps,
            max_steps=self.max_steps,
            min_lr_ratio=self.min_lr_ratio,
        )
