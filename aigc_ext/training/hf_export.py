"""A run's model as a Hugging Face checkpoint: ``<output_dir>/hf``, loadable with
``AutoModelFor...from_pretrained`` and ``AutoTokenizer.from_pretrained``.

:func:`write_hf` saves a transformers model (the built-in ``gpt``, ``bert-mlm``, ``t5``,
``minilm-classifier`` models and the ``hf`` family) with ``save_pretrained`` (safetensors,
``config.json``, ``generation_config.json``) and the run's tokenizer beside it
(:func:`~aigc_ext.training.hf_tokenizers.transformers_tokenizer`: the built-in character and
WordPiece tokenizers become transformers tokenizers with the same ids). The folder is built
under a temporary name and renamed into place, so a run that dies leaves the previous folder
or none, never half of one. A model with LoRA adapters is written only on request, merged
into its base weights (a copy is merged; the trained model keeps its adapters); the adapter
alone is saved by the run as before (``<output_dir>/adapter``).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from aigc_ext.training.files import fsync_dir, fsync_file

__all__ = ["HF_DIR", "exportable", "replace_dir", "write_hf"]

HF_DIR = "hf"
logger = logging.getLogger("aigc_ext.training")


def replace_dir(tmp: Path, target: Path) -> None:
    """Moves the finished directory ``tmp`` to ``target``, replacing an older one: at every
    moment ``target`` is the old directory, absent, or the new one."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def exportable(model: nn.Module, *, merge_lora: bool) -> tuple[nn.Module | None, str]:
    """(the transformers model to save, or None; why not). A model with adapters is merged
    into a copy when ``merge_lora``, else not exported."""
    from transformers import PreTrainedModel

    model = getattr(model, "module", model)  # a DDP wrapper
    if _is_peft(model):
        if not merge_lora:
            return None, "it has LoRA adapters (run.merge_lora = true writes the merged model)"
        from aigc_ext.default_plugins.strategies.finetuning import merge_lora as merge

        model = merge(copy.deepcopy(model))
    if not isinstance(model, PreTrainedModel):
        return None, f"{type(model).__name__} is not a transformers model"
    return model, ""


def _save_tokenizer(tokenizer: Any, config: Any, directory: Path) -> None:
    """Saves ``tokenizer``; one without a length limit of its own gets the model's."""
    limit = getattr(tokenizer, "model_max_length", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if isinstance(limit, int | float) and limit > 1e9 and isinstance(positions, int):
        tokenizer.model_max_length = positions
    try:
        tokenizer.save_pretrained(str(directory))
    finally:
        tokenizer.model_max_length = limit


def write_hf(
    directory: str | os.PathLike, model: nn.Module, tokenizer: Any, *, merge_lora: bool = False
) -> Path | None:
    """Writes ``model`` and ``tokenizer`` to ``<directory>/hf`` with ``save_pretrained``.

    Returns the folder, or None (with an INFO line saying why) when the model is not a
    transformers model, or has adapters and ``merge_lora`` is off. A tokenizer that has no
    transformers form is left out with a warning.
    """
    from aigc_ext.training.hf_tokenizers import quiet_transformers, transformers_tokenizer

    directory = Path(directory)
    target = directory / HF_DIR
    saved, why = exportable(model, merge_lora=merge_lora)
    if saved is None:
        logger.info("%s not written: %s", target, why)
        return None
    hf_tokenizer = transformers_tokenizer(tokenizer)
    tmp = directory / f".{HF_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_transformers():
            saved.save_pretrained(str(tmp), safe_serialization=True)
            if hf_tokenizer is not None:
                _save_tokenizer(hf_tokenizer, saved.config, tmp)
        for path in tmp.iterdir():
            if path.is_file():
                fsync_file(path)
        fsync_dir(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if hf_tokenizer is None:
        logger.warning(
            "%s has no tokenizer: the dataset's tokenizer (%s) has no transformers form",
            target,
            type(tokenizer).__name__,
        )
    return target
