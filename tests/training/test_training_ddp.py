"""Data-parallel training: two CPU processes (Gloo) launched with torchrun.

The two processes each take half of every micro-batch, so the run must match a single process
that takes the whole batch: the same losses (averaged over the processes), the same final
weights, the same evaluation; both processes must end with identical weights, and only the
first one writes metrics, checkpoints and the final model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_training_runner import base_config, read_metrics, standins

from aigc_ext.training import checkpoint as ckpt
from aigc_ext.training import train

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from safetensors.torch import save_file
    from test_training_runner import standins
    from aigc_ext.training import train

    with standins():
        result = train(sys.argv[1])
    weights = {{k: v.contiguous() for k, v in result.model.state_dict().items()}}
    save_file(weights, os.path.join(sys.argv[2], "rank%s.safetensors" % os.environ["RANK"]))
    """
)


def _config(output: Path, **run) -> dict:
    cfg = base_config(output, max_steps=4, eval_every=2, save_every=2, warmup_steps=1, **run)
    cfg["model"]["dropout"] = 0.0  # no per-process randomness: comparable with one process
    cfg["augmentations"] = []
    return cfg


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_match_one(tmp_path):
    cfg = _config(tmp_path / "ddp", batch_size=2, grad_accum=2)
    config_file = tmp_path / "ddp.json"
    config_file.write_text(json.dumps(cfg))
    script = tmp_path / "launch.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("AIGC_EXT_BACKEND", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(script),
        str(config_file),
        str(tmp_path),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP kept them in sync

    with standins():  # one process, the whole batch: 2 per process x 2 processes
        single = train(_config(tmp_path / "single", batch_size=4, grad_accum=2))
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5)

    ddp_records, ddp_evals = read_metrics(tmp_path / "ddp")
    one_records, one_evals = read_metrics(tmp_path / "single")
    assert [r["step"] for r in ddp_records] == [1, 2, 3, 4]  # written once, by rank 0
    losses = [r["loss"] for r in ddp_records]
    assert losses == pytest.approx([r["loss"] for r in one_records], rel=1e-5)
    assert [r["eval/loss"] for r in ddp_evals] == pytest.approx(
        [r["eval/loss"] for r in one_evals], rel=1e-5
    )
    root = tmp_path / "ddp" / "checkpoints"
    rng = ckpt.load_checkpoint(root / "step-4").rng
    assert sorted(rng) == ["cpu.0", "cpu.1"]  # every process's dropout RNG
    final = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert all(torch.equal(final[k], rank0[k]) for k in rank0)
