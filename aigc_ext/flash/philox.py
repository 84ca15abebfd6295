"""Philox4x32-10 in PyTorch, and the dropout keep mask of the FlashAttention operator contract.

The contract's dropout is counter-based: whether score ``(b, h, i, j)`` is kept depends only on
``rng_state = [seed, offset]`` and on those four indices, never on how a kernel splits the work
into threads or blocks, so a backward regenerates the forward's mask instead of storing it and
every backend draws the same mask (``docs/flash-contract.md``, "Dropout: the keep mask").

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
128-bit counter and a 64-bit key to 128 random bits through ten rounds of 32 x 32 -> 64-bit
multiplies. Here it runs on int64 tensors holding 32-bit words (values in ``[0, 2**32)``): a
product of two such words fits in 64 bits as an unsigned number, and int64 multiplication
wraps modulo ``2**64``, so the low word is ``p & 0xFFFFFFFF`` and the high word
``(p >> 32) & 0xFFFFFFFF`` (the arithmetic shift's sign bits are masked off). The known-answer
vectors of Random123 pin this down in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "dropout_keep_mask",
    "dropout_threshold",
    "philox4x32_10",
]

PHILOX_M0 = 0xD2511F53  # multiplier of counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplier of counter word 2
PHILOX_W0 = 0x9E3779B9  # key increment of key word 0 (golden ratio)
PHILOX_W1 = 0xBB67AE85  # key increment of key word 1 (sqrt(3) - 1)
ROUNDS = 10
MASK32 = 0xFFFFFFFF
# Elements of one working array in dropout_keep_mask: a few arrays of 2 MiB stay in the caches,
# where the ~120 elementwise passes of ten rounds run several times faster than from memory.
_CHUNK_ELEMENTS = 1 << 18

Word = torch.Tensor | int


def _first_round(c0: Word, c1: Word, c2: Word, c3: Word, k0: int, k1: int):
    """Round one on the words as given (broadcasting): counter words are often constant along
    some dims, so this round costs far less than the others."""
    p0 = torch.as_tensor(c0, dtype=torch.int64) * PHILOX_M0
    p1 = torch.as_tensor(c2, dtype=torch.int64) * PHILOX_M1
    n0 = ((p1 >> 32) ^ c1 ^ k0) & MASK32
    n2 = ((p0 >> 32) ^ c3 ^ k1) & MASK32
    return n0, p1 & MASK32, n2, p0 & MASK32


def philox4x32_10(
    counter: tuple[Word, Word, Word, Word], key: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of ``counter`` (four 32-bit words: int64 tensors that broadcast together,
    or Python ints) under ``key`` (two 32-bit ints); returns the four output words as int64
    tensors of the broadcast shape, each in ``[0, 2**32)``.

    A round maps ``(c0, c1, c2, c3)`` to
    ``(hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))``; the key is bumped by
    ``(W0, W1)`` between rounds. Rounds two to ten run in place on contiguous buffers.
    """
    k0, k1 = int(key[0]) & MASK32, int(key[1]) & MASK32
    words = _first_round(*counter, k0, k1)
    shape = torch.broadcast_shapes(*(w.shape for w in words))
    c0, c1, c2, c3 = (w.expand(shape).contiguous() for w in words)
    p0, p1 = torch.empty_like(c0), torch.empty_like(c0)
    for _ in range(ROUNDS - 1):
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        torch.mul(c0, PHILOX_M0, out=p0)
        torch.mul(c2, PHILOX_M1, out=p1)
        torch.bitwise_right_shift(p1, 32, out=c0)
        c0.bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(MASK32)
        torch.bitwise_and(p1, MASK32, out=c1)
        torch.bitwise_right_shift(p0, 32, out=c2)
        c2.bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(MASK32)
        torch.bitwise_and(p0, MASK32, out=c3)
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """``t = min(floor(dropout_p * 2**24), 2**24)``: a score is kept iff its 24 drawn bits are
    ``>= t``, so that the keep probability is ``1 - t / 2**24``, within ``2**-24`` of
    ``1 - dropout_p``."""
    return min(math.floor(dropout_p * (1 << 24)), 1 << 24)


def _seed_offset(rng_state: torch.Tensor | Sequence[int]) -> tuple[int, int]:
    values = rng_state.tolist() if isinstance(rng_state, torch.Tensor) else list(rng_state)
    if len(values) != 2:
        raise ValueError(
            f"dropout_keep_mask: rng_state must hold 2 values [seed, offset]; got {values!r}"
        )
    return int(values[0]), int(values[1])


def dropout_keep_mask(
    rng_state: torch.Tensor | Sequence[int],
    batch_index: int,
    head_index: int | Sequence[int] | torch.Tensor,
    len_q: int,
    len_k: int,
    dropout_p: float,
    heads_q: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The contract's dropout keep mask of one sequence and head: bool ``(len_q, len_k)``,
    True where score ``(i, j)`` is kept.

    ``rng_state`` is ``[seed, offset]`` (an int64 tensor of 2, as the operators take it, or two
    ints). The key is ``(seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)``, the counter
    ``(j >> 2, i, batch_index * heads_q + head, offset & 0xFFFFFFFF)``, and word ``j & 3`` of
    the output decides: kept iff ``(u >> 8) >= dropout_threshold(dropout_p)``. ``i`` and ``j``
    are positions within the sequence (for a KV cache, ``j`` counts from ``leftpad_k[b]``).

    ``head_index`` may also be a sequence of heads: the result is then ``(len(heads), len_q,
    len_k)``, one mask per head, computed together. Rows are processed in chunks that keep the
    working arrays in the caches (4096 x 4096 takes a fraction of a second on two cores).
    """
    seed, offset = _seed_offset(rng_state)
    key = (seed & MASK32, (seed >> 32) & MASK32)
    threshold = dropout_threshold(dropout_p)
    single = isinstance(head_index, int)
    heads = torch.as_tensor([head_index] if single else head_index, dtype=torch.int64).reshape(-1)
    n_heads = heads.numel()
    mask = torch.empty((n_heads, len_q, len_k), dtype=torch.bool)
    groups = (len_k + 3) // 4  # counters per row: each yields four words, for j = 4g .. 4g+3
    if mask.numel():
        streams = (batch_index * heads_q + heads).view(-1, 1, 1)  # counter word 2
        col = torch.arange(groups, dtype=torch.int64).view(1, 1, -1)  # counter word 0
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, n_heads * groups))
        for start in range(0, len_q, rows_per_chunk):
            stop = min(len_q, start + rows_per_chunk)
            row = torch.arange(start, stop, dtype=torch.int64).view(1, -1, 1)  # counter word 1
            words = philox4x32_10((col, row, streams, offset & MASK32), key)
            u = torch.stack(words, dim=-1).view(n_heads, stop - start, 4 * groups)[..., :len_k]
            mask[:, start:stop] = (u >> 8) >= threshold
    if device is not None:
        mask = mask.to(device)
    return mask[0] if single else mask
