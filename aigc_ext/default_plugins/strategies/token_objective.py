"""What the built-in token-level objectives share: calling the model, reading a text batch, and
the token cross-entropy with its evaluation metrics (:class:`TokenObjective`).

Models are called with keyword arguments taken from the batch (``input_ids``,
``attention_mask``, ``decoder_input_ids``, ``pixel_values``, ...), never with ``labels`` or
``loss_mask``, so a Hugging Face model does not compute a loss of its own; its output may be a
``ModelOutput`` (``.logits`` is used), a tuple (first element) or a plain logits tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aigc_ext.default_plugins.strategies.helpers import IGNORE_INDEX

__all__ = [
    "NON_MODEL_KEYS",
    "SEQ2SEQ_MODEL_KEYS",
    "TEXT_MODEL_KEYS",
    "TokenObjective",
    "call_model",
    "labels_like",
    "logits_of",
    "mean_token_loss",
    "text_batch",
    "token_losses",
    "token_metrics",
]

# Keys that are targets or loss weights, never model inputs.
NON_MODEL_KEYS = frozenset({"labels", "loss_mask"})
# Keys a language model is called with when the batch has them.
TEXT_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
SEQ2SEQ_MODEL_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")


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


def call_model(model: Any, batch: Mapping[str, Tensor], keys: Iterable[str] | None) -> Tensor:
    """Calls ``model`` with the batch entries named in ``keys`` (all but labels/loss_mask if
    ``None``) as keyword arguments and returns its logits."""
    if keys is None:
        inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    else:
        inputs = {k: batch[k] for k in keys if k in batch}
    return logits_of(model(**inputs))


def text_batch(batch: Mapping[str, Tensor], who: str) -> tuple[Tensor, Tensor]:
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


def labels_like(batch: Mapping[str, Tensor], key: str, shape: torch.Size, who: str) -> Tensor:
    value = batch[key]
    if not isinstance(value, Tensor) or value.shape != shape:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{who}: {key} must have the shape of input_ids {tuple(shape)}, got {got}")
    return value


def token_losses(
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


def mean_token_loss(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Mean cross-entropy over the labelled tokens; 0 (with a graph) when none is labelled,
    without a device synchronisation."""
    loss_sum, count, _ = token_losses(logits, labels, label_smoothing)
    return loss_sum / count.clamp(min=1).to(loss_sum.dtype)


def token_metrics(logits: Tensor, labels: Tensor) -> dict[str, tuple[float, int]]:
    loss_sum, count, correct = token_losses(logits.float(), labels)
    n = int(count.item())
    return {"loss": (float(loss_sum.item()), n), "accuracy": (float(correct.item()), n)}


class TokenObjective:
    """Shared by the token-level objectives: a subclass supplies ``_logits_and_labels(model,
    batch)`` (logits aligned with their labels, ``IGNORE_INDEX`` where no loss applies) and
    ``label_smoothing``; the loss and the evaluation metrics are computed the same way for all."""

    label_smoothing: float

    def _logits_and_labels(self, model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, model: Any, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean cross-entropy over the labelled tokens (0 if no token is labelled)."""
        logits, labels = self._logits_and_labels(model, batch)
        return mean_token_loss(logits, labels, self.label_smoothing)

    @torch.no_grad()
    def eval_metrics(self, model: Any, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, int]]:
        """``loss``: (summed token cross-entropy, labelled tokens); ``accuracy``: (correctly
        predicted labelled tokens, labelled tokens)."""
        logits, labels = self._logits_and_labels(model, batch)
        return token_metrics(logits, labels)
