"""Seeds and random states of a training run.

Reproducibility without saving generator states: the order of the training examples in epoch
``e`` is a permutation drawn from a generator seeded by ``(seed, e)`` (:class:`DataOrder`);
augmentations and ``objective.prepare`` draw from a generator seeded by ``(seed, step,
micro-step, rank)`` (:func:`seeded_generator`). Only the global RNGs (torch's for dropout,
Python's and NumPy's for code that uses them) carry state from step to step; checkpoints store
them (:func:`python_random_state`, :func:`numpy_random_state` as plain data, torch's as
tensors), so a resumed run continues with exactly the batches, masks and losses of an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch

__all__ = [
    "DataOrder",
    "derive_seed",
    "numpy_random_state",
    "python_random_state",
    "seed_everything",
    "seed_torch",
    "seeded_generator",
    "set_numpy_random_state",
    "set_python_random_state",
]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``(seed, "step", step, micro, rank)``): distinct
    parts give unrelated seeds, the same parts the same seed, in every process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(*parts: object) -> torch.Generator:
    """A new CPU generator seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global RNGs with ``seed`` (before anything is built,
    so that datasets and model initialisations that draw from them are reproducible)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def seed_torch(*parts: object) -> None:
    """Seeds torch's global RNG (dropout) with :func:`derive_seed` of ``parts``, e.g.
    ``(seed, "torch", rank)``: each process of a run draws its own dropout masks."""
    torch.manual_seed(derive_seed(*parts))


def python_random_state() -> list:
    """Python's global RNG state as JSON-able data (for a checkpoint's trainer state)."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_python_random_state(state: list) -> None:
    """Restores what :func:`python_random_state` returned."""
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


def numpy_random_state() -> dict[str, Any]:
    """NumPy's legacy global RNG state as JSON-able data (for a checkpoint's trainer state)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "kind": kind,
        "keys": keys.tolist(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def set_numpy_random_state(state: dict[str, Any]) -> None:
    """Restores what :func:`numpy_random_state` returned."""
    import numpy as np

    np.random.set_state(
        (
            state["kind"],
            np.asarray(state["keys"], dtype=np.uint32),
            state["pos"],
            state["has_gauss"],
            state["cached_gaussian"],
        )
    )


class DataOrder:
    """Which examples each micro-batch of each process holds.

    Epoch ``e`` shuffles the ``n`` examples with a generator seeded by ``(seed, e)``, keeps
    the first ``steps_per_epoch * batch_size * grad_accum * world_size`` (an incomplete last
    step is dropped), and gives process ``rank`` every ``world_size``-th of them (as
    ``DistributedSampler`` does). Micro-batch ``m`` of the epoch is then the ``m``-th run of
    ``batch_size`` examples of that share. Any position can be computed directly, so a resumed
    run jumps to its batch without replaying the ones before.
    """

    def __init__(
        self, n: int, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int
    ):
        self.n, self.batch_size, self.grad_accum = n, batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.steps_per_epoch = n // (batch_size * grad_accum * world_size)
        self._epoch: int | None = None
        self._share: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The shuffled order of all ``n`` examples in ``epoch``."""
        return torch.randperm(self.n, generator=seeded_generator(self.seed, "epoch", epoch))

    def micro_batch(self, epoch: int, index: int) -> list[int]:
        """The example indices of micro-batch ``index`` (0-based within the epoch)."""
        if not 0 <= index < self.steps_per_epoch * self.grad_accum:
            raise IndexError(f"micro-batch {index} outside the epoch")
        if self._epoch != epoch:
            used = self.steps_per_epoch * self.batch_size * self.grad_accum * self.world_size
            self._share = self.permutation(epoch)[:used][self.rank :: self.world_size]
            self._epoch = epoch
        assert self._share is not None
        return self._share[index * self.batch_size : (index + 1) * self.batch_size].tolist()
