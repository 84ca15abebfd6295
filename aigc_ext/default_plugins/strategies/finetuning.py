"""Fine-tuning methods: full fine-tuning and LoRA adapters (through PEFT), plus SFT batching.

Finetuners (family ``finetuners``) are classes; a run instantiates one with its configured
options and calls the instance on the model, which returns the model to train:

* ``"full"`` (:class:`FullFinetune`): every parameter trainable, undoing any earlier freezing.
* ``"lora"`` (:class:`LoRAFinetune`): low-rank adapters injected by PEFT into the attention
  projections; only the adapters (and ``modules_to_save``) train, the base weights stay frozen.

Helpers for the adapter's life cycle: :func:`merge_lora` (fold the adapters into the base
weights for deployment), :func:`save_adapter` / :func:`load_adapter` (the adapter alone, a few
hundred KiB instead of the whole model; ``LoRAFinetune.save_adapter`` is the finetuner
protocol's method a training run calls) and :func:`sft_collate` (supervised fine-tuning batches
whose loss covers the response tokens only).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "FullFinetune",
    "LoRAFinetune",
    "default_target_modules",
    "load_adapter",
    "merge_lora",
    "register_all",
    "save_adapter",
    "sft_collate",
]

IGNORE_INDEX = -100

# Known attention projection names, one tuple per architecture family. A family applies to a
# model when its first name (the anchor, which is specific enough not to occur by accident) is
# the name of one of the model's linear layers; then every name of the tuple that the model
# has is targeted. Families are combined, so an encoder-decoder of two kinds gets both.
DEFAULT_TARGET_MODULES: tuple[tuple[str, ...], ...] = (
    ("c_attn", "c_proj"),  # GPT-2 (c_proj: attention and MLP output projections)
    ("query", "key", "value"),  # BERT, RoBERTa, HF ViT
    ("q", "k", "v", "o"),  # T5
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Mistral, Qwen
    ("query_key_value",),  # GPT-NeoX, Falcon, BLOOM
    ("q_lin", "k_lin", "v_lin", "out_lin"),  # DistilBERT
    ("qkv", "proj"),  # fused-QKV vision transformers (timm style)
    ("qkv_proj", "out_proj"),  # fused-QKV decoders
)

_BIAS_CHOICES = ("none", "all", "lora_only")
_TASK_TYPES = (
    "CAUSAL_LM",
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
# HF class-name suffix -> PEFT task type, for task_type=None.
_TASK_BY_SUFFIX = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # transformers is optional for models of this project
        pass
    return tuple(types)


def _linear_names(model: nn.Module, types: tuple[type, ...] | None = None) -> dict[str, list[str]]:
    """Leaf name -> qualified names of the model's layers of ``types`` (default: linear ones)."""
    types = _linear_types() if types is None else types
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name and isinstance(module, types):
            found.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return found


# Layer types PEFT's LoRA can adapt, for checking explicit target_modules.
_ADAPTABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)


def default_target_modules(model: nn.Module) -> list[str]:
    """The LoRA target modules chosen for ``model`` when ``target_modules`` is not given.

    Detected from the names of the model's linear layers (see :data:`DEFAULT_TARGET_MODULES`):
    GPT-2 ``c_attn``/``c_proj``, BERT/ViT ``query``/``key``/``value``, T5 ``q``/``k``/``v``/``o``,
    Llama ``q_proj``/``k_proj``/``v_proj``/``o_proj``, fused ``qkv``/``proj``, ...; besides, every
    ``torch.nn.MultiheadAttention`` (also :class:`aigc_ext.nn.MultiheadAttention`) is targeted
    as a whole (PEFT adapts its input and output projections). Raises ``ValueError`` listing the
    linear layer names when no attention projection is found.
    """
    present = _linear_names(model)
    chosen: list[str] = []
    for family in DEFAULT_TARGET_MODULES:
        if family[0] in present:
            chosen.extend(n for n in family if n in present and n not in chosen)
    for leaf in _linear_names(model, (nn.MultiheadAttention,)):
        if leaf not in chosen:
            chosen.append(leaf)
    if not chosen:
        raise ValueError(
            "lora: no known attention projection found to choose target_modules by default; "
            "set target_modules to some of the model's linear layers: "
            f"{', '.join(sorted(present)) or 'none (the model has no nn.Linear)'}"
        )
    return chosen


def _is_peft_model(model: object) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency of the train extra
        return False
    return isinstance(model, PeftModel)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_names(option: str, value: object) -> list[str] | None:
    """None, a name or a non-empty sequence of non-empty names -> list of names."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or not value
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise ValueError(
            f"lora: {option} must be None, a module name or a non-empty list of module names, "
            f"got {value!r}"
        )
    return list(dict.fromkeys(value))


def _matches(qualified: str, key: str) -> bool:
    """PEFT's rule for a target key: the whole qualified name or a dotted suffix of it."""
    return qualified == key or qualified.endswith("." + key)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Hides the deprecation notice PEFT triggers inside transformers 5 (not actionable here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


class FullFinetune:
    """Full fine-tuning: every parameter of the model trains (undoes any earlier freezing)."""

    def __call__(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise TypeError(f"full: model must be a torch.nn.Module, got {type(model).__name__}")
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def __repr__(self) -> str:
        return "FullFinetune()"


class LoRAFinetune:
    """LoRA (Hu et al., 2021): trains a low-rank update ``B @ A`` beside frozen weights.

    Each targeted linear layer ``W`` becomes ``W x + (alpha / r) * B A x`` with ``A`` (r, in)
    random and ``B`` (out, r) zero, so the adapted model starts out exactly equal to the base
    model. Only ``A`` and ``B`` (plus ``modules_to_save`` and, with ``bias``, biases) train,
    which cuts optimizer memory and makes the saved adapter tiny.

    Options (keyword-only):

    * ``r``: rank of the update (> 0).
    * ``alpha``: scaling numerator (> 0); the update is scaled by ``alpha / r``.
    * ``dropout``: dropout on the adapter's input, in [0, 1).
    * ``target_modules``: names (or dotted name suffixes) of the layers to adapt (linear,
      convolution, embedding or ``nn.MultiheadAttention`` layers);
      ``None`` chooses the attention projections by architecture
      (:func:`default_target_modules`).
    * ``bias``: ``"none"``, ``"all"`` or ``"lora_only"``: which biases also train.
    * ``modules_to_save``: modules trained in full and saved with the adapter (e.g. a new
      ``"classifier"`` head).
    * ``task_type``: a PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...); ``None`` infers it
      from a transformers model's class (``...ForSequenceClassification`` -> ``"SEQ_CLS"``, which
      also trains and saves the ``classifier``/``score`` head; ``...ForCausalLM`` /
      ``...LMHeadModel`` -> ``"CAUSAL_LM"``, ...) and uses none for other models.

    Calling the instance on a model returns the PEFT model (the base model is modified in place).
    """

    def __init__(
        self,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        target_modules: str | Sequence[str] | None = None,
        bias: str = "none",
        modules_to_save: str | Sequence[str] | None = None,
        task_type: str | None = None,
    ) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"lora: r (the rank) must be an integer > 0, got {r!r}")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"lora: alpha must be a finite number > 0, got {alpha!r}")
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0.0 <= dropout < 1.0
        ):
            raise ValueError(f"lora: dropout must be in [0, 1), got {dropout!r}")
        if bias not in _BIAS_CHOICES:
            raise ValueError(f"lora: bias must be one of {', '.join(_BIAS_CHOICES)}; got {bias!r}")
        if task_type is not None and task_type not in _TASK_TYPES:
            raise ValueError(
                f"lora: task_type must be None or one of {', '.join(_TASK_TYPES)}; got {task_type!r}"
            )
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.target_modules = _check_names("target_modules", target_modules)
        self.bias = bias
        self.modules_to_save = _check_names("modules_to_save", modules_to_save)
        self.task_type = task_type

    def __repr__(self) -> str:
        return (
            f"LoRAFinetune(r={self.r}, alpha={self.alpha}, dropout={self.dropout}, "
            f"target_modules={self.target_modules}, bias={self.bias!r}, "
            f"modules_to_save={self.modules_to_save}, task_type={self.task_type})"
        )

    def _task_type(self, model: nn.Module) -> str | None:
        if self.task_type is not None:
            return self.task_type
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover
            return None
        if not isinstance(model, PreTrainedModel):
            return None
        cls = type(model).__name__
        for suffix, task in _TASK_BY_SUFFIX:
            if cls.endswith(suffix):
                return task
        return None

    def _targets(self, model: nn.Module) -> list[str]:
        if self.target_modules is None:
            return default_target_modules(model)
        present = _linear_names(model, (*_linear_types(), *_ADAPTABLE))
        qualified = [q for names in present.values() for q in names]
        missing = [t for t in self.target_modules if not any(_matches(q, t) for q in qualified)]
        if missing:
            raise ValueError(
                f"lora: target_modules {missing} match no layer LoRA can adapt in "
                f"{type(model).__name__}; its linear, convolution, embedding and attention "
                "layers are named: "
                f"{', '.join(sorted(present)) or 'none'}"
            )
        return list(self.target_modules)

    def __call__(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        if not isinstance(model, nn.Module):
            raise TypeError(f"lora: model must be a torch.nn.Module, got {type(model).__name__}")
        if _is_peft_model(model):
            raise ValueError(
                "lora: the model already has adapters; merge them first (merge_lora) or "
                "fine-tune the adapted model as it is"
            )
        targets = self._targets(model)
        if self.modules_to_save is not None:
            names = [n for n, _ in model.named_modules() if n]
            missing = [m for m in self.modules_to_save if not any(_matches(n, m) for n in names)]
            if missing:
                top = ", ".join(n for n, _ in model.named_children())
                raise ValueError(
                    f"lora: modules_to_save {missing} match no module of {type(model).__name__}; "
                    f"its top-level modules are: {top or 'none'}"
                )
        # HF Conv1D (GPT-2) stores its weight as (in, out): PEFT must transpose the update.
        conv1d = _linear_types()[1:]
        targeted = [
            module
            for name, module in model.named_modules()
            if name and any(_matches(name, t) for t in targets)
        ]
        fan_in_fan_out = (
            bool(conv1d) and bool(targeted) and all(isinstance(m, conv1d) for m in targeted)
        )
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias=self.bias,
            modules_to_save=self.modules_to_save,
            fan_in_fan_out=fan_in_fan_out,
            task_type=self._task_type(model),
        )
        with _quiet_peft():
            return get_peft_model(model, config)

    def save_adapter(self, model: nn.Module, directory: str | Path) -> Path:
        """The finetuner protocol's adapter saving: :func:`save_adapter` (the adapter alone);
        a training run calls it for its final model."""
        return save_adapter(model, directory)


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds the LoRA updates into the base weights and returns the plain base model.

    The result has the base model's class and parameter names (``W + (alpha / r) * B A`` in each
    adapted layer, the trained copy of each ``modules_to_save`` module) and computes the same
    outputs as the adapted model, without the adapters' extra matmuls at inference.
    """
    if not _is_peft_model(model):
        raise ValueError(
            f"merge_lora: model must be a PEFT model with LoRA adapters (from the 'lora' "
            f"finetuner or load_adapter), got {type(model).__name__}"
        )
    return model.merge_and_unload()


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Saves only the adapter of ``model`` (LoRA weights, ``modules_to_save``) to ``directory``.

    Writes PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``; the base weights are
    not included (load them from the base model). Returns the directory.
    """
    if not _is_peft_model(model) or not getattr(model, "peft_config", None):
        raise ValueError(
            f"save_adapter: model has no adapters to save (got {type(model).__name__}); "
            "apply the 'lora' finetuner first, or save a plain model with safetensors"
        )
    if not isinstance(directory, (str, Path)):
        raise TypeError(f"save_adapter: directory must be a str or Path, got {directory!r}")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
    return path


def load_adapter(
    base_model: nn.Module, directory: str | Path, *, is_trainable: bool = False
) -> nn.Module:
    """Attaches the adapter saved in ``directory`` to ``base_model`` and returns the PEFT model.

    ``base_model`` must have the architecture the adapter was trained on; it is modified in
    place. ``is_trainable=True`` keeps the adapter trainable (to continue fine-tuning), else it is
    loaded for inference. A missing directory or file raises ``FileNotFoundError``; an unreadable
    or mismatching adapter raises ``ValueError``.
    """
    from peft import PeftModel

    if not isinstance(base_model, nn.Module):
        raise TypeError(
            f"load_adapter: base_model must be a torch.nn.Module, got {type(base_model).__name__}"
        )
    if _is_peft_model(base_model):
        raise ValueError("load_adapter: base_model already has adapters; pass the plain model")
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"load_adapter: adapter directory {str(path)!r} does not exist")
    config_file = path / "adapter_config.json"
    weights = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
    if not config_file.is_file() or not any(w.is_file() for w in weights):
        raise FileNotFoundError(
            f"load_adapter: {str(path)!r} is not a saved adapter: it needs adapter_config.json "
            f"and adapter_model.safetensors; found {sorted(p.name for p in path.iterdir())}"
        )
    try:
        json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"load_adapter: {str(config_file)!r} is not valid JSON: {exc}") from exc
    try:
        with _quiet_peft():
            return PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable)
    except Exception as exc:
        raise ValueError(
            f"load_adapter: cannot load the adapter in {str(path)!r} onto "
            f"{type(base_model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc


def _as_id_list(value: Any, what: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex:
            raise ValueError(
                f"sft_collate: {what} must be a 1-D integer tensor, got shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        ids = value.tolist()
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        ids = list(value)
    else:
        raise TypeError(
            f"sft_collate: {what} must be a list or 1-D tensor of token ids, got "
            f"{type(value).__name__}"
        )
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise ValueError(f"sft_collate: {what} must hold integer token ids >= 0, got {token!r}")
    return [int(t) for t in ids]


def sft_collate(
    pairs: Sequence[tuple[Any, Any]],
    *,
    pad_token_id: int,
    eos_token_id: int | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Builds a supervised fine-tuning batch from ``(prompt_ids, response_ids)`` pairs.

    Each example is ``prompt + response (+ eos)``; its ``labels`` are the same ids with -100 on
    the prompt, so the causal-LM loss covers only the response (and the eos, which teaches the
    model to stop). ``max_length`` truncates from the right: the first ``max_length`` tokens are
    kept, so a long response loses its end (and the eos); an example whose prompt alone fills
    ``max_length`` would have no supervised token and raises ``ValueError``. The examples are
    padded at the end to the longest one with ``pad_token_id``; padding has attention_mask 0
    and label -100 (also when the pad and eos ids are equal: the mask is by position).

    Returns LongTensors ``input_ids``, ``attention_mask`` and ``labels`` of shape (B, T).
    """
    _check_int("sft_collate: pad_token_id", pad_token_id, 0)
    if eos_token_id is not None:
        _check_int("sft_collate: eos_token_id", eos_token_id, 0)
    if max_length is not None:
        _check_int("sft_collate: max_length", max_length, 1)
    if not isinstance(pairs, Sequence) or isinstance(pairs, (str, bytes)) or not pairs:
        raise ValueError("sft_collate: pairs must be a non-empty list of (prompt, response) pairs")
    rows: list[tuple[list[int], list[int]]] = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(
                f"sft_collate: pairs[{i}] must be a (prompt, response) pair, got {pair!r}"
            )
        prompt = _as_id_list(pair[0], f"pairs[{i}] prompt")
        response = _as_id_list(pair[1], f"pairs[{i}] response")
        if not response:
            raise ValueError(f"sft_collate: pairs[{i}] has an empty response (nothing to learn)")
        if eos_token_id is not None:
            response = [*response, eos_token_id]
        ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
        if max_length is not None:
            if len(prompt) >= max_length:
                raise ValueError(
                    f"sft_collate: pairs[{i}] has a prompt of {len(prompt)} tokens, which leaves "
                    f"no response token within max_length={max_length}"
                )
            ids, labels = ids[:max_length], labels[:max_length]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels_t = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, labels) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        labels_t[b, :n] = torch.tensor(labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels_t}


def register_all(register) -> None:
    """Registers this module's finetuners."""
    register(
        "full",
        FullFinetune,
        description="Full fine-tuning: every parameter trainable.",
    )
    register(
        "lora",
        LoRAFinetune,
        description=(
            "LoRA adapters through PEFT (r, alpha, dropout, target_modules chosen by "
            "architecture, bias, modules_to_save, task_type); only the adapters train."
        ),
    )
