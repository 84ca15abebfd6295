"""The files a run writes at the end: the final weights, model.json and, for a model with
adapters, the adapter alone, saved through the finetuner that added the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_training_runner import base_config, standins
from torch import nn

from aigc_ext import hookimpl
from aigc_ext.testing import register_plugin
from aigc_ext.training import train

FINETUNER = "test-adapter-finetuner"
SAVED: list[tuple[nn.Module, Path]] = []  # (model, path) of every save_adapter call


class MarkAdapted:
    """A finetuner that marks the model as adapted (``peft_config``) and saves the "adapter"
    itself: a JSON file listing the model's parameter names."""

    def __call__(self, model: nn.Module) -> nn.Module:
        model.peft_config = {"default": "stand-in"}
        return model

    def save_adapter(self, model: nn.Module, path: Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True)
        names = [name for name, _ in model.named_parameters()]
        (path / "adapter.json").write_text(json.dumps(names))
        SAVED.append((model, path))
        return path


class Plugin:
    @hookimpl
    def aigc_register_finetuners(self, register):
        register(FINETUNER, MarkAdapted, description="test stand-in")


@pytest.fixture
def adapter_finetuner():
    SAVED.clear()
    with standins(), register_plugin(Plugin(), name="training-outputs-test"):
        yield


def test_the_adapter_is_saved_by_the_finetuner(adapter_finetuner, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(out, max_steps=2)
    cfg["finetune"] = {"name": FINETUNER}
    result = train(cfg)
    assert len(SAVED) == 1
    model, written = SAVED[0]
    assert model is result.model
    assert written.parent == out and written.name != "adapter"  # built under a temporary name
    names = json.loads((out / "adapter" / "adapter.json").read_text())
    assert names == [name for name, _ in result.model.named_parameters()]
    assert not list(out.glob(".adapter*"))  # the temporary was renamed into place
    info = json.loads((out / "model.json").read_text())
    assert info["step"] == 2 and info["finetune"] == {"name": FINETUNER}


def test_a_model_without_adapters_gets_no_adapter_directory(adapter_finetuner, tmp_path):
    out = tmp_path / "run"
    train(base_config(out, max_steps=1))
    assert SAVED == [] and not (out / "adapter").exists()
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
