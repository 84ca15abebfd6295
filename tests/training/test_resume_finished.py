"""Resuming a training run that already finished: nothing is trained and no file changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_training_runner import _toml, base_config, read_metrics, standins

from aigc_ext.cli import main
from aigc_ext.training import train


@pytest.fixture
def tiny():
    with standins():
        yield


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file and directory under ``root``: its bytes (files) and modification time."""
    out = {".": (None, root.stat().st_mtime_ns)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            data = path.read_bytes() if path.is_file() else None
            out[str(path.relative_to(root))] = (data, path.stat().st_mtime_ns)
    return out


def test_cli_resume_of_a_finished_run_changes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    config = _toml(tmp_path / "run.toml", base_config(out, max_steps=2))
    assert main(["train", str(config)]) == 0
    summary = capsys.readouterr().out.splitlines()[0]  # "step 2: loss ...  eval/loss ..."
    final = json.loads((out / "model.json").read_text())
    assert final["step"] == 2 and "loss" in final["metrics"] and "eval/loss" in final["metrics"]
    before = _snapshot(out)

    assert main(["train", str(config), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "(already finished at step 2: nothing trained, no file changed)" in captured.out
    assert captured.out.splitlines()[0] == summary  # the final metrics, not none
    assert "Traceback" not in captured.err
    assert _snapshot(out) == before  # every byte and every modification time


def test_api_resume_of_a_finished_run_reports_the_final_metrics(tiny, tmp_path):
    cfg = base_config(tmp_path / "run", max_steps=2)
    first = train(cfg)
    before = _snapshot(tmp_path / "run")
    again = train(cfg, resume=True)
    assert again.already_finished and not first.already_finished
    assert again.step == 2 and again.model is None
    assert again.metrics == first.metrics  # the last checkpoint's, not {}
    assert again.resumed_from == tmp_path / "run/checkpoints/step-2"
    assert _snapshot(tmp_path / "run") == before


def test_resume_with_more_steps_is_not_finished(tiny, tmp_path):
    train(base_config(tmp_path / "run", max_steps=2))
    with pytest.warns(RuntimeWarning, match="configuration changed since step-2: run.max_steps"):
        result = train(base_config(tmp_path / "run", max_steps=3), resume=True)
    assert not result.already_finished and result.step == 3
    assert [r["step"] for r in read_metrics(tmp_path / "run")[0]] == [1, 2, 3]
    assert json.loads((tmp_path / "run/model.json").read_text())["step"] == 3


def test_resume_after_a_crash_before_the_final_model_keeps_the_metrics(tiny, tmp_path):
    """A crash between the last checkpoint and the final weights: the resumed run trains
    nothing, writes the final model, and model.json keeps the checkpoint's metrics."""
    cfg = base_config(tmp_path / "run", max_steps=2)
    first = train(cfg)
    expected = json.loads((tmp_path / "run/model.json").read_text())["metrics"]
    (tmp_path / "run/model.json").unlink()
    (tmp_path / "run/model.safetensors").unlink()
    result = train(cfg, resume=True)
    assert not result.already_finished and result.step == 2
    assert result.metrics == first.metrics
    info = json.loads((tmp_path / "run/model.json").read_text())
    assert info["step"] == 2 and info["metrics"] == expected
    assert (tmp_path / "run/model.safetensors").is_file()
