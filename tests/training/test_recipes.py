"""The built-in recipes run through the training runner (at reduced size: the defaults are timed
by hand, see the recipes module)."""

from __future__ import annotations

import contextlib
import json
import math
import statistics

import pytest
import torch
from safetensors.torch import load_file

from aigc_ext import cli
from aigc_ext.training import components, load_config, recipes, train

RECIPES = (
    "clm-pretrain",
    "mlm-pretrain",
    "span-pretrain",
    "sft-lora",
    "transfer-minilm",
    "vision-augment",
)
TINY_TEXT = {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2}
TINY_CORPUS = {"data.seq_len": 32, "data.max_examples": 48, "data.max_eval_examples": 8}
SMALL_RUN = {"run.max_steps": 3, "run.batch_size": 4, "run.eval_batch_size": 8, "run.log_every": 1}
TINY = {
    "clm-pretrain": {**TINY_TEXT, "model.n_positions": 32, **TINY_CORPUS},
    "mlm-pretrain": {**TINY_TEXT, "model.n_positions": 32, **TINY_CORPUS},
    "span-pretrain": {**TINY_TEXT, **TINY_CORPUS},
    "sft-lora": {
        **TINY_TEXT,
        "model.n_positions": 32,
        "data.num_train": 24,
        "data.num_eval": 6,
        "finetune.r": 2,
    },
    "transfer-minilm": {"data.num_train": 12, "data.num_eval": 8},
    "vision-augment": {
        "model.dim": 16,
        "model.depth": 1,
        "model.heads": 2,
        "data.max_examples": 40,
        "data.eval_fraction": 0.05,
    },
}


def _records(output_dir) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _train_losses(output_dir) -> list[float]:
    return [r["loss"] for r in _records(output_dir) if "lr" in r]


def test_recipes_are_registered_with_complete_configs():
    components._load_builtins()
    for name in RECIPES:
        recipe = components.get_recipe(name)
        assert recipe.description
        cfg = load_config({"recipe": name})
        assert cfg.run.max_steps or cfg.run.epochs
        assert cfg.run.output_dir == f"runs/{name}"
        assert cfg.model.name in components.MODELS and cfg.data.name in components.DATASETS
    # sft-lora adapts clm-pretrain's model: the same architecture, so its weights fit.
    clm, sft = load_config({"recipe": "clm-pretrain"}), load_config({"recipe": "sft-lora"})
    shared = {k: v for k, v in sft.model.options.items() if not k.startswith("init_")}
    assert shared == clm.model.options
    assert sft.model.options["init_from"] == clm.run.output_dir


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_through_the_runner(name, tmp_path):
    overrides = {**SMALL_RUN, **TINY[name], "run.output_dir": str(tmp_path / name)}
    if name == "sft-lora":
        overrides["model.init_from"] = str(tmp_path / "no-such-run")
    with pytest.warns(UserWarning) if name == "sft-lora" else contextlib.nullcontext():
        result = train({"recipe": name}, overrides=overrides)
    assert result.step == 3
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["eval/loss"])
    assert result.attention.get("cpu", 0) > 0, result.attention
    losses = _train_losses(tmp_path / name)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert (tmp_path / name / "model.safetensors").is_file()
    if name in ("transfer-minilm", "vision-augment"):
        assert 0.0 <= result.metrics["eval/accuracy"] <= 1.0


def test_clm_pretrain_loss_goes_down(tmp_path):
    overrides = {
        "model.n_layer": 2,
        "model.n_embd": 64,
        "model.n_head": 2,
        "model.n_positions": 64,
        "data.seq_len": 64,
        "data.max_examples": 400,
        "data.max_eval_examples": 16,
        "run.max_steps": 40,
        "run.batch_size": 8,
        "run.warmup_steps": 5,
        "run.lr": 3e-3,
        "run.log_every": 1,
        "run.output_dir": str(tmp_path),
    }
    result = train({"recipe": "clm-pretrain"}, overrides=overrides)
    losses = _train_losses(tmp_path)
    assert len(losses) == 40
    first, last = losses[0], statistics.mean(losses[-5:])
    assert first > math.log(128) - 0.5  # a fresh model is close to uniform over the vocabulary
    assert last < first - 1.0, losses
    assert result.metrics["eval/loss"] < first - 1.0


def test_sft_lora_starts_from_clm_pretrain_and_saves_its_adapter(tmp_path):
    from aigc_ext.default_plugins.strategies.finetuning import load_adapter

    tiny = {**TINY_TEXT, "model.n_positions": 32, **SMALL_RUN, "run.max_steps": 2}
    pre = train(
        {"recipe": "clm-pretrain"},
        overrides={**tiny, **TINY_CORPUS, "run.output_dir": str(tmp_path / "pre")},
    )
    sft = train(
        {"recipe": "sft-lora"},
        overrides={
            **tiny,
            "data.num_train": 16,
            "data.num_eval": 4,
            "model.init_from": str(pre.output_dir),
            "run.output_dir": str(tmp_path / "sft"),
        },
    )
    pretrained = load_file(str(pre.output_dir / "model.safetensors"))
    base = sft.model.get_base_model()
    # LoRA leaves the base weights as loaded; only the adapters trained.
    assert torch.equal(base.transformer.wpe.weight, pretrained["transformer.wpe.weight"])
    assert torch.equal(
        base.transformer.h[0].attn.c_attn.base_layer.weight,
        pretrained["transformer.h.0.attn.c_attn.weight"],
    )
    lora_b = base.transformer.h[0].attn.c_attn.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # trained away from its zero initialisation

    adapter = sft.output_dir / "adapter"  # written by the runner for a LoRA run
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(sft.output_dir.glob(".adapter*"))  # no temporary left behind
    again = recipes.save_lora_adapter(sft.model, tmp_path / "again")
    assert (again / "adapter_model.safetensors").is_file()
    options = {k.removeprefix("model."): v for k, v in tiny.items() if k.startswith("model.")}
    info = sft.model.get_base_model().config
    fresh = components.get_model("gpt")(
        {"vocab_size": info.vocab_size}, init_from=str(pre.output_dir), **options
    )
    restored = load_adapter(fresh, adapter).eval()
    ids = torch.randint(7, 100, (2, 10))
    sft.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, sft.model(input_ids=ids).logits)


def test_cli_runs_a_recipe_and_lists_them(tmp_path, capsys):
    assert cli.main(["train", "--list-recipes"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in RECIPES)
    args = ["train", "--recipe", "vision-augment", "--max-steps", "2", "--output", str(tmp_path)]
    for key, value in TINY["vision-augment"].items():
        args += ["--set", f"{key}={value}"]
    assert cli.main([*args, "--set", "run.batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "step 2:" in out and "eval/accuracy" in out
    assert len(_train_losses(tmp_path)) == 2 and (tmp_path / "model.safetensors").is_file()
