"""Built-in models, datasets and tokenizers of the training runner (aigc_ext/training)."""

from __future__ import annotations

import hashlib
import math
import re
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import torch
from safetensors.torch import save_model

from aigc_ext import dispatch
from aigc_ext.training import components, data, model_weights, tokenizers

TINY_TEXT = {"n_layer": 1, "n_embd": 32, "n_head": 2}


@pytest.fixture(scope="module")
def char_info() -> dict:
    return tokenizers.CharTokenizer().info() | {"max_length": 32}


@pytest.fixture(scope="module")
def corpus() -> components.DataBundle:
    return data.text_corpus(seed=0, seq_len=32)


def test_builtins_are_registered():
    components._load_builtins()
    assert {"gpt", "bert-mlm", "t5", "minilm-classifier", "vit"} <= set(components.MODELS)
    assert {"text-corpus", "prompt-response", "sentiment", "digits"} <= set(components.DATASETS)
    assert {
        "clm-pretrain",
        "mlm-pretrain",
        "span-pretrain",
        "sft-lora",
        "transfer-minilm",
        "vision-augment",
    } <= set(components.RECIPES)


# --- tokenizers --------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_normalisation():
    tok = tokenizers.CharTokenizer()
    text = "def f(x):\n\treturn {'a': x ** 2}  # ~ok"
    ids = tok.encode(text)
    assert all(tok.cls_token_id < i < tok.sentinel_start_id - tok.num_sentinels + 1 for i in ids)
    assert tok.decode(ids) == text.replace("\t", " ")
    assert tok.decode(tok.encode("café naïve")) == "cafe naive"
    assert tok.encode("€") == [tok.unk_token_id]
    assert tok.encode("a", add_bos=True, add_eos=True) == [
        tok.bos_token_id,
        tok.encode("a")[0],
        tok.eos_token_id,
    ]


def test_char_tokenizer_special_and_sentinel_ids():
    tok = tokenizers.CharTokenizer()
    info = tok.info()
    assert info["vocab_size"] == 128 and info["pad_token_id"] == 0
    named = ("pad", "unk", "bos", "eos", "mask", "sep", "cls")
    ids = [info[f"{n}_token_id"] for n in named]
    assert len(set(ids)) == len(ids)
    assert set(ids) <= set(info["special_token_ids"])
    # T5 convention: <extra_id_0> is the highest id and the sentinels count down.
    assert tok.sentinel_id(0) == info["sentinel_start_id"] == info["vocab_size"] - 1
    assert tok.sentinel_id(24) == info["vocab_size"] - 25
    sentinels = set(range(info["vocab_size"] - info["num_sentinels"], info["vocab_size"]))
    assert sentinels <= set(info["special_token_ids"])
    assert info["decoder_start_token_id"] == info["pad_token_id"]
    shown = tok.decode(
        [tok.bos_token_id, *tok.encode("hi"), tok.sentinel_id(3)], skip_special_tokens=False
    )
    assert shown == "[BOS]hi<extra_id_3>"
    assert tok.decode([tok.bos_token_id, *tok.encode("hi"), tok.sentinel_id(3)]) == "hi"
    # No text character maps to a special id.
    every_char = "".join(chr(c) for c in range(32, 127)) + "\n"
    assert not set(tok.encode(every_char)) & set(info["special_token_ids"])


def test_tokenizer_bad_input():
    tok = tokenizers.CharTokenizer()
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([128])
    with pytest.raises(ValueError, match="sentinel index"):
        tok.sentinel_id(25)
    with pytest.raises(ValueError, match="num_sentinels"):
        tokenizers.CharTokenizer(num_sentinels=-1)
    with pytest.raises(
        ValueError, match=r"tokenizer must be one of 'char', 'wordpiece', got 'bpe'"
    ):
        tokenizers.get_tokenizer("bpe")


def test_wordpiece_tokenizer_has_sentinels_above_minilm_vocab():
    tok = tokenizers.WordPieceTokenizer(num_sentinels=10)
    assert tok.vocab_size == 30522 + 10 and tok.sentinel_start_id == 30531
    ids = tok.encode("The quick brown fox.", add_bos=True, add_eos=True)
    assert ids[0] == 101 and ids[-1] == 102
    assert tok.decode(ids) == "the quick brown fox."
    shown = tok.decode([*tok.encode("hello"), tok.sentinel_id(0)], skip_special_tokens=False)
    assert shown == "hello <extra_id_0>"


# --- text corpus -------------------------------------------------------------------------------


def test_stdlib_docstrings_are_english_text_in_a_fixed_order():
    docs = data.stdlib_docstrings()
    data.stdlib_docstrings.cache_clear()
    assert data.stdlib_docstrings() == docs
    assert len(docs) > 500 and sum(map(len, docs)) > 200_000
    assert len(set(docs)) == len(docs)
    words = re.findall(r"[a-z]+", " ".join(docs[:50]).lower())
    assert {"the", "a", "of", "return"} <= set(words)


def test_stdlib_docstrings_do_not_depend_on_other_imports():
    # transformers attaches methods to logging.Logger when imported; a fresh interpreter that
    # imported nothing else must read the same corpus as this process.
    import logging

    import transformers  # noqa: F401

    assert hasattr(logging.Logger, "warning_once")

    code = (
        "import hashlib; from aigc_ext.training.data import stdlib_docstrings; "
        "print(hashlib.sha256('\\0'.join(stdlib_docstrings()).encode()).hexdigest())"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    docs = data.stdlib_docstrings.__wrapped__()  # read again now, not from the cache
    here = hashlib.sha256("\0".join(docs).encode()).hexdigest()
    assert fresh == here


def test_text_corpus_chunks_and_split(corpus):
    info = corpus.info
    assert info["max_length"] == 32 and info["vocab_size"] == 128
    item = corpus.train[0]
    assert item["input_ids"].shape == (32,) and item["input_ids"].dtype == torch.long
    assert torch.all(item["attention_mask"] == 1)
    n_train, n_eval = len(corpus.train), len(corpus.eval)
    assert n_eval == round((n_train + n_eval) * 0.05)
    # The two splits partition the consecutive chunks of the token stream.
    stream = data._encoded_corpus("char", data.CORPUS_MODULES)
    chunks = stream[: (n_train + n_eval) * 32].view(-1, 32)
    assert stream.numel() - chunks.numel() < 32
    both = torch.cat([corpus.train.tensors["input_ids"], corpus.eval.tensors["input_ids"]])
    assert Counter(map(tuple, both.tolist())) == Counter(map(tuple, chunks.tolist()))
    assert corpus.info["corpus_tokens"] == stream.numel()
    batch = corpus.collate([corpus.train[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 32) and batch["attention_mask"].shape == (4, 32)


def test_text_corpus_is_deterministic_for_a_seed(corpus):
    again = data.text_corpus(seed=0, seq_len=32)
    other = data.text_corpus(seed=1, seq_len=32)
    assert torch.equal(again.eval.tensors["input_ids"], corpus.eval.tensors["input_ids"])
    assert torch.equal(again.train.tensors["input_ids"], corpus.train.tensors["input_ids"])
    assert not torch.equal(other.eval.tensors["input_ids"], corpus.eval.tensors["input_ids"])


def test_text_corpus_caps_and_options():
    bundle = data.text_corpus(seed=0, seq_len=16, max_examples=10, max_eval_examples=3)
    assert len(bundle.train) == 10 and len(bundle.eval) == 3
    wp = data.text_corpus(seed=0, seq_len=16, tokenizer="wordpiece", modules=["json"])
    assert wp.info["vocab_size"] == 30522 + 100
    assert wp.info["special_token_ids"][-1] == wp.info["sentinel_start_id"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seq_len": 0}, "seq_len must be an integer >= 2, got 0"),
        ({"eval_fraction": 1.5}, r"eval_fraction must be a number in \(0, 1\), got 1.5"),
        ({"max_examples": -1}, "max_examples must be an integer >= 1"),
        ({"tokenizer": "bytes"}, "tokenizer must be one of"),
        ({"modules": ["no_such_module_xyz"]}, "corpus module 'no_such_module_xyz'"),
    ],
)
def test_text_corpus_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        data.text_corpus(seed=0, **options)


# --- prompt/response ---------------------------------------------------------------------------


def test_prompt_response_pairs_follow_their_rule():
    bundle = data.prompt_response(
        seed=0, tasks=["reverse", "add", "sort"], num_train=300, num_eval=60
    )
    tok = bundle.info["tokenizer"]
    assert len(bundle.train) == 300 and len(bundle.eval) == 60
    counts = {"reverse": 0, "add": 0, "sort": 0}
    for split in (bundle.train, bundle.eval):
        for i in range(len(split)):
            item = split[i]
            assert item["prompt_ids"][0] == tok.bos_token_id
            prompt, response = tok.decode(item["prompt_ids"]), tok.decode(item["response_ids"])
            task, arg = re.fullmatch(r"(\w+): (\S+) => ", prompt).groups()
            counts[task] += 1
            if task == "add":
                expected = str(sum(int(x) for x in arg.split("+")))
            else:
                expected = arg[::-1] if task == "reverse" else "".join(sorted(arg))
            assert response == expected
    assert min(counts.values()) >= 110
    train_prompts = {tuple(bundle.train[i]["prompt_ids"].tolist()) for i in range(300)}
    assert not any(tuple(bundle.eval[i]["prompt_ids"].tolist()) in train_prompts for i in range(60))
    assert [tok.decode(tok.encode(p)) for p, _ in bundle.info["examples"][:3]] == [
        tok.decode(bundle.eval[i]["prompt_ids"]) for i in range(3)
    ]


def test_prompt_response_collate_masks_the_prompt():
    bundle = data.prompt_response(seed=3, num_train=20, num_eval=4)
    tok = bundle.info["tokenizer"]
    items = [bundle.train[i] for i in range(5)]
    batch = bundle.collate(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for row, item in enumerate(items):
        n_prompt, n_resp = len(item["prompt_ids"]), len(item["response_ids"])
        n = n_prompt + n_resp + 1
        assert torch.all(batch["labels"][row, :n_prompt] == -100)
        assert batch["labels"][row, n_prompt:n].tolist() == [
            *item["response_ids"].tolist(),
            tok.eos_token_id,
        ]
        assert torch.all(batch["labels"][row, n:] == -100)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (
            batch["labels"].shape[1] - n
        )
    assert batch["input_ids"].shape[1] <= bundle.info["max_length"]


def test_prompt_response_deterministic_and_bad_options():
    a = data.prompt_response(seed=5, num_train=30, num_eval=5)
    b = data.prompt_response(seed=5, num_train=30, num_eval=5)
    c = data.prompt_response(seed=6, num_train=30, num_eval=5)
    assert a.info["examples"] == b.info["examples"] != c.info["examples"]
    with pytest.raises(
        ValueError, match="tasks must be a non-empty list of 'reverse', 'sort', 'add'"
    ):
        data.prompt_response(seed=0, tasks=["multiply"])
    with pytest.raises(ValueError, match="too few distinct prompts"):
        data.prompt_response(seed=0, tasks=["add"], max_operand=3, num_train=30, num_eval=5)


# --- sentiment ---------------------------------------------------------------------------------


def test_sentiment_held_out_split_uses_other_words_and_templates():
    bundle = data.sentiment(seed=0, num_train=80, num_eval=60, negation=0.3)
    hf = bundle.info["tokenizer"]
    assert bundle.info["num_labels"] == 2 and bundle.info["label_names"] == ["negative", "positive"]

    def texts(split):
        return [
            (hf.decode(split[i]["input_ids"], skip_special_tokens=True), int(split[i]["labels"]))
            for i in range(len(split))
        ]

    train, held = texts(bundle.train), texts(bundle.eval)
    every_word = {w for pair in data._SENTIMENT_WORDS.values() for w in pair[0] + pair[1]}
    for split, which in ((train, 0), (held, 1)):
        labels = [y for _, y in split]
        assert labels.count(0) == labels.count(1)  # balanced
        negated = 0
        for text, y in split:
            words = set(re.findall(r"[a-z-]+", text))
            polarity = y
            if words & {"not", "never"}:  # a negated word of the other polarity
                negated += 1
                polarity = 1 - y
            own = set(data._SENTIMENT_WORDS[data.SENTIMENT_LABELS[polarity]][which])
            assert words & own, text
            assert not words & (every_word - own), text
        assert 0.1 * len(split) < negated < 0.5 * len(split)
    assert not {t for t, _ in train} & {t for t, _ in held}
    item = bundle.train[0]
    assert item["input_ids"][0] == hf.cls_token_id and item["labels"].shape == ()
    batch = bundle.collate([bundle.train[i] for i in range(8)])
    assert batch["labels"].shape == (8,)
    assert torch.equal(batch["attention_mask"] == 0, batch["input_ids"] == hf.pad_token_id)


def test_sentiment_three_labels_and_determinism():
    a = data.sentiment(seed=1, num_train=30, num_eval=9, num_labels=3)
    b = data.sentiment(seed=1, num_train=30, num_eval=9, num_labels=3)
    assert a.info["num_labels"] == 3
    assert sorted({int(a.train[i]["labels"]) for i in range(30)}) == [0, 1, 2]
    assert all(torch.equal(a.eval[i]["input_ids"], b.eval[i]["input_ids"]) for i in range(9))
    with pytest.raises(ValueError, match="num_labels must be 2 or 3, got 4"):
        data.sentiment(seed=0, num_labels=4)
    with pytest.raises(ValueError, match=r"negation must be a number in \[0, 1\], got 2"):
        data.sentiment(seed=0, negation=2)


# --- digits ------------------------------------------------------------------------------------


def test_digits_split_is_stratified_and_scaled():
    bundle = data.digits(seed=0, eval_fraction=0.25)
    train, held = bundle.train.tensors, bundle.eval.tensors
    assert len(bundle.train) + len(bundle.eval) == 1797
    assert train["pixel_values"].shape[1:] == (1, 8, 8)
    assert 0.0 == float(train["pixel_values"].min()) and float(train["pixel_values"].max()) == 1.0
    total = torch.bincount(torch.cat([train["labels"], held["labels"]]), minlength=10)
    held_counts = torch.bincount(held["labels"], minlength=10)
    assert torch.all((held_counts - total * 0.25).abs() <= 1.0)
    assert bundle.info["num_labels"] == 10
    again, other = data.digits(seed=0, eval_fraction=0.25), data.digits(seed=1, eval_fraction=0.25)
    assert torch.equal(again.eval.tensors["pixel_values"], held["pixel_values"])
    assert not torch.equal(other.eval.tensors["pixel_values"], held["pixel_values"])
    assert len(data.digits(seed=0, max_examples=100).train) == 100
    with pytest.raises(ValueError, match="eval_fraction"):
        data.digits(seed=0, eval_fraction=0)


# --- models ------------------------------------------------------------------------------------


def _text_batch(info: dict, batch: int = 2, length: int = 12) -> dict:
    ids = torch.randint(7, 100, (batch, length))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, info["pad_token_id"]), "attention_mask": mask}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("gpt", TINY_TEXT),
        ("gpt", {**TINY_TEXT, "arch": "llama"}),
        ("bert-mlm", TINY_TEXT),
        ("t5", TINY_TEXT),
    ],
)
def test_text_models_forward_through_aigc_ext(name, options, char_info):
    model = components.get_model(name)(char_info, seed=0, **options).eval()
    assert model.config._attn_implementation == "aigc_ext"
    batch = _text_batch(char_info)
    if name == "t5":
        batch["decoder_input_ids"] = batch["input_ids"][:, :5]
    dispatch.backend_usage(reset=True)
    with torch.no_grad():
        logits = model(**batch).logits
    usage = dispatch.backend_usage(reset=True)
    assert logits.shape[-1] == char_info["vocab_size"] and torch.isfinite(logits).all()
    assert usage.get("cpu", 0) > 0 and set(usage) == {"cpu"}, usage


def test_t5_position_bias_in_training(char_info):
    batch = _text_batch(char_info)
    batch["decoder_input_ids"] = batch["input_ids"][:, :5]
    trained = components.get_model("t5")(char_info, seed=0, **TINY_TEXT).train()
    dispatch.backend_usage(reset=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference path announces itself
        trained(**batch).logits.sum().backward()
    usage = dispatch.backend_usage(reset=True)
    # The learned bias is a mask that needs a gradient: self-attention takes the reference
    # path, cross-attention (no bias) the fused kernel.
    assert usage.get("reference", 0) > 0 and usage.get("cpu", 0) > 0
    bias = trained.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert bias.grad is not None and bias.grad.abs().sum() > 0

    frozen = components.get_model("t5")(char_info, seed=0, freeze_position_bias=True, **TINY_TEXT)
    frozen.train()
    frozen(**batch).logits.sum().backward()
    assert set(dispatch.backend_usage(reset=True)) == {"cpu"}


def test_text_model_padding_is_masked(char_info):
    model = components.get_model("bert-mlm")(char_info, seed=0, **TINY_TEXT).eval()
    batch = _text_batch(char_info)
    with torch.no_grad():
        full = model(**batch).logits
        alone = model(input_ids=batch["input_ids"][1:, :-3]).logits
    torch.testing.assert_close(full[1:, :-3], alone, atol=1e-4, rtol=1e-4)


def test_vit_forward_through_aigc_ext():
    model = components.get_model("vit")({"num_labels": 10}, seed=0, dim=32, depth=2, heads=2)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2
    assert model.head.out_features == 10
    dispatch.backend_usage(reset=True)
    logits = model(torch.rand(3, 1, 8, 8))
    assert logits.shape == (3, 10)
    assert dispatch.backend_usage(reset=True) == {"cpu": 2}
    with pytest.raises(
        ValueError, match=r"pixel_values must have shape \(B, 1, 8, 8\), got \(3, 8, 8\)"
    ):
        model(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="image_size=8 must be divisible by patch_size=3"):
        components.get_model("vit")({"num_labels": 10}, patch_size=3)


def test_minilm_classifier_is_pretrained_with_a_new_head():
    bundle = data.sentiment(seed=0, num_train=8, num_eval=4, num_labels=3)
    model = components.get_model("minilm-classifier")(bundle.info, seed=0).eval()
    assert model.config._attn_implementation == "aigc_ext"
    assert model.classifier.out_features == 3
    assert model.config.attention_probs_dropout_prob == 0.0
    batch = bundle.collate([bundle.train[i] for i in range(4)])
    dispatch.backend_usage(reset=True)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (4, 3)
    assert dispatch.backend_usage(reset=True) == {"cpu": 6}  # one call per layer
    # Pretrained, not random: the word embeddings of related words are close.
    emb = model.bert.embeddings.word_embeddings.weight
    hf = bundle.info["tokenizer"]
    good, great, table = (emb[hf.convert_tokens_to_ids(w)] for w in ("good", "great", "table"))
    cos = torch.nn.functional.cosine_similarity
    assert cos(good, great, dim=0) > cos(good, table, dim=0)


def test_seeded_initialisation_leaves_the_global_rng_alone(char_info):
    state = torch.get_rng_state()
    a = components.get_model("gpt")(char_info, seed=7, **TINY_TEXT)
    b = components.get_model("gpt")(char_info, seed=7, **TINY_TEXT)
    c = components.get_model("gpt")(char_info, seed=8, **TINY_TEXT)
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(
        pa["transformer.h.0.attn.c_attn.weight"], pc["transformer.h.0.attn.c_attn.weight"]
    )
    torch.manual_seed(3)
    d = components.get_model("vit")({"num_labels": 10}, dim=16, depth=1, heads=2)
    torch.manual_seed(3)
    e = components.get_model("vit")({"num_labels": 10}, dim=16, depth=1, heads=2)
    assert torch.equal(d.head.weight, e.head.weight)


@pytest.mark.parametrize(
    ("name", "info", "options", "error", "message"),
    [
        (
            "gpt",
            {"vocab_size": 10},
            {"layers": 2},
            ValueError,
            "model 'gpt': unknown option 'layers'; allowed: arch, n_layer",
        ),
        ("gpt", {}, {}, KeyError, r"model 'gpt' needs info\['vocab_size'\]"),
        (
            "gpt",
            {"vocab_size": 10},
            {"n_embd": 30, "n_head": 4},
            ValueError,
            "n_embd=30 must be divisible by n_head=4",
        ),
        (
            "gpt",
            {"vocab_size": 10},
            {"arch": "gptj"},
            ValueError,
            "arch must be 'gpt2' or 'llama', got 'gptj'",
        ),
        (
            "gpt",
            {"vocab_size": 10},
            {"dropout": 1.0},
            ValueError,
            r"dropout must be a number in \[0, 1\), got 1.0",
        ),
        (
            "bert-mlm",
            {"vocab_size": 10},
            {"n_layer": 0},
            ValueError,
            "n_layer must be a positive integer, got 0",
        ),
        ("t5", {"vocab_size": 10}, {}, KeyError, r"info\['eos_token_id'\]"),
        ("vit", {}, {}, KeyError, r"info\['num_labels'\]"),
        ("vit", {"num_labels": 3}, {"seed": 1.5}, ValueError, "seed must be an integer or None"),
        ("vit", {"num_labels": 3}, {"init_from": 3}, TypeError, "init_from must be a path"),
    ],
)
def test_model_bad_options(name, info, options, error, message):
    with pytest.raises(error, match=message):
        components.get_model(name)(info, **options)


# --- init_from ---------------------------------------------------------------------------------


def test_init_from_loads_a_previous_runs_weights(tmp_path, char_info):
    source = components.get_model("gpt")(char_info, seed=1, **TINY_TEXT)
    save_model(source, str(tmp_path / "model.safetensors"))  # drops the tied output embedding
    loaded = components.get_model("gpt")(char_info, seed=2, init_from=str(tmp_path), **TINY_TEXT)
    src = source.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, src[key]), key
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    direct = components.get_model("gpt")(
        char_info, seed=2, init_from=str(tmp_path / "model.safetensors"), **TINY_TEXT
    )
    assert torch.equal(direct.transformer.wpe.weight, source.transformer.wpe.weight)


def test_init_from_keeps_a_replaced_head_fresh(tmp_path):
    vit = components.get_model("vit")
    source = vit({"num_labels": 10}, seed=1, dim=16, depth=2, heads=2)
    save_model(source, str(tmp_path / "model.safetensors"))
    target = vit({"num_labels": 3}, seed=2, dim=16, depth=2, heads=2, init_from=str(tmp_path))
    fresh = vit({"num_labels": 3}, seed=2, dim=16, depth=2, heads=2)
    assert torch.equal(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert torch.equal(target.pos_embed, source.pos_embed)
    assert target.head.weight.shape == (3, 16)
    assert torch.equal(target.head.weight, fresh.head.weight)
    missing = model_weights.load_weights(fresh, tmp_path)
    assert missing == ["head.bias", "head.weight"]


def test_init_from_errors(tmp_path, char_info):
    vit = components.get_model("vit")
    save_model(
        vit({"num_labels": 10}, dim=16, depth=2, heads=2), str(tmp_path / "model.safetensors")
    )
    with pytest.raises(
        ValueError, match=r"blocks\.0\.\S+ has shape \(16,\), the model expects \(32,\)"
    ):
        vit({"num_labels": 10}, dim=32, depth=2, heads=2, init_from=str(tmp_path))
    with pytest.raises(ValueError, match=r"lacks weights for blocks\.2\."):
        vit({"num_labels": 10}, dim=16, depth=3, heads=2, init_from=str(tmp_path))
    with pytest.raises(ValueError, match=r"has weights this model lacks: blocks\.1\."):
        vit({"num_labels": 10}, dim=16, depth=1, heads=2, init_from=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        vit({"num_labels": 10}, init_from=str(empty))
    with pytest.warns(UserWarning, match="starting from a random initialisation"):
        model = vit({"num_labels": 10}, init_from=str(empty), init_optional=True)
    with torch.no_grad():
        assert math.isfinite(float(model(torch.rand(1, 1, 8, 8)).sum()))


def test_init_from_refuses_lora_wrapped_weights(tmp_path, char_info):
    from aigc_ext.default_plugins.strategies.finetuning import LoRAFinetune

    wrapped = LoRAFinetune(r=2)(components.get_model("gpt")(char_info, **TINY_TEXT))
    save_model(wrapped, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="merge them into the base model first"):
        components.get_model("gpt")(char_info, init_from=str(tmp_path), **TINY_TEXT)
