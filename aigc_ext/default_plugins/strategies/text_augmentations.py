"""Built-in data augmentations for text (token ids).

Every augmentation is a class whose options are keyword arguments of its constructor (validated
there); an instance is called as ``aug(batch, *, generator=None)``. ``batch`` is a dict of tensors
(a new dict is returned; no input tensor is modified in place) or a bare tensor (``input_ids``
for text, ``pixel_values`` for images; a tensor is returned). All randomness is drawn from
``generator`` (the global RNG when it is ``None``), so the same seed gives the same output.

Text augmentations work on right-padded ``input_ids`` (B, T): the shape is kept, padding stays at
the end, ``attention_mask`` is recomputed (and added to a dict batch that had none), and special
tokens (``special_token_ids``) and padding are never changed. Real tokens are those with
``attention_mask == 1``, or, without a mask, those different from ``pad_token_id``. Augmentations
that move tokens (deletion, insertion, swap) move the other per-token entries of a dict batch
(shape (B, T, ...), e.g. ``labels``, ``loss_mask``, ``token_type_ids``; floating-point
``labels`` are taken for soft class labels and left alone) along with them; an
inserted token gets ``labels`` -100, ``loss_mask`` 0 and the previous token's value of any other
entry; new padding gets -100 in ``labels`` and 0 elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from aigc_ext.default_plugins.strategies.helpers import (
    IGNORE_INDEX,
    fraction,
    optional_token_id,
    positive_int,
    probability,
    rand,
    randint,
    token_id,
    token_ids,
)

__all__ = [
    "RandomDeletion",
    "RandomInsertion",
    "RandomSwap",
    "SpanMasking",
    "TokenMasking",
    "register_all",
]


class _TextAugmentation:
    """Shared batch handling of the text augmentations (see the module docstring)."""

    name = "text augmentation"

    def __init__(self, *, special_token_ids: Iterable[int] | None, pad_token_id: int | None):
        self.pad_token_id = optional_token_id("pad_token_id", pad_token_id)
        self.special_token_ids = token_ids("special_token_ids", special_token_ids)
        protected = set(self.special_token_ids)
        if self.pad_token_id is not None:
            protected.add(self.pad_token_id)
        self._protected = torch.tensor(sorted(protected), dtype=torch.long)

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, Tensor):
            input_ids, mask = batch, None
        elif isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise KeyError(f"{self.name}: the batch has no 'input_ids'; keys: {sorted(batch)}")
            input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        else:
            raise TypeError(
                f"{self.name}: expected a dict batch or an input_ids tensor, got "
                f"{type(batch).__name__}"
            )
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
            raise ValueError(
                f"{self.name}: input_ids must be a (batch, length) tensor, got {shape}"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(
                f"{self.name}: input_ids must be an integer tensor, got {input_ids.dtype}"
            )
        if mask is not None and (not isinstance(mask, Tensor) or mask.shape != input_ids.shape):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask)
            raise ValueError(
                f"{self.name}: attention_mask must have the shape of input_ids "
                f"{tuple(input_ids.shape)}, got {shape}"
            )
        return input_ids, mask

    def _real(self, input_ids: Tensor, mask: Tensor | None) -> Tensor:
        if mask is not None:
            real = mask != 0
        elif self.pad_token_id is not None:
            real = input_ids != self.pad_token_id
        else:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        if input_ids.shape[1] > 1 and (real[:, 1:] & ~real[:, :-1]).any():
            raise ValueError(
                f"{self.name}: padding must be at the end of each sequence (right padding); "
                "found a real token after padding"
            )
        return real

    def _candidates(self, input_ids: Tensor, real: Tensor) -> Tensor:
        """Real tokens that are neither special nor padding: the ones that may change."""
        return real & ~torch.isin(input_ids, self._protected.to(input_ids.device))

    def __call__(self, batch: Any, *, generator: torch.Generator | None = None) -> Any:
        input_ids, mask = self._unpack(batch)
        real = self._real(input_ids, mask)
        new_ids, new_real, src = self._apply(input_ids, real, generator)
        if isinstance(batch, Tensor):
            return new_ids
        out = dict(batch)
        out["input_ids"] = new_ids
        mask_dtype = mask.dtype if mask is not None else torch.long
        out["attention_mask"] = new_real.to(mask_dtype)
        if src is not None:
            _realign(out, src, batch, input_ids.shape)
        return out

    def _apply(
        self, input_ids: Tensor, real: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(new input_ids, new real-token mask, source positions or None if unchanged).

        Source positions (B, T): the old position of each new token, -1 for an inserted token,
        -2 for padding."""
        raise NotImplementedError

    def _fill_pad(self, ids: Tensor, keep: Tensor) -> Tensor:
        return torch.where(keep, ids, torch.full_like(ids, self.pad_token_id))


def _realign(out: dict, src: Tensor, batch: Mapping, shape: torch.Size) -> None:
    """Moves the per-token entries of ``batch`` (other than input_ids/attention_mask) like the
    tokens: ``out[key][b, t] = batch[key][b, src[b, t]]`` with the fills described above."""
    inserted, padding = src == -1, src == -2
    positions = torch.arange(src.shape[1], device=src.device).expand_as(src)
    last_kept = torch.where(src >= 0, positions, -1).cummax(dim=1).values
    left_src = src.gather(1, last_kept.clamp(min=0))
    index = torch.where(inserted, left_src, src).clamp(min=0)
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask") or not isinstance(value, Tensor):
            continue
        if value.dim() < 2 or value.shape[:2] != shape:
            continue
        if key == "labels" and value.dtype.is_floating_point:
            continue  # soft class labels (B, C), not per-token labels
        idx = index.to(value.device).reshape(*shape, *([1] * (value.dim() - 2)))
        moved = value.gather(1, idx.expand_as(value))
        extra = (1,) * (value.dim() - 2)
        pad_here = padding.reshape(*shape, *extra).to(value.device)
        ins_here = inserted.reshape(*shape, *extra).to(value.device)
        if key == "labels":
            moved = moved.masked_fill(pad_here | ins_here, IGNORE_INDEX)
        else:
            moved = moved.masked_fill(pad_here, 0)
            if key == "loss_mask":
                moved = moved.masked_fill(ins_here, 0)
        out[key] = moved


def _replacement_pool(vocab_size: int, protected: Tensor) -> Tensor:
    ids = torch.arange(vocab_size)
    pool = ids[~torch.isin(ids, protected)]
    if pool.numel() == 0:
        raise ValueError(f"vocab_size={vocab_size} leaves no non-special token to insert")
    return pool


class TokenMasking(_TextAugmentation):
    """Replaces each non-special real token with ``mask_token_id`` with probability ``p``."""

    name = "token-masking"

    def __init__(
        self,
        *,
        mask_token_id: int | None = None,
        p: float = 0.15,
        special_token_ids: Iterable[int] | None = None,
        pad_token_id: int | None = None,
    ):
        super().__init__(special_token_ids=special_token_ids, pad_token_id=pad_token_id)
        if mask_token_id is None:
            raise ValueError("token-masking: mask_token_id is required")
        self.mask_token_id = token_id("mask_token_id", mask_token_id)
        self.p = probability("p", p)

    def _apply(self, input_ids, real, generator):
        cand = self._candidates(input_ids, real)
        hit = cand & (rand(tuple(input_ids.shape), generator, input_ids.device) < self.p)
        return input_ids.masked_fill(hit, self.mask_token_id), real, None


def _geometric_start_probability(p: float, mean: float) -> float:
    """Start probability q of spans with Geometric(1 / mean) lengths (on 1, 2, ...) such that a
    position of an unbounded sequence is covered by some span with probability ``p``:
    ``1 - prod_k (1 - q * r**k) = p`` with ``r = 1 - 1 / mean`` (r**k = P(length > k))."""
    r = 1.0 - 1.0 / mean
    terms = 1 if r == 0 else int(math.log(1e-12) / math.log(r)) + 1

    def covered(q: float) -> float:
        return 1.0 - math.prod(1.0 - q * r**k for k in range(terms))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if covered(mid) < p else (lo, mid)
    return (lo + hi) / 2


class SpanMasking(_TextAugmentation):
    """Replaces contiguous spans of tokens with ``mask_token_id`` (SpanBERT-style noise).

    Spans start at non-special real tokens and have Geometric lengths with mean
    ``mean_span_length``; the start rate is set so that a fraction ``p`` of the tokens is masked in
    expectation (slightly less near the end of a sequence, where spans are cut). Special tokens
    and padding inside a span are left as they are.
    """

    name = "span-masking"

    def __init__(
        self,
        *,
        mask_token_id: int | None = None,
        p: float = 0.15,
        mean_span_length: float = 3.0,
        special_token_ids: Iterable[int] | None = None,
        pad_token_id: int | None = None,
    ):
        super().__init__(special_token_ids=special_token_ids, pad_token_id=pad_token_id)
        if mask_token_id is None:
            raise ValueError("span-masking: mask_token_id is required")
        self.mask_token_id = token_id("mask_token_id", mask_token_id)
        self.p = fraction("p", p, low=0, high=1, closed="l")
        if isinstance(mean_span_length, bool) or not isinstance(mean_span_length, (int, float)):
            raise TypeError(f"mean_span_length must be a number, got {mean_span_length!r}")
        if mean_span_length < 1:
            raise ValueError(f"mean_span_length must be >= 1, got {mean_span_length:g}")
        self.mean_span_length = float(mean_span_length)
        self._start_p = _geometric_start_probability(self.p, self.mean_span_length)

    def _apply(self, input_ids, real, generator):
        bsz, length = input_ids.shape
        device = input_ids.device
        cand = self._candidates(input_ids, real)
        starts = cand & (rand((bsz, length), generator, device) < self._start_p)
        r = 1.0 - 1.0 / self.mean_span_length
        u = 1.0 - rand((bsz, length), generator, device)  # in (0, 1]
        if r > 0:
            span = 1 + torch.floor(torch.log(u) / math.log(r)).clamp(max=length)
        else:
            span = torch.ones_like(u)
        positions = torch.arange(length, device=device).expand(bsz, length)
        ends = torch.where(starts, positions + span.long(), torch.full_like(positions, -1))
        covered = ends.cummax(dim=1).values > positions
        return input_ids.masked_fill(covered & cand, self.mask_token_id), real, None


class RandomDeletion(_TextAugmentation):
    """Deletes each non-special real token with probability ``p``; the remaining tokens move left
    and padding (``pad_token_id``) fills the end. A sequence always keeps at least one of its
    non-special tokens (a random one, if all were drawn for deletion)."""

    name = "random-deletion"

    def __init__(
        self,
        *,
        p: float = 0.1,
        special_token_ids: Iterable[int] | None = None,
        pad_token_id: int | None = None,
    ):
        super().__init__(special_token_ids=special_token_ids, pad_token_id=pad_token_id)
        if self.pad_token_id is None:
            raise ValueError("random-deletion: pad_token_id is required (it fills the freed end)")
        self.p = probability("p", p)

    def _apply(self, input_ids, real, generator):
        bsz, length = input_ids.shape
        device = input_ids.device
        cand = self._candidates(input_ids, real)
        delete = cand & (rand((bsz, length), generator, device) < self.p)
        # Rows that would lose all their candidates keep one at random.
        survivor_scores = rand((bsz, length), generator, device).masked_fill(~cand, -1.0)
        survivor = torch.zeros_like(cand).scatter_(1, survivor_scores.argmax(1, keepdim=True), True)
        wiped = cand.any(1) & ~(cand & ~delete).any(1)
        delete &= ~(survivor & wiped[:, None])
        keep = real & ~delete
        order = (~keep).to(torch.int8).argsort(dim=1, stable=True)
        new_len = keep.sum(1, keepdim=True)
        positions = torch.arange(length, device=device).expand(bsz, length)
        new_real = positions < new_len
        new_ids = self._fill_pad(input_ids.gather(1, order), new_real)
        src = torch.where(new_real, order, torch.full_like(order, -2))
        return new_ids, new_real, src


class RandomSwap(_TextAugmentation):
    """Swaps random pairs of non-special real tokens: ``n`` swaps per sequence, or, with ``p``,
    as many swaps as tokens drawn with probability ``p`` (exactly one of the two; default
    ``n=1``). Each swap exchanges two distinct positions; sequences with fewer than two
    non-special tokens are unchanged."""

    name = "random-swap"

    def __init__(
        self,
        *,
        n: int | None = None,
        p: float | None = None,
        special_token_ids: Iterable[int] | None = None,
        pad_token_id: int | None = None,
    ):
        super().__init__(special_token_ids=special_token_ids, pad_token_id=pad_token_id)
        if n is not None and p is not None:
            raise ValueError(f"random-swap: give n or p, not both (got n={n!r}, p={p!r})")
        self.p = None if p is None else probability("p", p)
        self.n = None
        if self.p is None:
            self.n = 1 if n is None else positive_int("n", n)

    def _apply(self, input_ids, real, generator):
        bsz, length = input_ids.shape
        device = input_ids.device
        cand = self._candidates(input_ids, real)
        if self.p is not None:
            swaps = (cand & (rand((bsz, length), generator, device) < self.p)).sum(1)
        else:
            swaps = torch.full((bsz,), self.n, device=device)
        swaps = torch.where(cand.sum(1) >= 2, swaps, torch.zeros_like(swaps))
        perm = torch.arange(length, device=device).repeat(bsz, 1)
        rows = torch.arange(bsz, device=device)
        for step in range(int(swaps.max()) if bsz else 0):
            active = swaps > step
            i = rand((bsz, length), generator, device).masked_fill(~cand, -1.0).argmax(1)
            not_i = cand.clone()
            not_i[rows, i] = False
            j = rand((bsz, length), generator, device).masked_fill(~not_i, -1.0).argmax(1)
            j = torch.where(active, j, i)
            pi, pj = perm[rows, i], perm[rows, j]
            perm[rows, i], perm[rows, j] = pj, pi
        return input_ids.gather(1, perm), real, perm


class RandomInsertion(_TextAugmentation):
    """Inserts random vocabulary tokens: right after each non-special real token, with
    probability ``p``, a token drawn uniformly from ``range(vocab_size)`` minus the special and
    padding ids. A sequence that grows beyond the length T is cut to T tokens; if its last real
    token was special (e.g. [SEP] or </s>), that token is kept as the last one."""

    name = "random-insertion"

    def __init__(
        self,
        *,
        p: float = 0.1,
        vocab_size: int | None = None,
        special_token_ids: Iterable[int] | None = None,
        pad_token_id: int | None = None,
    ):
        super().__init__(special_token_ids=special_token_ids, pad_token_id=pad_token_id)
        if vocab_size is None:
            raise ValueError("random-insertion: vocab_size is required (tokens are drawn from it)")
        if self.pad_token_id is None:
            raise ValueError("random-insertion: pad_token_id is required")
        self.vocab_size = positive_int("vocab_size", vocab_size)
        self.p = probability("p", p)
        self._pool = _replacement_pool(self.vocab_size, self._protected)

    def _apply(self, input_ids, real, generator):
        bsz, length = input_ids.shape
        device = input_ids.device
        cand = self._candidates(input_ids, real)
        insert = cand & (rand((bsz, length), generator, device) < self.p)
        pool = self._pool.to(device)
        tokens = pool[randint(pool.numel(), (bsz, length), generator, device)]
        width = 2 * length + 1  # room for every insertion, plus a dump column
        dump = width - 1
        positions = torch.arange(length, device=device).expand(bsz, length)
        shift = insert.long().cumsum(1) - insert.long()  # insertions before each token
        new_pos = positions + shift
        ext_src = torch.full((bsz, width), -2, dtype=torch.long, device=device)
        ext_src.scatter_(1, torch.where(real, new_pos, dump), positions)
        ins_pos = torch.where(insert, new_pos + 1, dump)
        ext_src.scatter_(1, ins_pos, torch.full_like(positions, -1))
        ext_tok = torch.zeros((bsz, width), dtype=input_ids.dtype, device=device)
        ext_tok.scatter_(1, ins_pos, tokens.to(input_ids.dtype))
        src, ins_tok = ext_src[:, :length].clone(), ext_tok[:, :length]
        old_len = real.sum(1)
        new_len = old_len + insert.sum(1)
        last = input_ids.gather(1, (old_len - 1).clamp(min=0)[:, None])[:, 0]
        keep_last = (
            (new_len > length) & (old_len > 0) & torch.isin(last, self._protected.to(device))
        )
        src[:, -1] = torch.where(keep_last, old_len - 1, src[:, -1])
        gathered = input_ids.gather(1, src.clamp(min=0))
        new_ids = torch.where(src == -1, ins_tok, gathered)
        new_real = src != -2
        return self._fill_pad(new_ids, new_real), new_real, src


def register_all(register: Callable[..., Any]) -> None:
    """Registers the built-in text augmentations."""
    augmentations = (
        (
            "token-masking",
            TokenMasking,
            "replace random tokens with the mask token (probability p)",
        ),
        ("random-deletion", RandomDeletion, "delete random tokens (probability p); pad at the end"),
        ("random-swap", RandomSwap, "swap random pairs of tokens (n pairs or probability p)"),
        ("random-insertion", RandomInsertion, "insert random vocabulary tokens (probability p)"),
        ("span-masking", SpanMasking, "mask contiguous token spans, a fraction p of the tokens"),
    )
    for name, cls, description in augmentations:
        register(name, cls, description=description)
