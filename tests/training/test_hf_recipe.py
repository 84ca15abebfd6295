"""The ``sft-jsonl`` recipe end to end through the command line: a tiny local GPT-2 checkpoint,
a 20-row JSONL file, LoRA fine-tuning, and the merged model loadable from RUN/hf."""

from __future__ import annotations

import json
import time

import pytest
import torch
import transformers
from hf_checkpoints import gpt2_checkpoint, qa_rows, write_jsonl

from aigc_ext import cli
from aigc_ext.default_plugins.strategies.finetuning import load_adapter, merge_lora
from aigc_ext.training import load_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return gpt2_checkpoint(tmp_path_factory.mktemp("gpt2") / "ckpt")


def test_sft_jsonl_fine_tunes_a_local_checkpoint_into_a_loadable_model(
    tmp_path, checkpoint, capsys
):
    data = write_jsonl(tmp_path / "train.jsonl", qa_rows(20))
    out = tmp_path / "run"
    args = ["train", "--recipe", "sft-jsonl", "--set", f"data.path={data}"]
    args += ["--set", f"model.path={checkpoint}", "--output", str(out)]
    started = time.perf_counter()
    assert cli.main(args) == 0
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert "step 6:" in printed and "eval/loss" in printed  # 19 rows, batch 8, 3 epochs
    assert seconds < 120, seconds

    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf")
    assert type(merged) is transformers.GPT2LMHeadModel
    # the same model as the base checkpoint with the run's adapter merged into it
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    adapted = merge_lora(load_adapter(base, out / "adapter")).eval()
    ids = tokenizer("question: say fox twice? answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits)
        fresh = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        assert not torch.allclose(merged(ids).logits, fresh(ids).logits)  # it learned something
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "lr" in r] == [1, 2, 3, 4, 5, 6]


def test_the_field_names_are_configurable(tmp_path, checkpoint):
    rows = [{"question": r["prompt"], "answer": r["response"]} for r in qa_rows(12)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    args = ["train", "--recipe", "sft-jsonl", "--max-steps", "1", "--output", str(tmp_path / "run")]
    args += ["--set", f"data.path={data}", "--set", f"model.path={checkpoint}"]
    args += ["--set", "data.prompt_field=question", "--set", "data.response_field=answer"]
    assert cli.main(args) == 0
    assert (tmp_path / "run/hf/model.safetensors").is_file()


def test_missing_paths_are_configuration_errors(tmp_path, checkpoint, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(4))
    args = ["train", "--recipe", "sft-jsonl", "--output", str(tmp_path / "run")]
    assert cli.main([*args, "--set", f"data.path={data}"]) == 2
    assert "path is required: a local checkpoint directory" in capsys.readouterr().err
    args = ["train", "--recipe", "sft-jsonl", "--set", f"model.path={checkpoint}"]
    assert cli.main([*args, "--output", str(tmp_path / "x")]) == 2
    assert "path is required: a data file" in capsys.readouterr().err
    cfg = load_config({"recipe": "sft-jsonl"})
    assert cfg.run.merge_lora and cfg.finetune.name == "lora" and cfg.model.name == "hf"
