"""Built-in data augmentations for text (token ids) and images (pixel tensors).

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

Image augmentations work on ``pixel_values`` (B, C, H, W), floating point in [0, 1]. The random
parameters of each sample are drawn from the generator and applied with kornia's functional
operations (kornia's own augmentation modules draw from the global RNG, which would make a seeded
run depend on everything else using it). MixUp and CutMix also need ``labels`` and turn them into
soft labels (B, num_classes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aigc_ext_strategies.objectives import (
    IGNORE_INDEX,
    _fraction,
    _generator_device,
    _optional_token_id,
    _positive_int,
    _rand,
    _randint,
    _token_id,
    _token_ids,
)

__all__ = [
    "ColorJitter",
    "CutMix",
    "HorizontalFlip",
    "MixUp",
    "RandomDeletion",
    "RandomInsertion",
    "RandomResizedCrop",
    "RandomSwap",
    "Rotation",
    "SpanMasking",
    "TokenMasking",
    "VerticalFlip",
    "register_all",
]


# --- text ----------------------------------------------------------------------------------------


class _TextAugmentation:
    """Shared batch handling of the text augmentations (see the module docstring)."""

    name = "text augmentation"

    def __init__(self, *, special_token_ids: Iterable[int] | None, pad_token_id: int | None):
        self.pad_token_id = _optional_token_id("pad_token_id", pad_token_id)
        self.special_token_ids = _token_ids("special_token_ids", special_token_ids)
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


def _probability(name: str, value: Any) -> float:
    return _fraction(name, value, low=0, high=1, closed="lr")


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
        self.mask_token_id = _token_id("mask_token_id", mask_token_id)
        self.p = _probability("p", p)

    def _apply(self, input_ids, real, generator):
        cand = self._candidates(input_ids, real)
        hit = cand & (_rand(tuple(input_ids.shape), generator, input_ids.device) < self.p)
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
        self.mask_token_id = _token_id("mask_token_id", mask_token_id)
        self.p = _fraction("p", p, low=0, high=1, closed="l")
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
        starts = cand & (_rand((bsz, length), generator, device) < self._start_p)
        r = 1.0 - 1.0 / self.mean_span_length
        u = 1.0 - _rand((bsz, length), generator, device)  # in (0, 1]
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
        self.p = _probability("p", p)

    def _apply(self, input_ids, real, generator):
        bsz, length = input_ids.shape
        device = input_ids.device
        cand = self._candidates(input_ids, real)
        delete = cand & (_rand((bsz, length), generator, device) < self.p)
        # Rows that would lose all their candidates keep one at random.
        survivor_scores = _rand((bsz, length), generator, device).masked_fill(~cand, -1.0)
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
        self.p = None if p is None else _probability("p", p)
        self.n = None
        if self.p is None:
            self.n = 1 if n is None else _positive_int("n", n)

    def _apply(self, input_ids, real, generator):
        bsz, length = input_ids.shape
        device = input_ids.device
        cand = self._candidates(input_ids, real)
        if self.p is not None:
            swaps = (cand & (_rand((bsz, length), generator, device) < self.p)).sum(1)
        else:
            swaps = torch.full((bsz,), self.n, device=device)
        swaps = torch.where(cand.sum(1) >= 2, swaps, torch.zeros_like(swaps))
        perm = torch.arange(length, device=device).repeat(bsz, 1)
        rows = torch.arange(bsz, device=device)
        for step in range(int(swaps.max()) if bsz else 0):
            active = swaps > step
            i = _rand((bsz, length), generator, device).masked_fill(~cand, -1.0).argmax(1)
            not_i = cand.clone()
            not_i[rows, i] = False
            j = _rand((bsz, length), generator, device).masked_fill(~not_i, -1.0).argmax(1)
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
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.p = _probability("p", p)
        self._pool = _replacement_pool(self.vocab_size, self._protected)

    def _apply(self, input_ids, real, generator):
        bsz, length = input_ids.shape
        device = input_ids.device
        cand = self._candidates(input_ids, real)
        insert = cand & (_rand((bsz, length), generator, device) < self.p)
        pool = self._pool.to(device)
        tokens = pool[_randint(pool.numel(), (bsz, length), generator, device)]
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


# --- images --------------------------------------------------------------------------------------


class _ImageAugmentation:
    """Shared batch handling of the image augmentations (see the module docstring)."""

    name = "image augmentation"

    def _unpack(self, batch: Any) -> Tensor:
        if isinstance(batch, Tensor):
            pixels = batch
        elif isinstance(batch, Mapping):
            if "pixel_values" not in batch:
                raise KeyError(
                    f"{self.name}: the batch has no 'pixel_values'; keys: {sorted(batch)}"
                )
            pixels = batch["pixel_values"]
        else:
            raise TypeError(
                f"{self.name}: expected a dict batch or a pixel_values tensor, got "
                f"{type(batch).__name__}"
            )
        if not isinstance(pixels, Tensor) or pixels.dim() != 4:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels)
            raise ValueError(f"{self.name}: pixel_values must be (B, C, H, W), got {shape}")
        if not pixels.dtype.is_floating_point:
            raise TypeError(
                f"{self.name}: pixel_values must be floating point in [0, 1], got {pixels.dtype}"
            )
        return pixels

    def __call__(self, batch: Any, *, generator: torch.Generator | None = None) -> Any:
        pixels = self._unpack(batch)
        new = self._apply(pixels, generator)
        if isinstance(batch, Tensor):
            return new
        out = dict(batch)
        out["pixel_values"] = new
        return out

    def _apply(self, pixels: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError


def _per_sample(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(mask.reshape(-1, 1, 1, 1), new, old)


class _Flip(_ImageAugmentation):
    dim = -1

    def __init__(self, *, p: float = 0.5):
        self.p = _probability("p", p)

    def _apply(self, pixels, generator):
        hit = _rand((pixels.shape[0],), generator, pixels.device) < self.p
        return _per_sample(hit, pixels.flip(self.dim), pixels)


class HorizontalFlip(_Flip):
    """Mirrors each image left-right with probability ``p``."""

    name = "horizontal-flip"
    dim = -1


class VerticalFlip(_Flip):
    """Mirrors each image upside down with probability ``p``."""

    name = "vertical-flip"
    dim = -2


def _range_option(
    name: str, value: Any, *, symmetric_about: float | None, low: float, high: float
) -> tuple[float, float]:
    """A (min, max) option given as a pair or as one number ``x`` meaning
    ``(symmetric_about - x, symmetric_about + x)`` clipped to ``[low, high]``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value:g}")
        center = 0.0 if symmetric_about is None else symmetric_about
        lo, hi = max(low, center - value), min(high, center + value)
        if symmetric_about == 0.0 and value > high:
            raise ValueError(f"{name} must be in [0, {high:g}], got {value:g}")
        return float(lo), float(hi)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        lo, hi = float(value[0]), float(value[1])
        if not low <= lo <= hi <= high:
            raise ValueError(
                f"{name} must be a pair (min, max) with {low:g} <= min <= max <= {high:g}, "
                f"got {tuple(value)}"
            )
        return lo, hi
    raise TypeError(f"{name} must be a number or a (min, max) pair, got {value!r}")


def _uniform(
    lo: float, hi: float, n: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    return lo + (hi - lo) * _rand((n,), generator, device)


class Rotation(_ImageAugmentation):
    """Rotates each image (probability ``p``) by an angle drawn uniformly from
    ``(-degrees, degrees)`` or from a ``(min, max)`` pair, counter-clockwise about its centre,
    bilinear, with zeros outside the source image."""

    name = "rotation"

    def __init__(self, *, degrees: float | tuple[float, float] = 15.0, p: float = 1.0):
        self.degrees = _range_option(
            "degrees", degrees, symmetric_about=0.0, low=-360.0, high=360.0
        )
        self.p = _probability("p", p)

    def _apply(self, pixels, generator):
        from kornia.geometry.transform import rotate

        bsz = pixels.shape[0]
        angles = _uniform(*self.degrees, bsz, generator, pixels.device)
        hit = _rand((bsz,), generator, pixels.device) < self.p
        rotated = rotate(pixels.float(), angles.float(), mode="bilinear", align_corners=True)
        return _per_sample(hit, rotated.to(pixels.dtype), pixels)


def _crop_axis(start: Tensor, extent: Tensor, size: int) -> Tensor:
    """(B, size) normalised source coordinates (align_corners=True convention) that resample
    ``extent`` pixels starting at ``start`` onto ``size`` output pixels."""
    steps = torch.arange(size, device=start.device, dtype=torch.float32)
    frac = steps / (size - 1) if size > 1 else torch.full_like(steps, 0.5)
    pos = start[:, None] + frac[None] * (extent[:, None] - 1)
    return pos * (2.0 / (size - 1)) - 1.0 if size > 1 else torch.zeros_like(pos)


class RandomResizedCrop(_ImageAugmentation):
    """Crops a random region of each image and resizes it back to the input size (H, W).

    The region covers a fraction of the image area drawn from ``scale`` and has an aspect ratio
    (width / height) drawn log-uniformly from ``ratio``; as in torchvision, up to 10 draws are
    tried per image and a centre crop of the whole image (aspect ratio clamped to ``ratio``) is
    the fallback. Bilinear resampling."""

    name = "random-resized-crop"

    def __init__(
        self,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.scale = _range_option("scale", scale, symmetric_about=None, low=0.0, high=1.0)
        if self.scale[0] <= 0:
            raise ValueError(f"scale must be a pair (min, max) with 0 < min, got {tuple(scale)}")
        self.ratio = _range_option("ratio", ratio, symmetric_about=None, low=0.0, high=math.inf)
        if self.ratio[0] <= 0:
            raise ValueError(f"ratio must be a pair (min, max) with 0 < min, got {tuple(ratio)}")

    def boxes(self, bsz: int, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        """(B, 4) integer boxes (top, left, crop height, crop width)."""
        attempts = 10
        cpu = torch.device("cpu")
        area = height * width
        target = area * (
            self.scale[0] + (self.scale[1] - self.scale[0]) * _rand((bsz, attempts), generator, cpu)
        )
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand((bsz, attempts), generator, cpu))
        w = torch.round(torch.sqrt(target * aspect)).long()
        h = torch.round(torch.sqrt(target / aspect)).long()
        valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        top = (_rand((bsz, attempts), generator, cpu) * (height - h + 1).clamp(min=1)).long()
        left = (_rand((bsz, attempts), generator, cpu) * (width - w + 1).clamp(min=1)).long()
        first = valid.long().argmax(1, keepdim=True)
        chosen = torch.cat([t.gather(1, first) for t in (top, left, h, w)], dim=1)
        # Fallback: centre crop with the aspect ratio clamped into `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw, fh = round(height * self.ratio[1]), height
        else:
            fw, fh = width, height
        fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw])
        return torch.where(valid.any(1, keepdim=True), chosen, fallback)

    def _apply(self, pixels, generator):
        bsz, _, height, width = pixels.shape
        top, left, h, w = (
            self.boxes(bsz, height, width, generator).to(pixels.device).float().unbind(1)
        )
        # Output pixel u samples the source at left + u * (w - 1) / (width - 1) (corners map to
        # corners); a sampling grid (rather than a perspective warp from the box corners) also
        # handles one-pixel-wide boxes.
        xs = _crop_axis(left, w, width)
        ys = _crop_axis(top, h, height)
        grid = torch.stack(
            [xs[:, None, :].expand(bsz, height, width), ys[:, :, None].expand(bsz, height, width)],
            dim=-1,
        )
        out = torch.nn.functional.grid_sample(
            pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        return out.to(pixels.dtype)


class ColorJitter(_ImageAugmentation):
    """Random brightness, contrast, saturation and hue changes, applied in this order, each with
    a factor drawn per image.

    ``brightness``/``contrast``/``saturation`` ``x`` draw a factor from ``[max(0, 1 - x), 1 + x]``
    (or give a ``(min, max)`` pair); brightness multiplies the pixels, contrast blends with the
    image's mean grey level, saturation with its greyscale version (as torchvision does).
    ``hue`` ``h`` in [0, 0.5] shifts the hue by a fraction of a turn drawn from ``[-h, h]``.
    Saturation and hue need RGB images (3 channels): setting them for another number of channels
    is an error at call time. Results are clipped to [0, 1].
    """

    name = "color-jitter"

    def __init__(
        self,
        *,
        brightness: float | tuple[float, float] = 0.2,
        contrast: float | tuple[float, float] = 0.2,
        saturation: float | tuple[float, float] = 0.0,
        hue: float | tuple[float, float] = 0.0,
    ):
        def factor_range(name, value):
            return _range_option(name, value, symmetric_about=1.0, low=0.0, high=math.inf)

        self.brightness = factor_range("brightness", brightness)
        self.contrast = factor_range("contrast", contrast)
        self.saturation = factor_range("saturation", saturation)
        self.hue = _range_option("hue", hue, symmetric_about=0.0, low=-0.5, high=0.5)

    def _apply(self, pixels, generator):
        import kornia.enhance as ke

        bsz, channels = pixels.shape[:2]
        for name, rng in (("saturation", self.saturation), ("hue", self.hue)):
            neutral = (0.0, 0.0) if name == "hue" else (1.0, 1.0)
            if rng != neutral and channels != 3:
                raise ValueError(
                    f"color-jitter: {name} needs RGB images (3 channels), got {channels} "
                    f"channel(s); set {name}=0 for these images"
                )
        device = pixels.device
        factors = [
            _uniform(*rng, bsz, generator, device)
            for rng in (self.brightness, self.contrast, self.saturation, self.hue)
        ]
        x = pixels.float()
        if self.brightness != (1.0, 1.0):
            x = (x * factors[0].reshape(-1, 1, 1, 1)).clamp(0.0, 1.0)
        if self.contrast != (1.0, 1.0):
            x = ke.adjust_contrast_with_mean_subtraction(x, factors[1])
        if self.saturation != (1.0, 1.0):
            x = ke.adjust_saturation_with_gray_subtraction(x, factors[2]).clamp(0.0, 1.0)
        if self.hue != (0.0, 0.0):
            x = ke.adjust_hue(x, factors[3] * (2 * math.pi)).clamp(0.0, 1.0)
        return x.to(pixels.dtype)


class _Mixing(_ImageAugmentation):
    """Shared parts of MixUp and CutMix: Beta(alpha, alpha) draw, pairing, soft labels."""

    def __init__(self, *, alpha: float, num_classes: int | None, num_labels: int | None):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"{self.name}: alpha must be a number > 0, got {alpha!r}")
        self.alpha = float(alpha)
        if num_classes is not None:
            num_classes = _positive_int("num_classes", num_classes)
        if num_labels is not None:
            num_labels = _positive_int("num_labels", num_labels)
        if num_classes is not None and num_labels is not None and num_classes != num_labels:
            raise ValueError(
                f"{self.name}: num_classes={num_classes} and num_labels={num_labels} disagree"
            )
        self.num_classes = num_classes if num_classes is not None else num_labels

    def _lambda(self, generator: torch.Generator | None) -> float:
        # torch has no generator-driven Beta sampler: seed numpy's from the generator.
        seed = int(
            torch.randint(2**62, (1,), generator=generator, device=_generator_device(generator))
        )
        return float(np.random.default_rng(seed).beta(self.alpha, self.alpha))

    def _soft_labels(self, labels: Any) -> Tensor:
        if not isinstance(labels, Tensor):
            raise TypeError(f"{self.name}: labels must be a tensor, got {type(labels).__name__}")
        if labels.dim() == 2 and labels.dtype.is_floating_point:
            if self.num_classes is not None and labels.shape[1] != self.num_classes:
                raise ValueError(
                    f"{self.name}: soft labels must have num_classes={self.num_classes} columns, "
                    f"got shape {tuple(labels.shape)}"
                )
            return labels.float()
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"{self.name}: labels must be (B,) class indices or (B, C) float probabilities, "
                f"got shape {tuple(labels.shape)} dtype {labels.dtype}"
            )
        if self.num_classes is None:
            raise ValueError(
                f"{self.name}: num_classes is required to turn class indices into soft labels"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"{self.name}: labels must be in [0, {self.num_classes}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return torch.nn.functional.one_hot(labels.long(), self.num_classes).float()

    def __call__(self, batch: Any, *, generator: torch.Generator | None = None) -> dict:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"{self.name}: needs a dict batch with 'pixel_values' and 'labels', got "
                f"{type(batch).__name__}"
            )
        pixels = self._unpack(batch)
        if "labels" not in batch:
            raise KeyError(f"{self.name}: the batch has no 'labels'; keys: {sorted(batch)}")
        soft = self._soft_labels(batch["labels"]).to(pixels.device)
        if soft.shape[0] != pixels.shape[0]:
            raise ValueError(f"{self.name}: {soft.shape[0]} labels for {pixels.shape[0]} images")
        lam = self._lambda(generator)
        perm = torch.randperm(
            pixels.shape[0], generator=generator, device=_generator_device(generator)
        ).to(pixels.device)
        new_pixels, weight = self._mix(pixels, perm, lam, generator)
        out = dict(batch)
        out["pixel_values"] = new_pixels
        out["labels"] = weight * soft + (1.0 - weight) * soft[perm]
        return out

    def _mix(
        self, pixels: Tensor, perm: Tensor, lam: float, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        raise NotImplementedError


class MixUp(_Mixing):
    """MixUp: each image is blended with a partner from a random permutation of the batch,
    ``lam * x + (1 - lam) * x[perm]``, with one ``lam ~ Beta(alpha, alpha)`` per batch; the
    labels are mixed with the same weights into soft labels (B, num_classes). ``num_classes``
    falls back to ``num_labels`` and is not needed when the labels are already soft."""

    name = "mixup"

    def __init__(
        self, *, alpha: float = 0.2, num_classes: int | None = None, num_labels: int | None = None
    ):
        super().__init__(alpha=alpha, num_classes=num_classes, num_labels=num_labels)

    def _mix(self, pixels, perm, lam, generator):
        return lam * pixels + (1.0 - lam) * pixels[perm], lam


class CutMix(_Mixing):
    """CutMix: a box from each partner image (random permutation of the batch) is pasted into
    the image. ``lam ~ Beta(alpha, alpha)`` sets the box side to ``sqrt(1 - lam)`` of the image
    sides around a uniformly drawn centre (clipped at the borders; one box per batch); the labels
    are mixed by the actual pasted area: weight ``1 - box_area / (H * W)`` for the image's own
    label."""

    name = "cutmix"

    def __init__(
        self, *, alpha: float = 1.0, num_classes: int | None = None, num_labels: int | None = None
    ):
        super().__init__(alpha=alpha, num_classes=num_classes, num_labels=num_labels)

    def box(
        self, height: int, width: int, lam: float, generator: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        """(y1, y2, x1, x2) of the pasted box for mixing weight ``lam``."""
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cpu = torch.device("cpu")
        cy = int(_randint(height, (1,), generator, cpu))
        cx = int(_randint(width, (1,), generator, cpu))
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        return y1, y2, x1, x2

    def _mix(self, pixels, perm, lam, generator):
        height, width = pixels.shape[-2:]
        y1, y2, x1, x2 = self.box(height, width, lam, generator)
        out = pixels.clone()
        out[:, :, y1:y2, x1:x2] = pixels[perm][:, :, y1:y2, x1:x2]
        return out, 1.0 - (y2 - y1) * (x2 - x1) / (height * width)


def register_all(register: Callable[..., Any]) -> None:
    """Registers the built-in augmentations."""
    text = (
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
    image = (
        ("rotation", Rotation, "rotate images by a random angle within degrees"),
        ("horizontal-flip", HorizontalFlip, "mirror images left-right (probability p)"),
        ("vertical-flip", VerticalFlip, "mirror images upside down (probability p)"),
        ("random-resized-crop", RandomResizedCrop, "crop a random region, resize to input size"),
        ("color-jitter", ColorJitter, "random brightness, contrast, saturation and hue"),
        ("mixup", MixUp, "blend image pairs and their labels (Beta(alpha, alpha)); soft labels"),
        ("cutmix", CutMix, "paste a box from another image; labels mixed by area; soft labels"),
    )
    for name, cls, description in (*text, *image):
        register(name, cls, description=description)
