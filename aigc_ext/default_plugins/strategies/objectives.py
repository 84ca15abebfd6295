"""Built-in objectives: causal LM, masked LM, T5 span corruption, classification.

An objective turns a raw batch into model inputs plus ``labels`` (:meth:`prepare`, where all of
its randomness comes from the ``generator`` it is given, so a seeded run is reproducible) and
computes the training loss from a model and a prepared batch (``__call__``). ``eval_metrics``
returns ``{name: (sum, count)}`` pairs that a runner accumulates over an evaluation set and reports
as ``sum / count``.

How models are called and the token losses computed is shared with the span corruption
objective (:mod:`~aigc_ext.default_plugins.strategies.span_corruption`, T5's task) in
:mod:`~aigc_ext.default_plugins.strategies.token_objective`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aigc_ext.default_plugins.strategies.helpers import (
    IGNORE_INDEX,
    fraction,
    optional_token_id,
    positive_int,
    rand,
    randint,
    token_id,
    token_ids,
)
from aigc_ext.default_plugins.strategies.span_corruption import SpanCorruption
from aigc_ext.default_plugins.strategies.token_objective import (
    TEXT_MODEL_KEYS,
    TokenObjective,
    call_model,
    labels_like,
    text_batch,
)

__all__ = ["CausalLM", "Classification", "MaskedLM", "register_all"]


# --- causal LM -----------------------------------------------------------------------------------


class CausalLM(TokenObjective):
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
        self.label_smoothing = fraction(
            "label_smoothing", label_smoothing, low=0, high=1, closed="l"
        )

    def prepare(
        self, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Adds ``attention_mask`` (ones if absent) and unshifted ``labels`` (-100 = ignored).
        Deterministic: ``generator`` is accepted for the protocol and not used."""
        input_ids, mask = text_batch(batch, "causal-lm")
        if "labels" in batch:
            labels = labels_like(batch, "labels", input_ids.shape, "causal-lm").long().clone()
        else:
            labels = input_ids.long().clone()
        labels[mask == 0] = IGNORE_INDEX
        if "loss_mask" in batch:
            loss_mask = labels_like(batch, "loss_mask", input_ids.shape, "causal-lm")
            labels[loss_mask == 0] = IGNORE_INDEX
        out = {k: v for k, v in batch.items() if k != "loss_mask"}
        out["attention_mask"] = mask
        out["labels"] = labels
        return out

    def _logits_and_labels(self, model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "labels" not in batch or "loss_mask" in batch:
            batch = self.prepare(batch)
        logits = call_model(model, batch, TEXT_MODEL_KEYS)
        if logits.dim() != 3:
            raise ValueError(
                f"causal-lm: the model must return logits (batch, length, vocab), got "
                f"{tuple(logits.shape)}"
            )
        return logits[:, :-1], batch["labels"][:, 1:]


# --- masked LM -----------------------------------------------------------------------------------


class MaskedLM(TokenObjective):
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
        self.vocab_size = None if vocab_size is None else positive_int("vocab_size", vocab_size)
        self.mask_token_id = token_id("mask_token_id", mask_token_id, vocab_size=self.vocab_size)
        self.pad_token_id = optional_token_id(
            "pad_token_id", pad_token_id, vocab_size=self.vocab_size
        )
        self.special_token_ids = token_ids(
            "special_token_ids", special_token_ids, vocab_size=self.vocab_size
        )
        self.mlm_probability = fraction(
            "mlm_probability", mlm_probability, low=0, high=1, closed=""
        )
        self.mask_replace_prob = fraction(
            "mask_replace_prob", mask_replace_prob, low=0, high=1, closed="lr"
        )
        self.random_replace_prob = fraction(
            "random_replace_prob", random_replace_prob, low=0, high=1, closed="lr"
        )
        if self.mask_replace_prob + self.random_replace_prob > 1 + 1e-9:
            raise ValueError(
                "mask_replace_prob + random_replace_prob must be <= 1, got "
                f"{self.mask_replace_prob:g} + {self.random_replace_prob:g}"
            )
        self.label_smoothing = fraction(
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
        input_ids, mask = text_batch(batch, "masked-lm")
        device = input_ids.device
        bsz, length = input_ids.shape
        eligible = self.eligible(input_ids, mask)
        n_eligible = eligible.sum(1)
        k = torch.round(n_eligible.double() * self.mlm_probability).long()
        k = torch.where(n_eligible > 0, k.clamp(min=1), k)
        # Uniform choice of k eligible positions per row: rank random scores, ineligible last.
        scores = rand((bsz, length), generator, device).masked_fill(~eligible, 2.0)
        order = scores.argsort(dim=1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(length, device=device).expand(bsz, length))
        chosen = eligible & (rank < k[:, None])

        u = rand((bsz, length), generator, device)
        to_mask = chosen & (u < self.mask_replace_prob)
        to_random = (
            chosen
            & (u >= self.mask_replace_prob)
            & (u < self.mask_replace_prob + self.random_replace_prob)
        )
        new_ids = input_ids.masked_fill(to_mask, self.mask_token_id)
        if self._replacement_ids is not None:
            pool = self._replacement_ids.to(device)
            random_ids = pool[randint(pool.numel(), (bsz, length), generator, device)]
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
        return call_model(model, batch, TEXT_MODEL_KEYS), batch["labels"]


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
        self.num_labels = None if num_labels is None else positive_int("num_labels", num_labels)
        self.label_smoothing = fraction(
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
        logits = call_model(model, batch, None)
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
