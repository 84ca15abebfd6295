"""Helpers shared by the built-in strategies: option checks and seeded randomness.

Options are checked where a strategy is constructed, with errors that name the option and the
value (:func:`token_id`, :func:`token_ids`, :func:`positive_int`, :func:`fraction`,
:func:`probability`). Random numbers are drawn from the strategy's ``generator`` on the
generator's device and then moved to the data's (:func:`rand`, :func:`randint`), so a CPU
generator serves data on any device and a seeded run is reproducible.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "fraction",
    "generator_device",
    "optional_token_id",
    "positive_int",
    "probability",
    "rand",
    "randint",
    "token_id",
    "token_ids",
]

IGNORE_INDEX = -100
"""Label value that the losses ignore (the convention of ``torch.nn.functional.cross_entropy``)."""


def token_id(name: str, value: Any, *, vocab_size: int | None = None) -> int:
    """Validates a token id option: an integer >= 0 (and < vocab_size when that is known)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer token id, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer token id, got {value!r}") from None
    if value < 0 or (vocab_size is not None and value >= vocab_size):
        allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(f"{name} must be a token id in {allowed}, got {value}")
    return value


def optional_token_id(name: str, value: Any, *, vocab_size: int | None = None) -> int | None:
    return None if value is None else token_id(name, value, vocab_size=vocab_size)


def token_ids(name: str, values: Any, *, vocab_size: int | None = None) -> tuple[int, ...]:
    """Validates a collection of token ids (``None`` means none)."""
    if values is None:
        return ()
    if isinstance(values, Tensor):
        values = values.flatten().tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of integer token ids, got {values!r}")
    return tuple(sorted({token_id(f"{name} element", v, vocab_size=vocab_size) for v in values}))


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def fraction(name: str, value: Any, *, low: float, high: float, closed: str) -> float:
    """Validates a float in an interval; ``closed`` says which ends are included ("", "l", "r",
    "lr")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok_low = value >= low if "l" in closed else value > low
    ok_high = value <= high if "r" in closed else value < high
    if not (ok_low and ok_high):
        interval = (
            f"{'[' if 'l' in closed else '('}{low:g}, {high:g}{']' if 'r' in closed else ')'}"
        )
        raise ValueError(f"{name} must be in {interval}, got {value:g}")
    return value


def generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved to ``device`` (so a CPU
    generator serves data on any device)."""
    return torch.rand(shape, generator=generator, device=generator_device(generator)).to(device)


def randint(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    gen_device = generator_device(generator)
    return torch.randint(high, shape, generator=generator, device=gen_device).to(device)


def probability(name: str, value: Any) -> float:
    """Validates a probability option: a number in [0, 1]."""
    return fraction(name, value, low=0, high=1, closed="lr")
