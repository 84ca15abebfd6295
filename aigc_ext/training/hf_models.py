"""The ``hf`` model family: any local Hugging Face transformers checkpoint directory.

::

    [model]
    name = "hf"
    path = "checkpoints/my-model"     # a save_pretrained directory; never a hub name
    task = "causal-lm"                # optional: inferred from the objective

The checkpoint is loaded with the ``AutoModelFor...`` class of its task (:data:`TASK_CLASSES`):
``causal-lm``, ``masked-lm``, ``seq2seq`` or ``sequence-classification`` (a new head of
``num_labels`` outputs when the checkpoint has none or another size). Without ``task``, the
run's objective decides (:data:`OBJECTIVE_TASKS`: ``causal-lm`` -> causal LM, ``masked-lm`` ->
masked LM, ``span-corruption`` -> seq2seq, ``classification`` -> sequence classification), then
the checkpoint's own ``architectures``. Loading is always ``local_files_only``: nothing is
downloaded. Attention runs on aigc_ext (``attn_implementation="aigc_ext"``) unless the option
says otherwise. The tokenizer of the same directory is the file datasets' default
(:mod:`aigc_ext.training.file_data`); the finetuners (LoRA), transfer strategies and objectives
apply to the loaded model as to the built-in ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from aigc_ext.training.components import builtin_table
from aigc_ext.training.hf_tokenizers import quiet_transformers
from aigc_ext.training.model_options import (
    attn_implementation as aigc_attention,
)
from aigc_ext.training.model_options import (
    init_rng,
    model_options,
    positive,
    probability,
)

# Registered by aigc_ext.default_plugins.training, through the hook.
BUILTIN_MODELS, register_model = builtin_table()

__all__ = ["DTYPES", "OBJECTIVE_TASKS", "TASK_CLASSES", "hf", "infer_task"]

TASK_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "sequence-classification": "AutoModelForSequenceClassification",
}
"""The ``task`` option's values and the transformers class each loads with."""

OBJECTIVE_TASKS = {
    "causal-lm": "causal-lm",
    "masked-lm": "masked-lm",
    "span-corruption": "seq2seq",
    "classification": "sequence-classification",
}
"""The task a built-in objective trains, used when ``task`` is not given."""

_ARCHITECTURE_SUFFIXES = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
    ("ForConditionalGeneration", "seq2seq"),
)

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""The ``torch_dtype`` option's values (``auto``: the dtype the checkpoint was saved in)."""

# Config attributes that hold the attention-weight dropout, by architecture family.
_ATTN_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")
_POSITION_KEYS = ("max_position_embeddings", "n_positions")


def _checkpoint_config(path: Any) -> tuple[Path, Any]:
    """The checkpoint directory and its ``AutoConfig`` (ValueError when it is none)."""
    from transformers import AutoConfig

    if path is None:
        raise ValueError(
            "path is required: a local checkpoint directory written by save_pretrained "
            "(--set model.path=DIR)"
        )
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a directory path, got {path!r}")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"path={str(path)!r} is not a directory; the hf model loads local checkpoints only "
            "(a save_pretrained directory with config.json), nothing is downloaded"
        )
    if not (directory / "config.json").is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise ValueError(
            f"path={str(path)!r} has no config.json, so it is no transformers checkpoint; "
            f"it holds {', '.join(found) or 'nothing'}"
        )
    try:
        with quiet_transformers():
            return directory, AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"path={str(path)!r}: cannot read its config.json: {exc}") from None


def infer_task(task: str | None, objective: str | None, config: Any) -> str:
    """The task to load a checkpoint for: ``task`` when given, else the objective's
    (:data:`OBJECTIVE_TASKS`), else the one the checkpoint's ``architectures`` names."""
    if task is not None:
        if task not in TASK_CLASSES:
            raise ValueError(f"task must be one of {', '.join(TASK_CLASSES)}; got {task!r}")
        return task
    if objective in OBJECTIVE_TASKS:
        return OBJECTIVE_TASKS[objective]
    for architecture in getattr(config, "architectures", None) or ():
        for suffix, found in _ARCHITECTURE_SUFFIXES:
            if architecture.endswith(suffix):
                return found
    raise ValueError(
        f"cannot tell which task to load the checkpoint for (objective {objective!r}, "
        f"architectures {getattr(config, 'architectures', None)}); set task to one of "
        f"{', '.join(TASK_CLASSES)}"
    )


def _dtype(torch_dtype: str) -> Any:
    import torch

    if torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype must be one of {', '.join(DTYPES)}; got {torch_dtype!r}")
    return "auto" if torch_dtype == "auto" else getattr(torch, torch_dtype)


def _labels(info: dict[str, Any], num_labels: int | None, config: Any) -> dict[str, Any]:
    """``num_labels`` (and label names) for a sequence-classification head: the option, the
    dataset's, or the head of a checkpoint that is a classifier already."""
    if num_labels is None:
        num_labels = info.get("num_labels")
    architectures = getattr(config, "architectures", None) or ()
    if num_labels is None and any(a.endswith("ForSequenceClassification") for a in architectures):
        num_labels = config.num_labels
    if num_labels is None:
        raise ValueError(
            "task 'sequence-classification' needs num_labels (an option, or the dataset's "
            "info['num_labels'])"
        )
    positive("num_labels", num_labels)
    out: dict[str, Any] = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    names = info.get("label_names")
    if isinstance(names, list | tuple) and len(names) == num_labels:
        out["id2label"] = {i: str(name) for i, name in enumerate(names)}
        out["label2id"] = {str(name): i for i, name in enumerate(names)}
    return out


def _check_fits(model: nn.Module, info: dict[str, Any], path: Path) -> None:
    """The dataset's tokens must be ids of the model's embeddings, its sequences within the
    model's positions."""
    rows = model.get_input_embeddings().num_embeddings
    vocab = info.get("vocab_size")
    if isinstance(vocab, int) and vocab > rows:
        raise ValueError(
            f"the dataset's tokenizer has {vocab} tokens but the checkpoint at {str(path)!r} "
            f"embeds {rows}; use that checkpoint's tokenizer, or set resize_embeddings = true"
        )
    length = info.get("max_length")
    if hasattr(model.config, "relative_attention_num_buckets"):
        return  # relative positions (T5): no length limit
    for key in _POSITION_KEYS:
        limit = getattr(model.config, key, None)
        if isinstance(limit, int) and isinstance(length, int) and length > limit:
            raise ValueError(
                f"the dataset's sequences reach {length} tokens but the checkpoint at "
                f"{str(path)!r} has {key}={limit}; lower the dataset's seq_len (a model with "
                f"rotary positions may take config_overrides = {{ {key} = {length} }})"
            )


@register_model("hf")
@model_options("hf")
def hf(
    info: dict[str, Any],
    *,
    path: str | None = None,
    task: str | None = None,
    num_labels: int | None = None,
    torch_dtype: str = "float32",
    attn_implementation: str = "aigc_ext",
    attn_dropout: float | None = 0.0,
    config_overrides: dict[str, Any] | None = None,
    resize_embeddings: bool = False,
    seed: int | None = None,
    init_from: str | None = None,
    init_optional: bool = False,
    objective: str | None = None,
) -> nn.Module:
    """A local Hugging Face checkpoint (``path``, a ``save_pretrained`` directory) loaded for
    ``task`` (inferred from the objective when absent) with ``local_files_only``.

    ``torch_dtype``: ``float32`` (default: the weights train in fp32 and ``run.precision``
    adds autocast), ``bfloat16``, ``float16`` or ``auto`` (as saved). ``attn_implementation``
    defaults to ``"aigc_ext"``. ``attn_dropout`` replaces the checkpoint's attention-weight
    dropout (0 by default, so that the fused kernel serves training; None keeps the
    checkpoint's). ``config_overrides`` sets other config attributes (``{ resid_pdrop = 0.0 }``).
    ``num_labels`` (default: the dataset's) sizes a new sequence-classification head.
    ``resize_embeddings`` grows the embeddings to a larger tokenizer's vocabulary. ``seed``
    draws newly initialised weights (a new head) from its own generator. ``objective`` is the
    run's objective name, given by the runner.
    """
    import transformers

    directory, config = _checkpoint_config(path)
    task = infer_task(task, objective, config)
    if not isinstance(attn_implementation, str) or not attn_implementation:
        raise ValueError(f"attn_implementation must be a name, got {attn_implementation!r}")
    if attn_implementation == "aigc_ext":
        attn_implementation = aigc_attention()
    if config_overrides is not None and not isinstance(config_overrides, dict):
        raise TypeError(f"config_overrides must be a table, got {config_overrides!r}")
    overrides = dict(config_overrides or {})
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise ValueError(
            f"config_overrides: the checkpoint's {type(config).__name__} has no {unknown[0]!r}"
        )
    if attn_dropout is not None:
        value = probability("attn_dropout", attn_dropout)
        overrides.update({k: value for k in _ATTN_DROPOUT_KEYS if hasattr(config, k)})
    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "attn_implementation": attn_implementation,
        "dtype": _dtype(torch_dtype),
        **overrides,
    }
    if task == "sequence-classification":
        kwargs.update(_labels(info, num_labels, config))
    elif num_labels is not None:
        raise ValueError(f"num_labels applies to task 'sequence-classification', not {task!r}")
    cls = getattr(transformers, TASK_CLASSES[task])
    try:
        with quiet_transformers(), init_rng(seed):
            model = cls.from_pretrained(str(directory), **kwargs)
    except ValueError as exc:
        raise ValueError(
            f"cannot load {str(directory)!r} ({config.model_type}) as {TASK_CLASSES[task]} for "
            f"task {task!r}: {exc}"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot load the checkpoint {str(directory)!r}: {exc}") from None
    if resize_embeddings and isinstance(info.get("vocab_size"), int):
        rows = model.get_input_embeddings().num_embeddings
        if info["vocab_size"] > rows:
            with init_rng(seed):
                model.resize_token_embeddings(info["vocab_size"])
    _check_fits(model, info, directory)
    if getattr(model.config, "pad_token_id", None) is None:
        # Sequence classification on a decoder finds each sequence's last token by the pad id.
        pad = info.get("pad_token_id")
        model.config.pad_token_id = pad if pad is not None else model.config.eos_token_id
    return model
