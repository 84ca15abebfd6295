"""The built-in ``span-corruption`` objective: T5's pretraining task.

Random spans of the input (a fraction ``noise_density`` of the tokens, spans of mean length
``mean_noise_span_length``) are each replaced by one sentinel token; the decoder predicts the
dropped spans, each after its sentinel (:func:`random_spans_noise_mask` draws the spans from
the run's generator, :func:`noise_span_counts` says how many tokens and spans a length gets).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from aigc_ext.default_plugins.strategies.helpers import (
    IGNORE_INDEX,
    fraction,
    generator_device,
    positive_int,
    token_id,
)
from aigc_ext.default_plugins.strategies.token_objective import (
    SEQ2SEQ_MODEL_KEYS,
    TokenObjective,
    call_model,
    text_batch,
)

__all__ = ["SpanCorruption", "noise_span_counts", "random_spans_noise_mask"]


def noise_span_counts(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """(number of noise tokens, number of noise spans) that T5's span corruption uses for a
    sequence of ``length`` tokens.

    ``num_noise = round(length * noise_density)`` clamped to [1, length - 1] and
    ``num_spans = max(1, round(num_noise / mean_noise_span_length))``; ``round`` rounds half to
    even like ``tf.round``. ``num_spans`` is also capped at the number of non-noise tokens, since
    every noise span is preceded by a non-empty non-noise span (only matters for extreme
    settings). A sequence shorter than 2 tokens gets no noise: (0, 0).
    """
    if length < 2:
        return 0, 0
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(1, round(num_noise / mean_noise_span_length))
    num_spans = min(num_spans, num_noise, length - num_noise)
    return num_noise, num_spans


def _random_segmentation(
    num_items: int, num_segments: int, generator: torch.Generator | None
) -> Tensor:
    """Lengths (all >= 1, summing to ``num_items``) of a uniformly random split of ``num_items``
    items into ``num_segments`` contiguous segments."""
    if num_segments == 1:
        return torch.tensor([num_items])
    perm = torch.randperm(num_items - 1, generator=generator, device=generator_device(generator))
    cuts = (perm[: num_segments - 1].cpu() + 1).sort().values
    edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([num_items])])
    return edges.diff()


def random_spans_noise_mask(
    length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """T5's noise mask: a bool tensor of ``length`` with ``True`` at the corrupted positions.

    The counts come from :func:`noise_span_counts`; the noise tokens and the non-noise tokens are
    each split at random into ``num_spans`` non-empty spans, which are interleaved starting with a
    non-noise span (so the sequence starts with kept tokens and ends with a noise span; with a
    single span, as for short sequences, the noise is always the sequence's tail, as in T5).
    """
    length = operator.index(length)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    fraction("noise_density", noise_density, low=0, high=1, closed="")
    if mean_noise_span_length < 1:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length:g}")
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
    if num_noise == 0:
        return torch.zeros(length, dtype=torch.bool)
    noise_lengths = _random_segmentation(num_noise, num_spans, generator)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, generator)
    span_lengths = torch.stack([keep_lengths, noise_lengths], dim=1).reshape(-1)
    flags = torch.tensor([False, True]).repeat(num_spans)
    return flags.repeat_interleave(span_lengths)


def _sentinelize(tokens: Tensor, mask: Tensor, sentinel_start_id: int) -> Tensor:
    """``tokens`` with each run of ``mask == True`` replaced by one sentinel; the j-th run gets
    ``sentinel_start_id - j``."""
    starts = mask & ~torch.cat([mask.new_zeros(1), mask[:-1]])
    span_index = starts.cumsum(0) - 1
    values = torch.where(starts, sentinel_start_id - span_index, tokens)
    return values[~mask | starts]


class SpanCorruption(TokenObjective):
    """T5's span-corruption objective for encoder-decoder models.

    Per sequence (over its real tokens, ``attention_mask == 1``; a trailing ``eos_token_id`` is
    left out of the corruption and re-appended), :func:`random_spans_noise_mask` picks the noise
    spans. ``input_ids`` are the kept tokens with each noise span replaced by one sentinel
    (``sentinel_start_id`` for the first span, ``sentinel_start_id - 1`` for the next, ...: T5's
    ``<extra_id_0>`` is the highest id) followed by ``eos_token_id``; the targets are, for each
    noise span, its sentinel followed by the span's tokens, then ``eos_token_id``. Inputs and
    targets are right-padded with ``pad_token_id`` to the longest in the batch. :meth:`prepare`
    returns ``input_ids``, ``attention_mask``, ``decoder_input_ids`` (targets shifted right,
    starting with ``decoder_start_token_id``, which defaults to ``pad_token_id`` as in T5),
    ``decoder_attention_mask`` and ``labels`` (targets with padding as ``IGNORE_INDEX``).
    ``num_sentinels`` (optional) bounds the sentinels available; a sequence needing more spans is
    an error.
    """

    def __init__(
        self,
        *,
        sentinel_start_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        decoder_start_token_id: int | None = None,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        num_sentinels: int | None = None,
        label_smoothing: float = 0.0,
    ):
        for name, value in (
            ("sentinel_start_id", sentinel_start_id),
            ("eos_token_id", eos_token_id),
            ("pad_token_id", pad_token_id),
        ):
            if value is None:
                raise ValueError(f"span-corruption: {name} is required")
        self.sentinel_start_id = token_id("sentinel_start_id", sentinel_start_id)
        self.eos_token_id = token_id("eos_token_id", eos_token_id)
        self.pad_token_id = token_id("pad_token_id", pad_token_id)
        self.decoder_start_token_id = (
            self.pad_token_id
            if decoder_start_token_id is None
            else token_id("decoder_start_token_id", decoder_start_token_id)
        )
        self.noise_density = fraction("noise_density", noise_density, low=0, high=1, closed="")
        if isinstance(mean_noise_span_length, bool) or not isinstance(
            mean_noise_span_length, (int, float)
        ):
            raise TypeError(
                f"mean_noise_span_length must be a number, got {mean_noise_span_length!r}"
            )
        if mean_noise_span_length < 1:
            raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length:g}")
        self.mean_noise_span_length = float(mean_noise_span_length)
        self.num_sentinels = (
            None if num_sentinels is None else positive_int("num_sentinels", num_sentinels)
        )
        if self.num_sentinels is not None and self.num_sentinels > self.sentinel_start_id + 1:
            raise ValueError(
                f"num_sentinels={self.num_sentinels} would need ids below 0 counting down from "
                f"sentinel_start_id={self.sentinel_start_id}"
            )
        self.label_smoothing = fraction(
            "label_smoothing", label_smoothing, low=0, high=1, closed="l"
        )

    def corrupt(
        self, tokens: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(inputs, targets) for one unpadded 1-D sequence, both ending with ``eos_token_id``."""
        tokens = tokens.cpu().long()
        if tokens.numel() and int(tokens[-1]) == self.eos_token_id:
            tokens = tokens[:-1]
        _, num_spans = noise_span_counts(
            tokens.numel(), self.noise_density, self.mean_noise_span_length
        )
        limit = self.sentinel_start_id + 1 if self.num_sentinels is None else self.num_sentinels
        if num_spans > limit:
            raise ValueError(
                f"span-corruption: a sequence of {tokens.numel()} tokens needs {num_spans} "
                f"sentinels but only {limit} are available (sentinel_start_id="
                f"{self.sentinel_start_id}, num_sentinels={self.num_sentinels})"
            )
        noise = random_spans_noise_mask(
            tokens.numel(), self.noise_density, self.mean_noise_span_length, generator
        )
        eos = torch.tensor([self.eos_token_id])
        inputs = torch.cat([_sentinelize(tokens, noise, self.sentinel_start_id), eos])
        targets = torch.cat([_sentinelize(tokens, ~noise, self.sentinel_start_id), eos])
        return inputs, targets

    def prepare(
        self, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Corrupts every sequence; returns the five model-ready tensors described above."""
        input_ids, mask = text_batch(batch, "span-corruption")
        lengths = (mask != 0).sum(1).tolist()
        rows = input_ids.cpu()
        pairs = [self.corrupt(row[:n], generator) for row, n in zip(rows, lengths, strict=True)]
        bsz = len(pairs)
        max_in = max((p[0].numel() for p in pairs), default=1)
        max_out = max((p[1].numel() for p in pairs), default=1)
        enc = torch.full((bsz, max_in), self.pad_token_id, dtype=torch.long)
        enc_mask = torch.zeros((bsz, max_in), dtype=torch.long)
        labels = torch.full((bsz, max_out), IGNORE_INDEX, dtype=torch.long)
        dec = torch.full((bsz, max_out), self.pad_token_id, dtype=torch.long)
        dec_mask = torch.zeros((bsz, max_out), dtype=torch.long)
        for i, (inputs, targets) in enumerate(pairs):
            enc[i, : inputs.numel()] = inputs
            enc_mask[i, : inputs.numel()] = 1
            labels[i, : targets.numel()] = targets
            dec[i, 0] = self.decoder_start_token_id
            dec[i, 1 : targets.numel()] = targets[:-1]
            dec_mask[i, : targets.numel()] = 1
        device = input_ids.device
        return {
            "input_ids": enc.to(device),
            "attention_mask": enc_mask.to(device=device, dtype=mask.dtype),
            "decoder_input_ids": dec.to(device),
            "decoder_attention_mask": dec_mask.to(device=device, dtype=mask.dtype),
            "labels": labels.to(device),
        }

    def _logits_and_labels(self, model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "labels" not in batch or "decoder_input_ids" not in batch:
            raise KeyError(
                "span-corruption: the batch has no 'labels'/'decoder_input_ids'; call prepare() "
                "on it first"
            )
        return call_model(model, batch, SEQ2SEQ_MODEL_KEYS), batch["labels"]
