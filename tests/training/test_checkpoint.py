"""Checkpoints: round trip, validation of every file, atomic writes, pruning, resume fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_training_runner import CrashAt, base_config, read_metrics, standins
from torch import nn

from aigc_ext.testing import register_plugin
from aigc_ext.training import checkpoint as ckpt
from aigc_ext.training import train
from aigc_ext.training.checkpoint import CheckpointError


class Tied(nn.Module):
    """Has tied weights, a buffer and a norm: what save_model must handle."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(4))

    def forward(self, ids):
        return self.out(self.norm(self.embed(ids)) * self.scale)


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(
        [
            {"params": [model.embed.weight], "name": "matrices"},
            {"params": list(model.norm.parameters()), "weight_decay": 0.0, "name": "norms"},
        ],
        lr=1e-2,
    )
    for _ in range(2):
        opt.zero_grad()
        model(torch.arange(6).view(2, 3)).square().mean().backward()
        opt.step()
    return model, opt


STATE = {
    "epoch": 0,
    "batch_in_epoch": 3,
    "scheduler": {"last_epoch": 3},
    "python_random": [3, [1, 2], None],
    "numpy_random": {},
    "grad_scaler": None,
    "config_hash": "abc",
}


def _save(root: Path, step: int, seed: int = 0, keep: int = 2) -> Path:
    model, opt = _trained(seed)
    rng = {"cpu.0": torch.get_rng_state()}
    return ckpt.save_checkpoint(
        root, step, model=model, optimizer=opt, trainer_state=STATE, rng=rng, keep=keep
    )


def test_round_trip(tmp_path):
    model, opt = _trained(0)
    rng_state = torch.get_rng_state()
    path = ckpt.save_checkpoint(
        tmp_path, 3, model=model, optimizer=opt, trainer_state=STATE, rng={"cpu.0": rng_state}
    )
    assert path == tmp_path / "step-3"
    assert sorted(p.name for p in path.iterdir()) == sorted([*ckpt.TENSOR_FILES, ckpt.STATE_FILE])
    assert (tmp_path / "latest").read_text() == "step-3\n"
    fresh, fresh_opt = _trained(1)  # other weights and optimiser state
    loaded = ckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert fresh.out.weight is fresh.embed.weight  # still tied
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for index, state in want["state"].items():
        for name, value in state.items():
            assert torch.equal(got["state"][index][name], value)
    assert torch.equal(loaded.rng["cpu.0"], rng_state)
    assert loaded.state["step"] == 3 and loaded.state["batch_in_epoch"] == 3
    # the optimiser state is tensors plus JSON metadata: nothing pickled
    from safetensors import safe_open

    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        assert sorted(f.keys())[0] == "state.0.exp_avg"
        assert json.loads(f.metadata()["param_groups"])[1]["name"] == "norms"


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 7])


def _flip_byte(path: Path) -> None:
    file = path / "optimizer.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))


def _garbage_state(path: Path) -> None:
    text = (path / "trainer_state.json").read_text()
    (path / "trainer_state.json").write_text(text[: len(text) // 2])


def _drop_rng(path: Path) -> None:
    (path / "rng.safetensors").unlink()


def _missing_key(path: Path) -> None:
    state = json.loads((path / "trainer_state.json").read_text())
    del state["scheduler"]
    (path / "trainer_state.json").write_text(json.dumps(state))


def _header_garbage(path: Path) -> None:
    file = path / "rng.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"\x00\x01\x02\x03"
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (_truncate, "model.safetensors", "truncated"),
        (_flip_byte, "optimizer.safetensors", "SHA-256 mismatch"),
        (_garbage_state, "trainer_state.json", "not valid JSON"),
        (_drop_rng, "rng.safetensors", "missing"),
        (_missing_key, "trainer_state.json", "missing key(s) scheduler"),
        (_header_garbage, "rng.safetensors", "corrupt safetensors header"),
    ],
)
def test_damaged_checkpoint_is_rejected(tmp_path, damage, file, problem):
    path = _save(tmp_path, 4)
    ckpt.validate_checkpoint(path)
    damage(path)
    with pytest.raises(CheckpointError) as info:
        ckpt.validate_checkpoint(path)
    assert str(path / file) in str(info.value) and problem in str(info.value)
    with pytest.raises(CheckpointError):
        ckpt.load_checkpoint(path, model=Tied())


def test_files_of_different_checkpoints_are_not_mixed(tmp_path):
    two, four = _save(tmp_path, 2, seed=0, keep=3), _save(tmp_path, 4, seed=1, keep=3)
    shutil.copy(two / "rng.safetensors", four / "rng.safetensors")
    with pytest.raises(CheckpointError, match=r"rng.safetensors: written at step '2'.*mixed"):
        ckpt.validate_checkpoint(four)


def test_checkpoint_must_fit_the_model(tmp_path):
    path = _save(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not fit the model"):
        ckpt.load_checkpoint(path, model=nn.Linear(3, 3))


def test_crash_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 2)

    def crash(path, data):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_write_json", crash)  # after the three tensor files
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 4)
    monkeypatch.undo()
    # no step-4, no temporary directory left behind, latest unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-2"]
    assert (tmp_path / "latest").read_text() == "step-2\n"
    assert ckpt.validate_checkpoint(good)["step"] == 2
    assert ckpt.find_resume_checkpoint(tmp_path)[0] == good


def test_crash_before_latest_is_updated(tmp_path, monkeypatch):
    _save(tmp_path, 2)

    def crash(root, name):
        raise OSError("killed (simulated)")

    monkeypatch.setattr(ckpt, "_write_latest", crash)  # after the rename to step-4
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 4)
    assert (tmp_path / "latest").read_text() == "step-2\n"
    path, state = ckpt.find_resume_checkpoint(tmp_path)  # complete, so it is used
    assert path.name == "step-4" and state["step"] == 4


def test_half_written_temporary_is_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 2)
    leftover = tmp_path / ".tmp-step-4-abc"  # what a killed process leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\x00" * 5)
    assert ckpt.find_resume_checkpoint(tmp_path)[0].name == "step-2"
    _save(tmp_path, 4)
    assert not leftover.exists()


def test_keep_prunes_old_and_abandoned_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step-3", "step-4"]
    _save(tmp_path, 2, keep=2)  # a run resumed from an earlier point: 3 and 4 are stale
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step-2"]
    assert ckpt.read_latest(tmp_path) == tmp_path / "step-2"


def test_fallback_and_no_usable_checkpoint(tmp_path):
    assert ckpt.find_resume_checkpoint(tmp_path / "nothing") is None
    _save(tmp_path, 2, keep=3)
    latest = _save(tmp_path, 4, keep=3)
    _truncate(latest)
    with pytest.warns(
        RuntimeWarning, match="step-4 is unusable: .*truncated.*falling back to step-2"
    ):
        path, state = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == "step-2" and state["step"] == 2
    _flip_byte(path)
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        ckpt.find_resume_checkpoint(tmp_path)


def test_resume_falls_back_from_a_corrupt_latest_checkpoint(tmp_path):
    """Straight run vs. a run that crashed at step 5 whose newest checkpoint (step 4) was then
    corrupted: the resumed run starts from step 2 and still logs the straight run's losses."""
    kw = {"save_every": 2, "keep_checkpoints": 3}
    with standins():
        train(base_config(tmp_path / "a", **kw))
        cfg = base_config(tmp_path / "b", **kw)
        with register_plugin(CrashAt(5)), pytest.raises(Exception, match="simulated crash"):
            train(cfg)
        root = tmp_path / "b/checkpoints"
        assert ckpt.read_latest(root) == root / "step-4"
        _truncate(root / "step-4")
        with pytest.warns(RuntimeWarning, match="step-4 is unusable.*falling back to step-2"):
            result = train(cfg, resume=True)
    assert result.resumed_from == root / "step-2" and result.step == 6
    a = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "a")[0]]
    b = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "b")[0]]
    assert a == b and len(a) == 6
    assert [p.name for _, p in ckpt.list_checkpoints(root)] == ["step-2", "step-4", "step-6"]
    ckpt.validate_checkpoint(root / "step-4")  # rewritten whole by the resumed run
