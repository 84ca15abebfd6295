"""Fully sharded training (``run.distributed = "fsdp"``, FSDP2's ``fully_shard``): two CPU
processes (Gloo) launched with torchrun, on the ``clm-pretrain`` recipe's GPT-2 at a tiny size.

Each process takes half of every micro-batch and keeps half of every parameter, so the run
must match one process that takes the whole batch: the same losses, evaluations (with an
evaluation set that does not split evenly: both processes must run as many forward passes)
and final weights. Checkpoints are gathered to rank 0 in the single-process format: one
process loads and resumes them, and two FSDP processes resume a single process's checkpoint.
A mixed-precision policy (bf16 parameters for compute, fp32 reduction) trains as well, with
fp32 weights kept; the save_pretrained exports (final and per checkpoint) hold the full model.

torch 2.13 runs FSDP2 on the CPU with Gloo, so this runs everywhere; where at least two GPUs
are present the same comparison runs on them with NCCL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from aigc_ext.training import checkpoint as ckpt
from aigc_ext.training import components, train

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from aigc_ext.training import train

    dist.init_process_group("nccl" if sys.argv[1].startswith("cuda") else "gloo")
    for job in json.loads(open(sys.argv[2]).read()):
        train(job["config"], resume=job["resume"])
    dist.destroy_process_group()
    """
)


def _config(output: Path, device: str = "cpu", **run) -> dict:
    settings = {
        "output_dir": str(output),
        "device": device,
        "max_steps": 4,
        "batch_size": 2,
        "grad_accum": 2,
        "eval_batch_size": 2,
        "eval_every": 2,
        "save_every": 2,
        "keep_checkpoints": 2,
        "warmup_steps": 1,
        "log_every": 1,
    }
    settings.update(run)
    return {
        "recipe": "clm-pretrain",
        "run": settings,
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 16},
        "data": {"seq_len": 16, "max_examples": 32, "max_eval_examples": 9},
    }


def _lora_config(output: Path, device: str, distributed: str) -> dict:
    """A tiny ``sft-lora`` run: frozen base weights beside trained adapters in every block."""
    return {
        "recipe": "sft-lora",
        "run": {
            "output_dir": str(output),
            "device": device,
            "distributed": distributed,
            "max_steps": 2,
            "batch_size": 2,
            "eval_batch_size": 2,
            "merge_lora": True,
        },
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32, "init_from": None},
        "data": {"num_train": 16, "num_eval": 5},
        "finetune": {"r": 2},
    }


def _records(output: Path) -> tuple[list[dict], list[dict]]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if "loss" in r], [r for r in records if "eval/loss" in r]


def _launch(tmp_path: Path, device: str, jobs: list[dict]) -> None:
    script, jobs_file = tmp_path / "launch.py", tmp_path / "jobs.json"
    script.write_text(SCRIPT)
    jobs_file.write_text(json.dumps(jobs))
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
        device,
        str(jobs_file),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _unfinished_copy(run: Path, target: Path, keep_step: int) -> Path:
    """A copy of ``run`` as it was when checkpoint ``keep_step`` was its newest."""
    shutil.copytree(run, target)
    for step, path in ckpt.list_checkpoints(target / ckpt.CHECKPOINTS):
        if step > keep_step:
            shutil.rmtree(path)
    for name in ("model.safetensors", "model.json"):
        (target / name).unlink()
    return target


def _assert_same_weights(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-5, msg=key)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            torch.cuda.device_count() < 2, reason="FSDP with NCCL needs two GPUs"
        ),
    ),
]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.filterwarnings("ignore:resume. .* process.*:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:resume. the configuration changed:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_fsdp_matches_one_process_and_resumes_across_world_sizes(tmp_path, device):
    # One process, the whole batch: 2 per process x 2 processes.
    single = train(_config(tmp_path / "single", device, batch_size=4))
    from_single = _unfinished_copy(single.output_dir, tmp_path / "from-single", keep_step=2)

    fsdp_run = tmp_path / "fsdp"
    mixed = tmp_path / "mixed"
    mixed_run = {
        "fsdp_param_dtype": "bf16",
        "fsdp_reduce_dtype": "fp32",
        "max_steps": 2,
        "save_hf": "checkpoints",
    }
    _launch(
        tmp_path,
        device,
        [
            {"config": _config(fsdp_run, device, distributed="fsdp"), "resume": False},
            {"config": _config(from_single, device, distributed="fsdp"), "resume": True},
            {"config": _config(mixed, device, distributed="fsdp", **mixed_run), "resume": False},
            {"config": _lora_config(tmp_path / "lora-fsdp", device, "fsdp"), "resume": False},
            {"config": _lora_config(tmp_path / "lora-ddp", device, "ddp"), "resume": False},
        ],
    )

    # The same training as one process: losses, evaluations (9 held-out examples, batches of
    # 2: one process runs a pass more than it counts), weights; metrics written once.
    expected = load_file(str(single.output_dir / "model.safetensors"))
    _assert_same_weights(load_file(str(fsdp_run / "model.safetensors")), expected)
    (ours, our_evals), (ref, ref_evals) = _records(fsdp_run), _records(single.output_dir)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    assert [r["grad_norm"] for r in ours] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-4)
    assert [r["eval/loss"] for r in our_evals] == pytest.approx(
        [r["eval/loss"] for r in ref_evals], rel=1e-5
    )

    # Its checkpoints are gathered to rank 0 in the single-process format ...
    step4 = fsdp_run / "checkpoints" / "step-4"
    _assert_same_weights(load_file(str(step4 / "model.safetensors")), expected)
    _assert_same_weights(
        load_file(str(step4 / "optimizer.safetensors")),
        load_file(str(single.output_dir / "checkpoints" / "step-4" / "optimizer.safetensors")),
    )
    assert sorted(ckpt.load_checkpoint(step4).rng) == ["cpu.0", "cpu.1"]
    plain = components.get_model("gpt")(
        {"vocab_size": 128}, n_layer=2, n_embd=32, n_head=2, n_positions=16
    )
    ckpt.load_checkpoint(step4, model=plain)  # a plain model loads it
    _assert_same_weights({k: v for k, v in plain.state_dict().items() if k in expected}, expected)

    # ... which one process resumes (2 -> 1) ...
    from_fsdp = _unfinished_copy(fsdp_run, tmp_path / "from-fsdp", keep_step=2)
    resumed = train(_config(from_fsdp, device, batch_size=4), resume=True)
    assert resumed.resumed_from.name == "step-2"
    _assert_same_weights(load_file(str(from_fsdp / "model.safetensors")), expected)
    # ... and two FSDP processes resumed a single process's checkpoint (1 -> 2).
    _assert_same_weights(load_file(str(from_single / "model.safetensors")), expected)
    assert "resumed from" in (from_single / "train.log").read_text()

    # The save_pretrained exports need a whole model: rank 0 writes them from a plain copy.
    from transformers import AutoModelForCausalLM

    def exported(directory: Path) -> dict:
        model = AutoModelForCausalLM.from_pretrained(str(directory))
        return {k: v for k, v in model.state_dict().items() if k in expected}

    _assert_same_weights(exported(fsdp_run / "hf"), expected)
    step2 = mixed / "checkpoints" / "step-2"
    _assert_same_weights(exported(step2 / "hf"), load_file(str(step2 / "model.safetensors")))

    # Mixed precision: computed with bf16 parameters, the weights kept in fp32.
    mixed_weights = load_file(str(mixed / "model.safetensors"))
    assert {v.dtype for v in mixed_weights.values()} == {torch.float32}
    mixed_losses = [r["loss"] for r in _records(mixed)[0]]
    assert mixed_losses == pytest.approx([r["loss"] for r in ref[:2]], abs=0.05)
    assert mixed_losses != [r["loss"] for r in ref[:2]]  # bf16 rounding shows

    # LoRA (frozen and trained parameters in one unit) trains as under DDP, bit for bit; its
    # adapter and merged export are written. (Against one process it differs slightly: each
    # process averages the loss over its own tokens, under DDP as well.)
    lora, lora_ddp = tmp_path / "lora-fsdp", tmp_path / "lora-ddp"
    _assert_same_weights(
        load_file(str(lora / "model.safetensors")), load_file(str(lora_ddp / "model.safetensors"))
    )
    assert [r["loss"] for r in _records(lora)[0]] == [r["loss"] for r in _records(lora_ddp)[0]]
    assert (lora / "adapter" / "adapter_model.safetensors").is_file()
    assert (lora / "hf" / "model.safetensors").is_file()


def test_fsdp_keys_are_checked():
    from aigc_ext.training import load_config
    from aigc_ext.training.config import ConfigError

    cfg = load_config({"recipe": "clm-pretrain"})
    assert cfg.run.distributed == "ddp"  # the default
    with pytest.raises(ConfigError, match=r"run\.distributed must be one of ddp, fsdp"):
        load_config({"recipe": "clm-pretrain", "run": {"distributed": "zero3"}})
    with pytest.raises(ConfigError, match=r"run\.fsdp_param_dtype must be one of fp32, bf16"):
        load_config({"recipe": "clm-pretrain", "run": {"fsdp_param_dtype": "int8"}})
    with pytest.raises(ConfigError, match=r"run\.fsdp_reshard_after_forward must be true or"):
        load_config({"recipe": "clm-pretrain", "run": {"fsdp_reshard_after_forward": 1}})


def test_transformer_blocks_are_the_no_split_modules():
    from aigc_ext.training.fsdp import transformer_blocks

    gpt = components.get_model("gpt")({"vocab_size": 32}, n_layer=3, n_embd=16, n_head=2)
    blocks = transformer_blocks(gpt)
    assert [type(b).__name__ for b in blocks] == ["GPT2Block"] * 3
    assert all(a is b for a, b in zip(blocks, gpt.transformer.h, strict=True))
    stack = torch.nn.Sequential(
        torch.nn.Embedding(8, 4), torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
    )
    assert transformer_blocks(stack) == list(stack[1])  # without _no_split_modules
    assert transformer_blocks(torch.nn.Linear(2, 2)) == []
