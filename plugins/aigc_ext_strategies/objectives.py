"""Built-in objectives: causal LM, masked LM, T5 span corruption, classification.

An objective turns a raw batch into model inputs plus ``labels`` (:meth:`prepare`, where all of
its randomness comes from the ``generator`` it is given, so a seeded run is reproducible) and
computes the training loss from a model and a prepared batch (``__call__``). ``eval_metrics``
returns ``{name: (sum, count)}`` pairs that a runner accumulates over an evaluation set and reports
as ``sum / count``.

Models are called with keyword arguments taken from the batch (``input_ids``,
``attention_mask``, ``decoder_input_ids``, ``pixel_values``, ...), never with ``labels`` or
``loss_mask``, so a Hugging Face model does not compute a loss of its own; its output may be a
``ModelOutput`` (``.logits`` is used), a tuple (first element) or a plain logits tensor.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "CausalLM",
    "Classification",
    "MaskedLM",
    "SpanCorruption",
    "logits_of",
    "noise_span_counts",
    "random_spans_noise_mask",
    "register_all",
]

IGNORE_INDEX = -100
"""Label value that the losses ignore (the convention of ``torch.nn.functional.cross_entropy``)."""

# Keys that are targets or loss weights, never model inputs.
_NON_MODEL_KEYS = frozenset({"labels", "loss_mask"})
# Keys a language model is called with when the batch has them.
_TEXT_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_SEQ2SEQ_MODEL_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")


# --- helpers -------------------------------------------------------------------------------------


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: ``output.logits``, the first element of a tuple, or the
    tensor itself."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        "the model must return a logits tensor, a tuple whose first element is the logits, or an "
        f"object with a .logits tensor; got {type(output).__name__}"
    )


def _call_model(model: Any, batch: Mapping[str, Tensor], keys: Iterable[str] | None) -> Tensor:
    """Calls ``model`` with the batch entries named in ``keys`` (all but labels/loss_mask if
    ``None``) as keyword arguments and returns its logits."""
    if keys is None:
        inputs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
    else:
        inputs = {k: batch[k] for k in keys if k in batch}
    return logits_of(model(**inputs))


def _token_id(name: str, value: Any, *, vocab_size: int | None = None) -> int:
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


def _optional_token_id(name: str, value: Any, *, vocab_size: int | None = None) -> int | None:
    return None if value is None else _token_id(name, value, vocab_size=vocab_size)


def _token_ids(name: str, values: Any, *, vocab_size: int | None = None) -> tuple[int, ...]:
    """Validates a collection of token ids (``None`` means none)."""
    if values is None:
        return ()
    if isinstance(values, Tensor):
        values = values.flatten().tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of integer token ids, got {values!r}")
    return tuple(sorted({_token_id(f"{name} element", v, vocab_size=vocab_size) for v in values}))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _fraction(name: str, value: Any, *, low: float, high: float, closed: str) -> float:
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


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved to ``device`` (so a CPU
    generator serves data on any device)."""
    return torch.rand(shape, generator=generator, device=_generator_device(generator)).to(device)


def _randint(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    gen_device = _generator_device(generator)
    return torch.randint(high, shape, generator=generator, device=gen_device).to(device)


def _text_batch(batch: Mapping[str, Tensor], who: str) -> tuple[Tensor, Tensor]:
    """Validated ``input_ids`` (B, T) and ``attention_mask`` (ones where absent) of a text batch."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"{who}: a batch must be a dict of tensors, got {type(batch).__name__}")
    if "input_ids" not in batch:
        raise KeyError(f"{who}: the batch has no 'input_ids'; keys: {sorted(batch)}")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
        raise ValueError(f"{who}: input_ids must be a (batch, length) tensor, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"{who}: input_ids must be an integer tensor, got {input_ids.dtype}")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    elif not isinstance(mask, Tensor) or mask.shape != input_ids.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask)
        raise ValueError(
            f"{who}: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {shape}"
        )
    return input_ids, mask


def _labels_like(batch: Mapping[str, Tensor], key: str, shape: torch.Size, who: str) -> Tensor:
    value = batch[key]
    if not isinstance(value, Tensor) or value.shape != shape:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{who}: {key} must have the shape of input_ids {tuple(shape)}, got {got}")
    return value


def _token_losses(
    logits: Tensor, labels: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed cross-entropy over the labelled tokens, their number and how many the argmax got
    right. ``logits`` (..., V), ``labels`` (...) with ``IGNORE_INDEX`` for ignored positions."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} "
            "(expected logits of shape labels.shape + (vocab_size,))"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).long()
    loss_sum = F.cross_entropy(
        flat_logits,
        flat_labels,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    valid = flat_labels != IGNORE_INDEX
    count = valid.sum()
    correct = ((flat_logits.argmax(-1) == flat_labels) & valid).sum()
    return loss_sum, count, correct


def _mean_token_loss(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Mean cross-entropy over the labelled tokens; 0 (with a graph) when none is labelled,
    without a device synchronisation."""
    loss_sum, count, _ = _token_losses(logits, labels, label_smoothing)
    return loss_sum / count.clamp(min=1).to(loss_sum.dtype)


def _token_metrics(logits: Tensor, labels: Tensor) -> dict[str, tuple[float, int]]:
    loss_sum, count, correct = _token_losses(logits.float(), labels)
    n = int(count.item())
    return {"loss": (float(loss_sum.item()), n), "accuracy": (float(correct.item()), n)}


class _TokenObjective:
    """Shared by the token-level objectives: a subclass supplies ``_logits_and_labels(model,
    batch)`` (logits aligned with their labels, ``IGNORE_INDEX`` where no loss applies) and
    ``label_smoothing``; the loss and the evaluation metrics are computed the same way for all."""

    label_smoothing: float

    def _logits_and_labels(self, model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, model: Any, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean cross-entropy over the labelled tokens (0 if no token is labelled)."""
        logits, labels = self._logits_and_labels(model, batch)
        return _mean_token_loss(logits, labels, self.label_smoothing)

    @torch.no_grad()
    def eval_metrics(self, model: Any, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, int]]:
        """``loss``: (summed token cross-entropy, labelled tokens); ``accuracy``: (correctly
        predicted labelled tokens, labelled tokens)."""
        logits, labels = self._logits_and_labels(model, batch)
        return _token_metrics(logits, labels)


# --- causal LM -----------------------------------------------------------------------------------


class CausalLM(_TokenObjective):
    """Next-token prediction (GPT-style): the logits at position t predict the token at t + 1.

    :meth:`prepare` builds ``labels`` from ``input_ids`` (or takes ``batch["labels"]`` when the
    batch already has them, e.g. from a supervised fine-tuning collate), sets padding
    (``attention_mask == 0``) and positions where ``loss_mask == 0`` to ``IGNORE_INDEX`` and drops
    ``loss_mask``. The loss is the mean cross-entropy over the labelled tokens; ``eval_metrics``
    returns the summed token loss with the token count (``exp(loss)`` of the reported mean is the
    perplexity) and the next-token accuracy.

    Options: ``label_smoothing`` in [0, 1) (training loss only).
    """

    def __init__(self, *, label_smoothing: float = 0.0):
        self.label_smoothing = _fraction(
            "label_smoothing", label_smoothing, low=0, high=1, closed="l"
        )

    def prepare(
        self, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Adds ``attention_mask`` (ones if absent) and unshifted ``labels`` (-100 = ignored).
        Deterministic: ``generator`` is accepted for the protocol and not used."""
        input_ids, mask = _text_batch(batch, "causal-lm")
        if "labels" in batch:
            labels = _labels_like(batch, "labels", input_ids.shape, "causal-lm").long().clone()
        else:
            labels = input_ids.long().clone()
        labels[mask == 0] = IGNORE_INDEX
        if "loss_mask" in batch:
            loss_mask = _labels_like(batch, "loss_mask", input_ids.shape, "causal-lm")
            labels[loss_mask == 0] = IGNORE_INDEX
        out = {k: v for k, v in batch.items() if k != "loss_mask"}
        out["attention_mask"] = mask
        out["labels"] = labels
        return out

    def _logits_and_labels(self, model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "labels" not in batch or "loss_mask" in batch:
            batch = self.prepare(batch)
        logits = _call_model(model, batch, _TEXT_MODEL_KEYS)
        if logits.dim() != 3:
            raise ValueError(
                f"causal-lm: the model must return logits (batch, length, vocab), got "
                f"{tuple(logits.shape)}"
            )
        return logits[:, :-1], batch["labels"][:, 1:]


# --- masked LM -----------------------------------------------------------------------------------


class MaskedLM(_TokenObjective):
    """BERT's masked language modelling.

    In each sequence ``round(mlm_probability * n)`` of its ``n`` eligible tokens are chosen
    uniformly at random (at least one when ``n > 0``; this is how BERT's own data generator
    counts, rather than an independent coin per token). Eligible are real tokens
    (``attention_mask == 1``) that are neither in ``special_token_ids`` nor ``pad_token_id`` nor
    ``mask_token_id``. Each chosen token is replaced by ``mask_token_id`` with probability
    ``mask_replace_prob`` (0.8), by a random token with probability ``random_replace_prob`` (0.1),
    and kept otherwise (0.1). Random tokens are drawn uniformly from ``range(vocab_size)`` minus
    the special, padding and mask ids. ``labels`` hold the original id at chosen positions and
    ``IGNORE_INDEX`` elsewhere.
    """

    def __init__(
        self,
        *,
        mask_token_id: int | None = None,
        vocab_size: int | None = None,
        special_token_ids: Iterable[int] | None = None,
        pad_token_id: int | None = None,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        label_smoothing: float = 0.0,
    ):
        if mask_token_id is None:
            raise ValueError("masked-lm: mask_token_id is required (the id of the [MASK] token)")
        self.vocab_size = None if vocab_size is None else _positive_int("vocab_size", vocab_size)
        self.mask_token_id = _token_id("mask_token_id", mask_token_id, vocab_size=self.vocab_size)
        self.pad_token_id = _optional_token_id(
            "pad_token_id", pad_token_id, vocab_size=self.vocab_size
        )
        self.special_token_ids = _token_ids(
            "special_token_ids", special_token_ids, vocab_size=self.vocab_size
        )
        self.mlm_probability = _fraction(
            "mlm_probability", mlm_probability, low=0, high=1, closed=""
        )
        self.mask_replace_prob = _fraction(
            "mask_replace_prob", mask_replace_prob, low=0, high=1, closed="lr"
        )
        self.random_replace_prob = _fraction(
            "random_replace_prob", random_replace_prob, low=0, high=1, closed="lr"
        )
        if self.mask_replace_prob + self.random_replace_prob > 1 + 1e-9:
            raise ValueError(
                "mask_replace_prob + random_replace_prob must be <= 1, got "
                f"{self.mask_replace_prob:g} + {self.random_replace_prob:g}"
            )
        self.label_smoothing = _fraction(
            "label_smoothing", label_smoothing, low=0, high=1, closed="l"
        )
        excluded = {*self.special_token_ids, self.mask_token_id}
        if self.pad_token_id is not None:
            excluded.add(self.pad_token_id)
        self._excluded = torch.tensor(sorted(excluded), dtype=torch.long)
        self._replacement_ids: Tensor | None = None
        if self.random_replace_prob > 0:
            if self.vocab_size is None:
                raise ValueError(
                    "masked-lm: vocab_size is required when random_replace_prob > 0 "
                    f"(got random_replace_prob={self.random_replace_prob:g})"
                )
            ids = torch.arange(self.vocab_size)
            self._replacement_ids = ids[~torch.isin(ids, self._excluded)]
            if self._replacement_ids.numel() == 0:
                raise ValueError(
                    f"masked-lm: vocab_size={self.vocab_size} leaves no non-special token to use "
                    "as a random replacement"
                )

    def eligible(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Bool (B, T): positions that may be chosen for prediction."""
        return (attention_mask != 0) & ~torch.isin(input_ids, self._excluded.to(input_ids.device))

    def prepare(
        self, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Masks the batch; returns it with new ``input_ids``, ``attention_mask`` and ``labels``."""
        input_ids, mask = _text_batch(batch, "masked-lm")
        device = input_ids.device
        bsz, length = input_ids.shape
        eligible = self.eligible(input_ids, mask)
        n_eligible = eligible.sum(1)
        k = torch.round(n_eligible.double() * self.mlm_probability).long()
        k = torch.where(n_eligible > 0, k.clamp(min=1), k)
        # Uniform choice of k eligible positions per row: rank random scores, ineligible last.
        scores = _rand((bsz, length), generator, device).masked_fill(~eligible, 2.0)
        order = scores.argsort(dim=1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(length, device=device).expand(bsz, length))
        chosen = eligible & (rank < k[:, None])

        u = _rand((bsz, length), generator, device)
        to_mask = chosen & (u < self.mask_replace_prob)
        to_random = (
            chosen
            & (u >= self.mask_replace_prob)
            & (u < self.mask_replace_prob + self.random_replace_prob)
        )
        new_ids = input_ids.masked_fill(to_mask, self.mask_token_id)
        if self._replacement_ids is not None:
            pool = self._replacement_ids.to(device)
            random_ids = pool[_randint(pool.numel(), (bsz, length), generator, device)]
            new_ids = torch.where(to_random, random_ids.to(new_ids.dtype), new_ids)
        labels = torch.where(
            chosen, input_ids.long(), torch.full_like(input_ids.long(), IGNORE_INDEX)
        )
        out = {k: v for k, v in batch.items() if k != "loss_mask"}
        out.update(input_ids=new_ids, attention_mask=mask, labels=labels)
        return out

    def _logits_and_labels(self, model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "labels" not in batch:
            raise KeyError("masked-lm: the batch has no 'labels'; call prepare() on it first")
        return _call_model(model, batch, _TEXT_MODEL_KEYS), batch["labels"]


# --- span corruption (T5) ----------------------------------------------------------------------


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
    perm = torch.randperm(num_items - 1, generator=generator, device=_generator_device(generator))
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
    _fraction("noise_density", noise_density, low=0, high=1, closed="")
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


class SpanCorruption(_TokenObjective):
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
        self.sentinel_start_id = _token_id("sentinel_start_id", sentinel_start_id)
        self.eos_token_id = _token_id("eos_token_id", eos_token_id)
        self.pad_token_id = _token_id("pad_token_id", pad_token_id)
        self.decoder_start_token_id = (
            self.pad_token_id
            if decoder_start_token_id is None
            else _token_id("decoder_start_token_id", decoder_start_token_id)
        )
        self.noise_density = _fraction("noise_density", noise_density, low=0, high=1, closed="")
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
            None if num_sentinels is None else _positive_int("num_sentinels", num_sentinels)
        )
        if self.num_sentinels is not None and self.num_sentinels > self.sentinel_start_id + 1:
            raise ValueError(
                f"num_sentinels={self.num_sentinels} would need ids below 0 counting down from "
                f"sentinel_start_id={self.sentinel_start_id}"
            )
        self.label_smoothing = _fraction(
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
        input_ids, mask = _text_batch(batch, "span-corruption")
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
        return _call_model(model, batch, _SEQ2SEQ_MODEL_KEYS), batch["labels"]


# --- classification ------------------------------------------------------------------------------


class Classification:
    """Sequence or image classification with cross-entropy.

    ``labels`` are class indices (B,) or class probabilities (B, C) (soft labels, e.g. after
    MixUp/CutMix). The model is called with every batch entry except ``labels`` and
    ``loss_mask`` as keyword arguments (``input_ids``/``attention_mask`` or ``pixel_values``)
    and must return logits (B, C). ``eval_metrics`` gives the loss and the accuracy (the target
    class of a soft label is its argmax). Options: ``num_labels`` (checked against the labels and
    logits when set), ``label_smoothing`` in [0, 1).
    """

    def __init__(self, *, num_labels: int | None = None, label_smoothing: float = 0.0):
        self.num_labels = None if num_labels is None else _positive_int("num_labels", num_labels)
        self.label_smoothing = _fraction(
            "label_smoothing", label_smoothing, low=0, high=1, closed="l"
        )

    def _check_labels(self, labels: Any) -> None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"classification: labels must be a tensor, got {type(labels).__name__}")
        if labels.dim() == 1:
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise TypeError(
                    "classification: labels (B,) must hold integer class indices, got "
                    f"{labels.dtype}"
                )
            if self.num_labels is not None and labels.numel():
                lo, hi = int(labels.min()), int(labels.max())
                if lo < 0 or hi >= self.num_labels:
                    raise ValueError(
                        f"classification: labels must be in [0, {self.num_labels}), got values in "
                        f"[{lo}, {hi}]"
                    )
        elif labels.dim() == 2:
            if not labels.dtype.is_floating_point:
                raise TypeError(
                    f"classification: soft labels (B, C) must be floating point, got {labels.dtype}"
                )
            if self.num_labels is not None and labels.shape[1] != self.num_labels:
                raise ValueError(
                    f"classification: soft labels must have num_labels={self.num_labels} columns, "
                    f"got shape {tuple(labels.shape)}"
                )
        else:
            raise ValueError(
                "classification: labels must be (B,) class indices or (B, C) probabilities, got "
                f"shape {tuple(labels.shape)}"
            )

    def prepare(
        self, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Validates ``labels`` and returns a shallow copy of the batch (deterministic)."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"classification: a batch must be a dict of tensors, got {type(batch).__name__}"
            )
        if "labels" not in batch:
            raise KeyError(f"classification: the batch has no 'labels'; keys: {sorted(batch)}")
        self._check_labels(batch["labels"])
        return dict(batch)

    def _logits_and_labels(self, model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "labels" not in batch:
            raise KeyError(f"classification: the batch has no 'labels'; keys: {sorted(batch)}")
        labels = batch["labels"]
        logits = _call_model(model, batch, None)
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"classification: the model must return logits (batch, classes) for "
                f"{labels.shape[0]} examples, got {tuple(logits.shape)}"
            )
        if labels.dim() == 2 and labels.shape != logits.shape:
            raise ValueError(
                f"classification: soft labels {tuple(labels.shape)} do not match logits "
                f"{tuple(logits.shape)}"
            )
        if self.num_labels is not None and logits.shape[1] != self.num_labels:
            raise ValueError(
                f"classification: the model returns {logits.shape[1]} classes but "
                f"num_labels={self.num_labels}"
            )
        return logits, labels

    def _loss(self, logits: Tensor, labels: Tensor, reduction: str) -> Tensor:
        if labels.dim() == 2:
            target = labels.to(logits.dtype)
        else:
            target = labels.long()
        return F.cross_entropy(
            logits, target, reduction=reduction, label_smoothing=self.label_smoothing
        )

    def __call__(self, model: Any, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean cross-entropy over the batch (soft labels: against the given probabilities)."""
        logits, labels = self._logits_and_labels(model, batch)
        return self._loss(logits, labels, "mean")

    @torch.no_grad()
    def eval_metrics(self, model: Any, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, int]]:
        """``loss``: (summed cross-entropy, examples); ``accuracy``: (correct, examples)."""
        logits, labels = self._logits_and_labels(model, batch)
        loss_sum = F.cross_entropy(
            logits.float(), labels.float() if labels.dim() == 2 else labels.long(), reduction="sum"
        )
        target = labels.argmax(-1) if labels.dim() == 2 else labels.long()
        correct = (logits.argmax(-1) == target).sum()
        n = int(labels.shape[0])
        return {"loss": (float(loss_sum.item()), n), "accuracy": (float(correct.item()), n)}


def register_all(register: Callable[..., Any]) -> None:
    """Registers the built-in objectives."""
    register(
        "causal-lm", CausalLM, description="next-token prediction (GPT), shifted cross-entropy"
    )
    register(
        "masked-lm",
        MaskedLM,
        description="BERT masked LM: 15% of tokens chosen, 80% [MASK] / 10% random / 10% kept",
    )
    register(
        "span-corruption",
        SpanCorruption,
        description="T5 span corruption: noise spans replaced by sentinels, decoder predicts them",
    )
    register(
        "classification",
        Classification,
        description="cross-entropy classification with hard (B,) or soft (B, C) labels; accuracy",
    )
