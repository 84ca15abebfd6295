"""How the built-in datasets hold their examples and batch them.

:class:`TensorDictDataset` (examples as rows of tensors of one shape) and
:class:`ExampleDataset` (a list of examples, e.g. sequences of different lengths) are the
``train``/``eval`` datasets of a :class:`~aigc_ext.training.components.DataBundle`;
:class:`PadCollate` stacks or pads examples into a batch and :class:`SFTCollate` batches
prompt/response pairs with the prompt masked out of the labels. The collators are classes
rather than closures so that data-loader worker processes can pickle them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["ExampleDataset", "PadCollate", "SFTCollate", "TensorDictDataset"]


class TensorDictDataset(Dataset):
    """Examples stored as a dict of tensors sharing their first dimension; item i is row i."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("TensorDictDataset needs at least one tensor")
        sizes = {k: v.shape[0] if v.dim() else None for k, v in tensors.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"all tensors need the same first dimension, got {sizes}")
        self.tensors = dict(tensors)
        self._len = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} examples")
        return {k: v[index] for k, v in self.tensors.items()}


class ExampleDataset(Dataset):
    """Examples stored as a list of dicts of tensors (e.g. sequences of different lengths)."""

    def __init__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.examples = [dict(e) for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return dict(self.examples[index])


class PadCollate:
    """Collates examples into a batch: equal shapes are stacked, 1-D sequences padded at the end.

    ``pad_values`` gives the padding value per key (``input_ids`` -> the padding id,
    ``attention_mask`` -> 0, ``labels`` -> -100); other keys pad with 0. A module-level class
    rather than a closure so that data-loader worker processes can pickle it.
    """

    def __init__(self, pad_values: Mapping[str, int | float] | None = None) -> None:
        self.pad_values = dict(pad_values or {})

    def __call__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        keys = list(examples[0])
        for i, e in enumerate(examples):
            if list(e) != keys:
                raise ValueError(f"example {i} has keys {sorted(e)}, example 0 has {sorted(keys)}")
        batch = {}
        for key in keys:
            items = [torch.as_tensor(e[key]) for e in examples]
            if all(t.shape == items[0].shape for t in items):
                batch[key] = torch.stack(items)
            elif all(t.dim() == 1 for t in items):
                length = max(t.shape[0] for t in items)
                out = items[0].new_full((len(items), length), self.pad_values.get(key, 0))
                for row, t in zip(out, items, strict=True):
                    row[: t.shape[0]] = t
                batch[key] = out
            else:
                shapes = [tuple(t.shape) for t in items]
                raise ValueError(f"cannot collate {key!r}: shapes {shapes} differ beyond 1-D")
        return batch


class SFTCollate:
    """Collates ``prompt_ids``/``response_ids`` examples with prompt masking.

    Calls ``aigc_ext_strategies.finetuning.sft_collate``: the batch has ``input_ids`` (prompt,
    response, end of sequence), ``attention_mask`` and ``labels`` with -100 on the prompt and
    the padding, so the loss covers the response only.
    """

    def __init__(self, pad_token_id: int, eos_token_id: int | None, max_length: int | None) -> None:
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_length = max_length

    def __call__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from aigc_ext_strategies.finetuning import sft_collate

        pairs = [(e["prompt_ids"], e["response_ids"]) for e in examples]
        return sft_collate(
            pairs,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            max_length=self.max_length,
        )
