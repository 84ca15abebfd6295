"""What the built-in model factories share: the checks of their options and of the dataset's
``info``, a seeded initialisation, and the attention implementation that routes transformers
models through aigc_ext.

:func:`model_options` wraps a factory ``factory(info, **options)`` so that an unknown option is
a ValueError listing the allowed ones and ``init_from`` loads a previous run's weights
(:func:`~aigc_ext.training.model_weights.load_weights`) into the model it builds.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from aigc_ext.training.model_weights import load_weights

__all__ = [
    "attn_implementation",
    "from_info",
    "heads_divide",
    "init_rng",
    "model_options",
    "positive",
    "probability",
]


def model_options(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Wraps model factory ``name`` so that an unknown option is a ValueError listing the
    allowed ones, ``info`` must be a dict, and ``init_from`` (when given) loads a previous
    run's weights into the built model (``init_optional``: a missing file only warns)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        allowed = [p for p in inspect.signature(fn).parameters if p != "info"]

        @functools.wraps(fn)
        def factory(info: dict[str, Any], **options: Any) -> nn.Module:
            if not isinstance(info, dict):
                raise TypeError(f"model {name!r}: info must be a dict, got {type(info).__name__}")
            unknown = sorted(set(options) - set(allowed))
            if unknown:
                raise ValueError(
                    f"model {name!r}: unknown option {unknown[0]!r}; allowed: {', '.join(allowed)}"
                )
            init_from = options.get("init_from")
            if init_from is not None and not isinstance(init_from, str | os.PathLike):
                raise TypeError(
                    f"model {name!r}: init_from must be a path (a run's output directory or a "
                    f".safetensors file), got {init_from!r}"
                )
            model = fn(info, **options)
            if init_from is not None:
                load_weights(model, init_from, optional=bool(options.get("init_optional")))
            return model

        return factory

    return deco


def from_info(info: dict[str, Any], key: str, model: str) -> Any:
    """``info[key]``; a KeyError naming the model and the keys the dataset's info has."""
    if info.get(key) is None:
        raise KeyError(
            f"model {model!r} needs info[{key!r}] from the dataset; the dataset's info has "
            f"{', '.join(sorted(info)) or 'no keys'}"
        )
    return info[key]


def positive(name: str, value: Any) -> int:
    """``value`` checked to be an integer >= 1 (ValueError naming ``name``)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def probability(name: str, value: Any) -> float:
    """``value`` checked to be a number in [0, 1) (ValueError naming ``name``), as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def heads_divide(n_embd: int, n_head: int) -> None:
    """Checks that the attention heads split the width evenly."""
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")


@contextlib.contextmanager
def init_rng(seed: int | None) -> Iterator[None]:
    """Draws the initialisation from ``seed`` without touching the global random state."""
    if seed is None:
        yield
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def attn_implementation() -> str:
    """The ``attn_implementation`` name under which transformers models call aigc_ext
    (registered with transformers on first use)."""
    from aigc_ext.integrations import transformers as integration

    return integration.register()
