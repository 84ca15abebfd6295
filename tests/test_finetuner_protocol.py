"""The finetuner protocol's ``save_adapter``: a training run saves the final model's adapter
through the finetuner it was built with, and imports no plugin module to do so."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from test_training_runner import base_config, standins

from aigc_ext import hookimpl
from aigc_ext.default_plugins.strategies.finetuning import FullFinetune, LoRAFinetune
from aigc_ext.testing import register_plugin
from aigc_ext.training.runner import ADAPTER_DIR, train

RUNNER = Path(__file__).resolve().parents[1] / "aigc_ext" / "training" / "runner.py"


SAVED: list[tuple[torch.nn.Module, Path]] = []  # what RecordingFinetuner.save_adapter saved


class RecordingFinetuner:
    """Leaves the model as it is and saves a marker file as its "adapter"."""

    def __call__(self, model):
        return model

    def save_adapter(self, model, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "marker.txt").write_text(type(model).__name__)
        SAVED.append((model, directory))
        return directory


class FinetunerPlugin:
    @hookimpl
    def aigc_register_finetuners(self, register):
        register("test-recording", RecordingFinetuner)
        register("test-plain", FullFinetune)


def _run(tmp_path, finetuner):
    cfg = base_config(tmp_path / finetuner, max_steps=1, eval_every=0)
    cfg["finetune"] = {"name": finetuner}
    with standins(), register_plugin(FinetunerPlugin(), name="finetuner-protocol"):
        train(cfg)
    return Path(cfg["run"]["output_dir"])


def test_a_finetuner_with_save_adapter_saves_the_final_adapter(tmp_path):
    SAVED.clear()
    out = _run(tmp_path, "test-recording")
    ((model, directory),) = SAVED
    assert (out / ADAPTER_DIR / "marker.txt").read_text() == type(model).__name__
    assert directory.parent == out and directory.name != ADAPTER_DIR  # renamed into place
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_finetuner_without_save_adapter_writes_no_adapter(tmp_path):
    out = _run(tmp_path, "test-plain")
    assert not (out / ADAPTER_DIR).exists()


def test_lora_finetuner_has_the_protocol_method():
    assert callable(LoRAFinetune(r=2).save_adapter)
    assert not hasattr(FullFinetune(), "save_adapter")


def test_the_runner_imports_no_plugin_module():
    imported = set()
    for node in ast.walk(ast.parse(RUNNER.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    plugin_modules = [m for m in imported if "default_plugins" in m or "aigc_ext_strategies" in m]
    assert plugin_modules == [], plugin_modules
