"""Edges of the command line and of the attention arguments: every bad input is a one-line
error naming the argument or file (exit status 2 on the command line), never a traceback, a
hang or a run that starts and fails late."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_training_runner import _toml, base_config, standins

import aigc_ext
from aigc_ext import bench, hookimpl
from aigc_ext.bench import measure, runner
from aigc_ext.bench.config import MAX_HEAD_DIM, BenchConfig, UsageError
from aigc_ext.cli import main
from aigc_ext.testing import register_plugin
from aigc_ext.training import load_config
from aigc_ext.training.config import MAX_CONFIG_BYTES, ConfigError, parse_override

DEEP = 20_000  # nesting far beyond Python's recursion limit


@pytest.fixture
def tiny():
    with standins():
        yield


def _error_line(err: str) -> str:
    """The one line of a clean error (no traceback)."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- train: files


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00\x01binary\x80", r"run\.toml: not UTF-8 text \(byte 0xff at offset 0\)"),
        (b"x = " + b"[" * DEEP + b"]" * DEEP, r"run\.toml: .*nested too deeply"),
        (b"# " + b"x" * MAX_CONFIG_BYTES + b"\n", r"run\.toml' is larger than 1048576 bytes"),
    ],
    ids=["binary", "deeply-nested", "too-large"],
)
def test_train_refuses_unreadable_config_files(tmp_path, capsys, content, message):
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    assert main(["train", str(path), "--output", str(tmp_path / "out")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("aigc-ext train: ")
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_json_config_files_are_checked_alike(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"[" * DEEP + b"]" * DEEP)
    with pytest.raises(ConfigError, match=r"config\.json: .*nested too deeply.*JSON"):
        load_config(path)
    path.write_bytes(b'{"run": "\xc3\x28"}')
    with pytest.raises(ConfigError, match=r"config\.json: not UTF-8 text \(byte 0xc3 at offset"):
        load_config(path)


def test_train_refuses_a_device_file_without_reading_it(capsys):
    assert main(["train", "/dev/zero"]) == 2  # read forever before
    line = _error_line(capsys.readouterr().err)
    assert line == (
        "aigc-ext train: configuration file '/dev/zero' is a character device, not a regular file"
    )


def test_train_refuses_a_named_pipe_without_opening_it(tmp_path):
    fifo = tmp_path / "run.toml"
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    os.mkfifo(fifo)  # opening it would block until a writer comes
    with pytest.raises(ConfigError, match=r"run\.toml' is a named pipe, not a regular file"):
        load_config(fifo)


def test_a_deeply_nested_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"override 'run\.x': .*nested too deeply"):
        parse_override("run.x=" + "[" * DEEP + "]" * DEEP)


# ----------------------------------------------------------------------------- train: values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.eval_batch_size=0", "run.eval_batch_size must be >= 1 (absent: batch_size), got 0"),
        ("run.eval_batch_size=-3", "run.eval_batch_size must be >= 1 (absent: batch_size), got -3"),
        (f"run.lr={10**400}", "run.lr must be a finite number > 0, got an integer of 1329 bits"),
        (f"run.seed={2**64}", "run.seed must be an integer >= 0 that fits in 64 bits"),
        (f"run.batch_size={2**70}", "run.batch_size must be an integer >= 1 that fits in 64 bits"),
        ("run.weight_decay=nan", "run.weight_decay must be a finite number >= 0, got nan"),
        ("run.clip_grad_norm=inf", "run.clip_grad_norm must be a finite number"),
    ],
)
def test_train_refuses_bad_numbers_before_running(tiny, tmp_path, capsys, override, message):
    config = _toml(tmp_path / "run.toml", base_config(tmp_path / "out", max_steps=2))
    assert main(["train", str(config), "--set", override]) == 2
    line = _error_line(capsys.readouterr().err)
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_absent_eval_batch_size_still_means_batch_size(tiny, tmp_path):
    cfg = load_config(base_config(tmp_path / "out"))
    assert cfg.run.eval_batch_size is None
    assert load_config(cfg.to_dict()).run.eval_batch_size is None  # config.json's null


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bogus", r"AIGC_EXT_BACKEND='bogus': unknown attention backend; registered: .*\bcpu\b"),
        ("cpu", None),
    ],
)
def test_train_checks_the_forced_backend_before_creating_anything(
    tiny, tmp_path, capsys, monkeypatch, value, message
):
    monkeypatch.setenv("AIGC_EXT_BACKEND", value)
    out = tmp_path / "out"
    config = _toml(tmp_path / "run.toml", base_config(out, max_steps=1))
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    if message is None:  # a registered one trains as before
        assert code == 0 and (out / "model.json").is_file()
        return
    assert code == 2
    assert re.search(message, _error_line(err))
    assert not out.exists()  # checked before the output directory is made


def test_train_refuses_a_forced_backend_for_another_device(tiny, tmp_path, monkeypatch):
    from aigc_ext.training.distributed import check_backend_override

    monkeypatch.setenv("AIGC_EXT_BACKEND", "cpu")
    check_backend_override(torch.device("cpu"))
    with pytest.raises(ConfigError, match="AIGC_EXT_BACKEND='cpu': the backend runs on cpu, "):
        check_backend_override(torch.device("cuda"))


# ----------------------------------------------------------------------------- bench


@pytest.fixture
def _small_probe(monkeypatch):
    """Peak probes of a few milliseconds: these tests check the plumbing, not the machine."""
    probe = measure.matmul_peak_gflops
    monkeypatch.setattr(
        measure,
        "matmul_peak_gflops",
        lambda dtype, device="cpu", n=None, reps=3, budget_s=1.0: probe(
            dtype, device, n=64, reps=1, budget_s=0.1
        ),
    )
    monkeypatch.setattr(measure, "FMA_SECONDS_PER_CORE", 0.01)
    monkeypatch.setattr(measure, "FMA_SECONDS_ALL_THREADS", 0.02)


TINY = [
    "--batch", "1", "--heads", "2", "--seq", "16", "--head-dim", "8", "--dtype", "fp32",
    "--mode", "fwd", "--causal", "off", "--reps", "1", "--warmup", "0", "--no-progress",
]  # fmt: skip
HUGE = "100000,1000,100000,64"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--shape", HUGE, HUGE, HUGE],
            r"shapes \(--shape\): the inputs of fwd/fp32/B100000/H1000/.* need [\d.e+]+ GiB, "
            r"more than the [\d.]+ GiB of memory of cpu here",
        ),
        (["--shape", *["100000,1000,100000,1000"] * 3], r"head dim: 1000 is above 256"),
        (["--quick", "--head-dim", "100000"], r"head_dim: 100000 is above 256"),
        (["--head-dim-v", "300"], r"head_dim_v: 300 is above 256"),
        (["--shape", "1,2,16,8", "1,2,16,8", "1,2,16,512"], r"value head dim: 512 is above 256"),
        (["--max-time", "nan"], r"max_time_s \(--max-time\): must be a finite number .*nan"),
        (["--max-time", "inf"], r"max_time_s \(--max-time\): must be a finite number .*inf"),
        (["--max-time", "0"], r"max_time_s \(--max-time\): .* > 0, got 0\.0"),
        (["--max-time", "-1"], r"max_time_s \(--max-time\): .* > 0, got -1\.0"),
        (["--flex-compile-budget", "nan"], r"flex_compile_budget_s .*finite.*nan"),
        (["--seed", str(2**64)], r"seed: must be in \[-2\*\*63, 2\*\*64\)"),
    ],
)
def test_bench_refuses_before_running(_small_probe, tmp_path, capsys, args, message):
    out = tmp_path / "r.json"
    assert main(["bench", *TINY, *args, "--json", str(out)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("aigc-ext bench: error: ")
    assert re.search(message, line), line
    assert not out.exists()


def test_bench_checks_the_forced_backend(_small_probe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AIGC_EXT_BACKEND", "bogus")
    out = tmp_path / "r.json"
    assert main(["bench", *TINY, "--json", str(out)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "AIGC_EXT_BACKEND='bogus': unknown attention backend; registered: " in line
    assert "cpu" in line and not out.exists()


def test_head_dims_up_to_the_limit_are_accepted():
    BenchConfig(head_dim=[MAX_HEAD_DIM], head_dim_v=[MAX_HEAD_DIM]).validate()
    with pytest.raises(UsageError, match="head_dim: 257 is above 256"):
        BenchConfig(head_dim=[257]).validate()


def _allocation_error() -> RuntimeError:
    """The error torch's CPU allocator raises for an allocation it cannot make."""
    try:
        torch.empty(1 << 60, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("an exabyte was allocated")


class _GreedyPlugin:
    """``test-greedy`` asks for an exabyte on calls with 32 keys and works otherwise."""

    @hookimpl
    def aigc_register_attention_backends(self, register):
        def greedy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, gqa=False):
            if k.shape[-2] == 32:
                torch.empty(1 << 60, dtype=torch.uint8)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask, dropout_p, is_causal, scale=scale
            )

        register("test-greedy", greedy, devices=("cpu",), priority=-1000)


def _config(**kw) -> BenchConfig:
    base = {
        "heads": [2],
        "seq": [32, 16],
        "head_dim": [8],
        "dtype": ["fp32"],
        "causal": [False],
        "mode": ["fwd"],
        "reps": 1,
        "warmup": 0,
        "memory": False,
    }
    return BenchConfig(**{**base, **kw})


def test_a_cpu_allocation_failure_in_a_cell_is_an_oom_row():
    assert "can't allocate memory" in str(_allocation_error())  # what torch says
    config = _config(backends=["test-greedy", "torch-math"])
    with register_plugin(_GreedyPlugin(), name="test-greedy-plugin"):
        rows = bench.run(config, peaks={"fp32": 1.0})
    by = {(r.case.seq_q, r.backend): r for r in rows}
    assert by[32, "test-greedy"].status == "oom"
    assert "can't allocate memory" in by[32, "test-greedy"].reason
    assert by[32, "torch-math"].status == "ok"
    assert by[16, "test-greedy"].status == "ok"
    assert bench.exit_code(rows) == 0


def test_a_cpu_allocation_failure_of_the_inputs_is_an_oom_row(monkeypatch):
    make = runner.make_problem

    def greedy_inputs(case, device, seed):
        if case.seq_q == 32:
            torch.empty(1 << 60, dtype=torch.uint8)
        return make(case, device, seed)

    monkeypatch.setattr(runner, "make_problem", greedy_inputs)
    rows = bench.run(_config(backends=["torch-math"]), peaks={"fp32": 1.0})
    by = {r.case.seq_q: r for r in rows}
    assert by[32].status == "oom" and by[32].reason.startswith("inputs: RuntimeError")
    assert by[16].status == "ok"


def test_input_bytes_match_the_tensors_built():
    from aigc_ext.bench.problem import make_problem

    for case in BenchConfig(
        heads=[4], kv_heads=[2], seq=[8], kv_seq=[12], head_dim=[8], head_dim_v=[4],
        dtype=["bf16"], causal=[False], mask=["padding", "arbitrary"], mode=["fwd", "bwd"],
    ).cases():  # fmt: skip
        p = make_problem(case)
        tensors = [p.query, p.key, p.value, p.grad_out, p.mask]
        assert case.input_bytes == sum(
            t.numel() * t.element_size() for t in tensors if t is not None
        )


# ----------------------------------------------------------------------------- bench compare


def _results(path: Path, rows: list) -> str:
    path.write_text(json.dumps({"schema": "aigc_ext.bench/1", "machine": {}, "rows": rows}))
    return str(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"key": "fwd|cpu", "backend": "cpu", "status": "ok", "time_ms": "fast"},
            r"b\.json': rows\[0\] \(fwd\|cpu\): field 'time_ms' must be a finite number >= 0 "
            r"or null, got 'fast'",
        ),
        (
            {"key": "fwd|cpu", "time_ms": [1.0]},
            r"b\.json': rows\[0\] \(fwd\|cpu\): field 'time_ms' .*got \[1\.0\]",
        ),
        ({"key": "fwd|cpu", "time_ms": -1.0}, r"field 'time_ms' .*got -1\.0"),
        ({"key": "fwd|cpu", "time_ms": True}, r"field 'time_ms' .*got True"),
        ({"key": 7, "time_ms": 1.0}, r"b\.json': rows\[0\]: field 'key' must be a string, got 7"),
        ({"key": "fwd|cpu", "status": 3}, r"rows\[0\] \(fwd\|cpu\): field 'status' must be a"),
        ("fwd|cpu", r"b\.json': rows\[0\] must be an object, got str"),
    ],
)
def test_compare_refuses_rows_it_cannot_use(tmp_path, capsys, row, message):
    a = _results(tmp_path / "a.json", [{"key": "fwd|cpu", "status": "ok", "time_ms": 1.0}])
    b = _results(tmp_path / "b.json", [row])
    assert main(["bench", "compare", a, b]) == 2
    line = _error_line(capsys.readouterr().err)
    assert re.search(message, line), line


def test_compare_refuses_non_finite_times_and_threshold(tmp_path, capsys):
    a = _results(tmp_path / "a.json", [{"key": "fwd|cpu", "status": "ok", "time_ms": 1.0}])
    nan = tmp_path / "nan.json"
    nan.write_text('{"schema": "aigc_ext.bench/1", "rows": [{"key": "k", "time_ms": NaN}]}')
    assert main(["bench", "compare", a, str(nan)]) == 2
    assert "field 'time_ms' must be a finite number >= 0 or null, got nan" in _error_line(
        capsys.readouterr().err
    )
    for value in ("nan", "inf", "-0.1"):
        assert main(["bench", "compare", a, a, "--threshold", value]) == 2
        line = _error_line(capsys.readouterr().err)
        assert f"threshold (--threshold): must be a finite number >= 0, got {float(value)}" in line
    assert main(["bench", "compare", a, a, "--threshold", "0"]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00", r"b\.json' is not UTF-8 text \(byte 0x89 at offset 0\)"),
        (b"[" * DEEP + b"]" * DEEP, r"b\.json': JSON nested too deeply"),
    ],
    ids=["binary", "deeply-nested"],
)
def test_compare_refuses_unreadable_files(tmp_path, capsys, content, message):
    a = _results(tmp_path / "a.json", [])
    (tmp_path / "b.json").write_bytes(content)
    assert main(["bench", "compare", a, str(tmp_path / "b.json")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert re.search(message, line), line


def test_compare_refuses_a_device_file_without_reading_it(tmp_path, capsys):
    a = _results(tmp_path / "a.json", [])
    assert main(["bench", "compare", a, "/dev/zero"]) == 2
    assert "'/dev/zero' is not a regular file" in _error_line(capsys.readouterr().err)


def test_compare_survives_an_odd_machine_description(tmp_path, capsys):
    rows = [{"key": "fwd|cpu", "status": "ok", "time_ms": 1.0}]
    a = _results(tmp_path / "a.json", rows)
    b = tmp_path / "b.json"
    doc = {"schema": "aigc_ext.bench/1", "machine": {"cpu": "x", "gpu": "y"}, "rows": rows}
    b.write_text(json.dumps(doc))
    assert main(["bench", "compare", a, str(b)]) == 0
    assert "no regression" in capsys.readouterr().out


# ----------------------------------------------------------------------------- scale, is_causal


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 4, 8, generator=g) for _ in range(3)]


@pytest.mark.parametrize(
    "scale",
    [torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), np.float32(0.5), np.float64(0.5)],
    ids=["tensor", "tensor-f64", "np-float32", "np-float64"],
)
def test_scale_takes_what_torch_takes_as_a_float(scale):
    q, k, v = _qkv()
    expected = F.scaled_dot_product_attention(q, k, v, scale=scale)  # torch accepts it
    torch.testing.assert_close(
        aigc_ext.scaled_dot_product_attention(q, k, v, scale=scale), expected
    )
    torch.testing.assert_close(
        aigc_ext.scaled_dot_product_attention(q, k, v, scale=scale),
        aigc_ext.scaled_dot_product_attention(q, k, v, scale=0.5),
    )


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (torch.tensor([0.5]), r"scale must be a Python float .*got a Tensor of shape \(1,\)$"),
        (
            torch.tensor(0.5, requires_grad=True),
            r"scale must be a Python float .*got a Tensor of shape \(\), requires grad$",
        ),
        ("0.5", r"scale must be a Python float; got str '0\.5'"),
        (0.5 + 0j, r"scale must be a Python float; got complex"),
    ],
    ids=["tensor-1d", "tensor-requires-grad", "str", "complex"],
)
def test_scale_refuses_what_torch_refuses_with_a_type_error(scale, message):
    q, k, v = _qkv()
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, k, v, scale=scale)
    with pytest.raises(TypeError, match=message):
        aigc_ext.scaled_dot_product_attention(q, k, v, scale=scale)


def test_an_integer_scale_too_large_for_a_float_is_named():
    q, k, v = _qkv()
    with pytest.raises(OverflowError):
        F.scaled_dot_product_attention(q, k, v, scale=10**400)
    with pytest.raises(
        ValueError, match=r"scale must be a finite float; got an integer of 1329 bits"
    ):
        aigc_ext.scaled_dot_product_attention(q, k, v, scale=10**400)
    with pytest.raises(OverflowError, match="scale"):  # the kind torch raises, too
        aigc_ext.scaled_dot_product_attention(q, k, v, scale=-(10**400))


@pytest.mark.parametrize(
    "is_causal",
    [torch.tensor(True), 1, None, np.bool_(True), "yes"],
    ids=["tensor", "int", "none", "np-bool", "str"],
)
def test_is_causal_must_be_a_bool_as_in_torch(is_causal):
    q, k, v = _qkv()
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    name = type(is_causal).__name__
    with pytest.raises(TypeError, match=rf"is_causal must be bool, not {name}$"):
        aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
