"""Where ``aigc-ext generate`` finds a causal language model and its tokenizer.

:func:`load_language_model` takes one of three kinds of directory:

* a ``save_pretrained`` directory (``config.json`` with a ``model_type``, the weights and a
  tokenizer): loaded with ``AutoModelForCausalLM`` and ``AutoTokenizer``, offline;
* a training run's output directory (``config.json`` holding the run's configuration,
  ``model.json`` and ``model.safetensors``): the model is rebuilt from the run's configuration
  by the factory that trained it and given ``model.safetensors``;
* a checkpoint directory (``step-<N>`` with ``trainer_state.json``): the same, from the
  configuration the checkpoint recorded and its ``model.safetensors``.

A rebuilt model takes the built-in tokenizer its dataset used (the dataset's ``tokenizer``
option, ``char`` or ``wordpiece``: :mod:`aigc_ext.training.tokenizers`), so a run and its
checkpoints tokenize prompts exactly as training did; the sizes and special ids come from
``model.json``'s ``data_info``, or, for a checkpoint of a run that has not finished, from
building the dataset again. A prompt starts with the id that starts the dataset's examples:
``[BOS]`` for prompt/response pairs, else ``[EOS]`` (the separator before every document of a
text stream). A LoRA model is merged into its base weights for generation. A run whose
dataset used another tokenizer (a checkpoint's own, for the ``hf`` model family) is loaded
from its ``hf/`` export (``save_pretrained`` of the model and its tokenizer) instead; give
``RUN/hf`` to load that export in any case. Every model calls aigc_ext's attention
(``attn_implementation="aigc_ext"``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["GenerationError", "LanguageModel", "load_language_model", "source_kind"]


class GenerationError(ValueError):
    """Bad input to generation: a source that holds no causal language model, an option out of
    range, a prompt the model cannot take."""


class _NoBuiltinTokenizer(GenerationError):
    """A run whose tokenizer is not a built-in one: its ``hf/`` export is loaded instead."""


HF_DIR = "hf"  # a run's (or checkpoint's) save_pretrained export
BUILTIN_TOKENIZERS = ("char", "wordpiece")  # what aigc_ext.training.tokenizers rebuilds by name
_RUN_SECTIONS = ("run", "model", "data", "objective")
# Datasets whose examples start with the beginning-of-sequence id (prompt/response pairs);
# in the others a document starts after an end-of-sequence id, so a prompt is given that.
_BOS_DATASETS = frozenset({"prompt-response"})


@dataclass
class LanguageModel:
    """A causal LM ready to sample from: the model (eval mode, on its device), how text
    becomes ids and back, the ids that end a sequence and the context length (None: no
    limit known)."""

    model: torch.nn.Module
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_ids: tuple[int, ...]
    max_length: int | None
    source: Path
    kind: str  # "pretrained", "run" or "checkpoint"

    def continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """The text ``new_ids`` add after ``prompt_ids``: decoded together and the prompt's
        text cut off (so a tokenizer that joins words with the previous token keeps the
        space), or decoded alone when the prompt's text is not a prefix."""
        whole = self.decode([*prompt_ids, *new_ids])
        head = self.decode(prompt_ids)
        return whole[len(head) :] if whole.startswith(head) else self.decode(new_ids)


# --- what kind of directory ----------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GenerationError(f"{path}: unreadable or not JSON ({exc})") from None


def source_kind(path: Path) -> str:
    """``"pretrained"``, ``"run"`` or ``"checkpoint"``: what ``path`` holds. Raises
    :class:`GenerationError` for a missing path or a directory that is none of them."""
    if not path.exists():
        raise GenerationError(f"{path}: no such directory")
    if not path.is_dir():
        raise GenerationError(f"{path}: not a directory (give a run, checkpoint or model dir)")
    if (path / "trainer_state.json").is_file():
        return "checkpoint"
    config = path / "config.json"
    if config.is_file():
        doc = _read_json(config)
        if isinstance(doc, dict) and "model_type" in doc:
            return "pretrained"
        if isinstance(doc, dict) and all(k in doc for k in _RUN_SECTIONS):
            return "run"
    raise GenerationError(
        f"{path}: not a training run (config.json, model.safetensors), a checkpoint "
        "(trainer_state.json) or a save_pretrained directory (config.json with model_type)"
    )


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise GenerationError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"device {spec!r}: CUDA is not available here")
    return device


def load_language_model(source: str | Path, *, device: str = "auto") -> LanguageModel:
    """The causal LM in ``source`` (see the module's description), on ``device``.

    Raises :class:`GenerationError` for a missing directory, one that holds no model, a model
    that is not a causal LM, a missing tokenizer or weights that do not fit.
    """
    path = Path(source)
    kind = source_kind(path)
    where = _device(device)
    if kind == "pretrained":
        lm = _pretrained(path, kind)
    else:
        try:
            lm = _from_run(path) if kind == "run" else _from_checkpoint(path)
        except _NoBuiltinTokenizer as exc:
            export = path / HF_DIR
            if not (export / "config.json").is_file():
                raise GenerationError(
                    f"{exc}, and there is no {export} (a save_pretrained export with its "
                    "tokenizer) to load instead"
                ) from None
            lm = _pretrained(export, kind)
    lm.model.to(where).eval()
    return lm


# --- causal LMs ------------------------------------------------------------------------------------


def _causal_lm_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _check_causal(model: torch.nn.Module, where: Path, what: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if name not in _causal_lm_names():
        raise GenerationError(
            f"{where}: {what} is a {name}, not a causal language model (generate samples from "
            "models such as GPT2LMHeadModel or LlamaForCausalLM)"
        )


def _context_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, int)]
    return []


# --- save_pretrained directories -----------------------------------------------------------------


def _pretrained(path: Path, kind: str) -> LanguageModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from aigc_ext.integrations import transformers as integration

    name = integration.register()
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise GenerationError(f"{path}: cannot read the model's config.json: {exc}") from None
    causal = _causal_lm_names()
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a in causal for a in architectures):
        raise GenerationError(
            f"{path}: the model is a {', '.join(architectures)}, not a causal language model "
            "(generate samples from models such as GPT2LMHeadModel or LlamaForCausalLM)"
        )
    if not architectures and type(config) not in AutoModelForCausalLM._model_mapping:
        raise GenerationError(
            f"{path}: model type {config.model_type!r} has no causal language model class"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise GenerationError(f"{path}: no tokenizer found beside the model: {exc}") from None
    from transformers.utils import logging as hf_logging

    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no bar for loading a local checkpoint
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), attn_implementation=name, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise GenerationError(f"{path}: cannot load the model: {exc}") from None
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    eos = _ids(tokenizer.eos_token_id)
    generation = getattr(model, "generation_config", None)
    eos += [i for i in _ids(getattr(generation, "eos_token_id", None)) if i not in eos]
    bos = tokenizer.bos_token_id

    def encode(text: str) -> list[int]:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids if ids or bos is None else [bos]

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return LanguageModel(model, encode, decode, tuple(eos), _context_length(model), path, kind)


# --- models rebuilt from a run's configuration --------------------------------------------------


def _from_run(path: Path) -> LanguageModel:
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise GenerationError(f"{path}: the run has no final model yet (no model.safetensors)")
    info_file = path / "model.json"
    if not info_file.is_file():
        raise GenerationError(f"{path}: the run has no model.json")
    info = _read_json(info_file)
    data_info = info.get("data_info") if isinstance(info, dict) else None
    if not isinstance(data_info, dict):
        raise GenerationError(f"{info_file}: no data_info object")
    return _rebuilt(_read_json(path / "config.json"), weights, data_info, path, "run")


def _from_checkpoint(path: Path) -> LanguageModel:
    from aigc_ext.training import checkpoint as ckpt

    try:
        state = ckpt.validate_checkpoint(path)
    except ckpt.CheckpointError as exc:
        raise GenerationError(str(exc)) from None
    config = state.get("config")
    if not isinstance(config, dict):
        raise GenerationError(f"{path / 'trainer_state.json'}: records no configuration")
    data_info = None
    run_info = path.parent.parent / "model.json"  # <run>/checkpoints/step-<N>
    if run_info.is_file():
        info = _read_json(run_info)
        if isinstance(info, dict) and info.get("data") == config.get("data"):
            data_info = info.get("data_info")
    return _rebuilt(config, path / "model.safetensors", data_info, path, "checkpoint")


def _dataset_tokenizer(resolved: Any) -> str | None:
    """The ``tokenizer`` option the run's dataset was built with (its default when the
    configuration left it out), or None when the dataset has no such option."""
    bound = resolved.data
    if "tokenizer" in bound.options:
        return bound.options["tokenizer"]
    try:
        parameter = inspect.signature(bound.factory).parameters.get("tokenizer")
    except (TypeError, ValueError):
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def _rebuilt(
    config: Mapping[str, Any],
    weights: Path,
    data_info: Mapping[str, Any] | None,
    path: Path,
    kind: str,
) -> LanguageModel:
    from safetensors.torch import load_model

    from aigc_ext.training import build
    from aigc_ext.training.config import ConfigError, read_config
    from aigc_ext.training.tokenizers import get_tokenizer

    try:
        resolved = build.resolve(read_config(dict(config)))
    except ConfigError as exc:
        raise GenerationError(f"{path}: the recorded configuration does not load: {exc}") from None
    name = _dataset_tokenizer(resolved)
    if name not in BUILTIN_TOKENIZERS:
        used = f"tokenizer {name!r}" if name else "the model's own tokenizer"
        raise _NoBuiltinTokenizer(
            f"{path}: dataset {resolved.config.data.name!r} was tokenized with {used}, not a "
            f"built-in one ({', '.join(BUILTIN_TOKENIZERS)})"
        )
    try:
        tokenizer = get_tokenizer(name)
    except (ValueError, ImportError) as exc:
        raise GenerationError(f"{path}: {exc}") from None
    if data_info is None:  # a checkpoint of a run without model.json: build the dataset again
        data_info = build.build_data(resolved.data, resolved.config.run.seed).info
    data_info = {k: v for k, v in data_info.items() if k != "tokenizer"}
    if data_info.get("vocab_size") != tokenizer.vocab_size:
        raise GenerationError(
            f"{path}: the run's vocabulary has {data_info.get('vocab_size')} ids, its "
            f"{name!r} tokenizer {tokenizer.vocab_size}"
        )
    try:  # the weights come from the run: no init_from, no transfer setup
        model = build.build_plain_model(resolved, {**data_info, "tokenizer": tokenizer})
    except ConfigError as exc:
        raise GenerationError(f"{path}: the model does not build: {exc}") from None
    _check_causal(model, path, f"model {resolved.config.model.name!r}")
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise GenerationError(f"{weights}: does not fit the model: {exc}") from None
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters into the weights
        model = model.merge_and_unload()
    start_key = "bos_token_id" if resolved.config.data.name in _BOS_DATASETS else "eos_token_id"
    start = getattr(tokenizer, start_key)
    eos = tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return [start, *tokenizer.encode(text)]

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids))  # special ids (the start token) are dropped

    return LanguageModel(model, encode, decode, (eos,), _context_length(model), path, kind)
