"""The finetuner protocol's ``save_adapter``: a training run saves a model's adapter through the
finetuner that added it, and the modules that run and save a training import no plugin module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_training_runner import base_config, standins
from torch import nn

from aigc_ext import hookimpl
from aigc_ext.default_plugins.strategies.finetuning import FullFinetune, LoRAFinetune
from aigc_ext.testing import register_plugin
from aigc_ext.training import train
from aigc_ext.training.outputs import ADAPTER_DIR

TRAINING = Path(__file__).resolve().parents[2] / "aigc_ext" / "training"


class AdaptsWithoutSaving:
    """Marks the model as adapted (``peft_config``) but has no ``save_adapter``."""

    def __call__(self, model):
        model.peft_config = {"default": "stand-in"}
        return model


class Plugin:
    @hookimpl
    def aigc_register_finetuners(self, register):
        register("test-adapts-without-saving", AdaptsWithoutSaving)


def test_the_lora_finetuner_saves_its_adapter_through_the_protocol(tmp_path):
    assert not hasattr(FullFinetune(), "save_adapter")  # nothing to save apart
    with pytest.raises(ValueError, match="save_adapter: model has no adapters to save"):
        LoRAFinetune(r=2).save_adapter(nn.Linear(2, 2), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_finetuner_without_save_adapter_gets_no_adapter_directory(tmp_path):
    out = tmp_path / "run"
    cfg = base_config(out, max_steps=1)
    cfg["finetune"] = {"name": "test-adapts-without-saving"}
    with standins(), register_plugin(Plugin(), name="finetuner-protocol"):
        result = train(cfg)
    assert result.model.peft_config
    assert not (out / ADAPTER_DIR).exists() and not list(out.glob(".adapter*"))
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("module", ["build.py", "loop.py", "outputs.py"])
def test_the_run_imports_no_plugin_module(module):
    imported = set()
    for node in ast.walk(ast.parse((TRAINING / module).read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    plugin_modules = [m for m in imported if "default_plugins" in m or "aigc_ext_strategies" in m]
    assert plugin_modules == [], plugin_modules
