"""``aigc-ext bench``: results files, correctness flags, exit codes, bad input, OOM rows, plot."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import aigc_ext
from aigc_ext import bench, cli, hookimpl
from aigc_ext.bench import measure, runner
from aigc_ext.bench.config import BenchConfig, UsageError, attention_flop
from aigc_ext.testing import register_plugin

# Tiny rows: one fp32 forward case, two timed runs.
TINY = [
    "--batch", "1", "--heads", "2", "--seq", "16", "--head-dim", "8", "--dtype", "fp32",
    "--mode", "fwd", "--causal", "off", "--reps", "2", "--warmup", "1", "--no-progress",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _small_probe(monkeypatch):
    """Peak probes of a few milliseconds (matmuls up to 128^3): the tests check the plumbing."""
    probe = measure.matmul_peak_gflops

    def small(dtype, device="cpu", n=None, reps=3, budget_s=1.0):
        return probe(dtype, device, n=128, reps=1, budget_s=0.1)

    monkeypatch.setattr(measure, "matmul_peak_gflops", small)
    monkeypatch.setattr(measure, "FMA_SECONDS_PER_CORE", 0.01)
    monkeypatch.setattr(measure, "FMA_SECONDS_ALL_THREADS", 0.02)


def _bench(*args: str) -> int:
    return cli.main(["bench", *TINY, *args])


# ----------------------------------------------------------------------------- FLOPs


def test_flop_count_follows_flashattention_convention():
    b, h, lq, lk, e = 2, 3, 128, 128, 64
    fwd = 4.0 * b * h * lq * lk * e
    assert attention_flop(b, h, lq, lk, e) == fwd
    assert attention_flop(b, h, lq, lk, e, causal=True) == fwd / 2
    assert attention_flop(b, h, lq, lk, e, mode="bwd") == 2.5 * fwd
    assert attention_flop(b, h, lq, lk, e, mode="fwd+bwd") == 3.5 * fwd
    assert attention_flop(b, h, lq, lk, e, causal=True, mode="fwd+bwd") == 3.5 * fwd / 2
    # E for Q K^T, Ev for P V: 2*B*H*L*S*(E + Ev).
    assert attention_flop(b, h, lq, lk, e, head_dim_v=32) == 2.0 * b * h * lq * lk * (64 + 32)
    # Decode: one query row against the cache, never halved.
    assert attention_flop(1, 8, 1, 4096, 128, mode="decode") == 4.0 * 8 * 4096 * 128
    # Top-left causal with L != S counts the visible pairs: L=2, S=4 sees 1 + 2 of 8 pairs.
    assert attention_flop(1, 1, 2, 4, 8, causal=True) == 4.0 * 2 * 4 * 8 * 3 / 8
    with pytest.raises(ValueError, match="mode"):
        attention_flop(1, 1, 1, 1, 1, mode="sideways")


# ----------------------------------------------------------------------------- JSON, CSV


def test_json_and_csv_carry_schema_machine_and_one_record_per_row(tmp_path):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    backends = ["cpu", "torch-math", "torch-flash", "torch-efficient"]
    code = _bench("--backends", *backends, "--json", str(out_json), "--csv", str(out_csv))
    assert code == 0
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "aigc_ext.bench/1"
    assert doc["complete"] is True
    m = doc["machine"]
    for key in ("aigc_ext", "torch", "python", "cpu", "threads", "gpu", "compiled", "date"):
        assert key in m, key
    assert m["torch"] == torch.__version__ and m["aigc_ext"] == aigc_ext.__version__
    assert m["threads"] == torch.get_num_threads()
    assert isinstance(m["cpu"]["model"], str) and isinstance(m["cpu"]["isa"], list)
    assert m["peak_gflops"]["fp32"] > 0 and m["peaks"]["dtypes"]["fp32"]["source"]
    assert doc["config"]["seq"] == [16]

    rows = doc["rows"]
    assert [r["backend"] for r in rows] == backends  # one case, one record per backend
    assert len({r["key"] for r in rows}) == len(rows)
    for r in rows:
        assert r["status"] in runner.STATUSES
        assert (r["seq_q"], r["seq_kv"], r["head_dim"], r["dtype"]) == (16, 16, 8, "fp32")
        assert r["flop"] == 4.0 * 1 * 2 * 16 * 16 * 8
    ran = [r for r in rows if r["status"] == "ok"]
    assert {r["backend"] for r in ran} == {"cpu", "torch-math", "torch-flash"}
    for r in ran:
        assert r["reps"] == 2 and len(r["times_ms"]) == 2
        assert r["time_p20_ms"] <= r["time_ms"] <= r["time_p80_ms"]
        assert math.isclose(r["gflops"], r["flop"] / (r["time_ms"] / 1e3) / 1e9, rel_tol=1e-3)
        assert r["peak_fraction"] > 0
        assert r["speedup_vs_torch"] > 0 and r["torch_best"] in ("torch-math", "torch-flash")
        assert r["correct"] is True and r["max_err"] < 1e-5
        assert r["errors"]["out"]["max_err"] <= r["errors"]["out"]["bound"]
    # The best torch backend has speedup 1 over itself.
    best = next(r for r in ran if r["backend"] == ran[0]["torch_best"])
    assert best["speedup_vs_torch"] == pytest.approx(1.0)

    with out_csv.open(newline="") as f:
        lines = list(csv.DictReader(f))
    assert [x["key"] for x in lines] == [r["key"] for r in rows]
    assert lines[0]["schema"] == "aigc_ext.bench/1"
    assert lines[0]["torch"] == torch.__version__ and lines[0]["cpu_model"]
    assert {x["status"] for x in lines} == {"ok", "skipped"}


def test_skipped_rows_carry_reasons(tmp_path):
    out = tmp_path / "r.json"
    code = _bench(
        "--backends", "cpu", "torch-efficient", "torch-cudnn", "flash-attn", "xformers",
        "torch-flex", "--flex-compile-budget", "0", "--json", str(out),
    )  # fmt: skip
    assert code == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["cpu"]["status"] == "ok"
    for name in ("torch-efficient", "torch-cudnn", "flash-attn", "xformers", "torch-flex"):
        assert rows[name]["status"] == "skipped", name
        assert rows[name]["reason"], name
        assert rows[name]["time_ms"] is None and rows[name]["correct"] is None
    assert "CUDA" in rows["torch-efficient"]["reason"]
    assert "flex-compile-budget" in rows["torch-flex"]["reason"]


# ----------------------------------------------------------------------------- correctness


class _WrongBackendPlugin:
    """Registers ``test-wrong``: the right answer plus 0.01."""

    @hookimpl
    def aigc_register_attention_backends(self, register):
        def wrong(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, gqa=False):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=gqa
            )
            return out + 0.01

        register("test-wrong", wrong, devices=("cpu",), priority=-1000)


def test_wrong_plugin_backend_fails_correctness_and_exit_code_is_1(tmp_path, capsys):
    out = tmp_path / "r.json"
    with register_plugin(_WrongBackendPlugin(), name="test-wrong-plugin"):
        assert "test-wrong" in [b.name for b in aigc_ext.backends()]
        code = _bench("--backends", "test-wrong", "cpu", "torch-math", "--json", str(out))
    assert code == 1
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    bad = rows["test-wrong"]
    assert bad["status"] == "fail" and bad["correct"] is False
    assert bad["max_err"] == pytest.approx(0.01, rel=1e-3)
    assert "out: max err" in bad["reason"]
    assert rows["cpu"]["status"] == "ok" and rows["torch-math"]["status"] == "ok"
    text = capsys.readouterr().out
    assert "fail" in text and "test-wrong" in text


def test_every_mode_mask_and_gqa_passes_the_error_rule():
    config = BenchConfig(
        batch=[2],
        heads=[4],
        kv_heads=[2],
        seq=[8],
        kv_seq=[12],
        decode_seq=[20],
        head_dim=[8],
        head_dim_v=[4],
        dtype=["fp32", "bf16"],
        causal=[False, True],
        mask=["none", "padding", "arbitrary"],
        mode=["fwd", "bwd", "fwd+bwd", "decode"],
        backends=["cpu", "torch-math"],
        reps=1,
        warmup=0,
        memory=False,
    )
    rows = bench.run(config)
    assert len(rows) == 2 * len(config.cases())
    assert {r.case.mode for r in rows} == {"fwd", "bwd", "fwd+bwd", "decode"}
    assert all(not r.case.causal for r in rows if r.case.mode == "decode")
    for r in rows:
        assert r.status == "ok", (r.key, r.reason)
        assert r.correct is True
        names = {"out", "dq", "dk", "dv"} if r.case.backward else {"out"}
        assert set(r.check.errors) == names
    assert bench.exit_code(rows) == 0


# ----------------------------------------------------------------------------- bad input


def test_unknown_backend_is_a_usage_error_listing_known_names(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _bench("--backends", "cpu", "warp-drive", "--json", str(out)) == 2
    err = capsys.readouterr().err
    assert "'warp-drive'" in err
    for known in ("cpu", "reference", "torch-flash", "torch-math", "torch-flex"):
        assert known in err
    assert not out.exists()  # nothing ran


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "1,2,16,8", "1,2,16,16", "1,2,16,8"], "head dims differ"),
        (["--heads", "6", "--kv-heads", "4"], "multiple of KV heads"),
        (["--shape", "1,6,16,8", "1,4,16,8", "1,4,16,8"], "multiple of KV heads"),
        (["--seq", "0"], "positive"),
        (["--batch", "-1"], "positive"),
        (["--head-dim", "x"], "integers"),
        (["--dtype", "fp8"], "fp32, bf16, fp16"),
        (["--mode", "sideways"], "fwd, bwd, fwd+bwd, decode"),
        (["--causal", "maybe"], "on, off"),
        (["--reps", "0"], "reps"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    ],
)
def test_impossible_shapes_and_bad_values_exit_2_before_running(tmp_path, capsys, args, message):
    out = tmp_path / "r.json"
    assert _bench(*args, "--json", str(out)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not out.exists()


def test_bench_main_returns_2_on_argparse_errors():
    assert bench.main(["--no-such-option"]) == 2
    assert bench.main(["--quick", "--full"]) == 2


def test_config_validate_names_the_field():
    with pytest.raises(UsageError, match="kv_heads"):
        BenchConfig(heads=[8], kv_heads=[3]).validate()
    with pytest.raises(UsageError, match="mask"):
        BenchConfig(mask=["diagonal"]).validate()


# ----------------------------------------------------------------------------- OOM, interruption


class _FlakyPlugin:
    """``test-flaky`` raises ``self.error`` on calls with 32 keys and works otherwise."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    @hookimpl
    def aigc_register_attention_backends(self, register):
        def flaky(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, gqa=False):
            if k.shape[-2] == 32:
                raise self.error
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=gqa
            )

        register("test-flaky", flaky, devices=("cpu",), priority=-1000)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory: out of memory"),
        MemoryError(),
    ],
    ids=["OutOfMemoryError", "RuntimeError", "MemoryError"],
)
def test_out_of_memory_row_is_recorded_and_the_sweep_goes_on(error):
    config = BenchConfig(
        heads=[2],
        seq=[32, 16],
        head_dim=[8],
        dtype=["fp32"],
        causal=[False],
        mode=["fwd"],
        backends=["test-flaky", "torch-math"],
        reps=1,
        warmup=0,
    )
    with register_plugin(_FlakyPlugin(error), name="test-flaky-plugin"):
        rows = bench.run(config)
    by = {(r.case.seq_q, r.backend): r for r in rows}
    assert by[32, "test-flaky"].status == "oom"
    assert by[32, "test-flaky"].times_s == []
    assert by[32, "torch-math"].status == "ok"  # the same case goes on without it
    assert by[16, "test-flaky"].status == "ok"  # and so does the sweep
    assert bench.exit_code(rows) == 0  # out of memory is no correctness failure
    assert bench.record(by[32, "test-flaky"])["status"] == "oom"


def test_rows_written_so_far_survive_an_interrupted_run(tmp_path):
    out = tmp_path / "r.json"
    with register_plugin(_FlakyPlugin(KeyboardInterrupt()), name="test-flaky-plugin"):
        args = ["--seq", "16", "32", "--backends", "test-flaky", "cpu", "--json", str(out)]
        code = cli.main(["bench", *TINY, *args])
    assert code == 130
    doc = json.loads(out.read_text())
    assert doc["complete"] is False
    # The first case is saved whole; the second was interrupted before its rows were written.
    assert sorted((r["seq_q"], r["backend"]) for r in doc["rows"]) == [
        (16, "cpu"),
        (16, "test-flaky"),
    ]


# ----------------------------------------------------------------------------- compare


def _results(tmp_path, name: str, times: dict[str, float], statuses=None) -> str:
    """A results file whose rows have the given times (ms) by backend."""
    doc = {
        "schema": "aigc_ext.bench/1",
        "machine": {"cpu": {"model": "test"}, "torch": torch.__version__},
        "rows": [
            {
                "key": f"fwd/fp32/L16|{b}",
                "backend": b,
                "status": (statuses or {}).get(b, "ok"),
                "time_ms": t,
            }
            for b, t in times.items()
        ],
    }
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_compare_exit_codes_and_threshold(tmp_path, capsys):
    a = _results(tmp_path, "a.json", {"cpu": 10.0, "torch-flash": 20.0})
    same = _results(tmp_path, "same.json", {"cpu": 10.0, "torch-flash": 20.0})
    faster = _results(tmp_path, "faster.json", {"cpu": 5.0, "torch-flash": 19.0})
    slower = _results(tmp_path, "slower.json", {"cpu": 11.0, "torch-flash": 20.0})
    assert cli.main(["bench", "compare", a, same]) == 0
    assert cli.main(["bench", "compare", a, faster]) == 0
    assert cli.main(["bench", "compare", a, slower]) == 1  # 10% > 5% default
    out = capsys.readouterr().out
    assert "1.100" in out and "regression" in out
    assert cli.main(["bench", "compare", a, slower, "--threshold", "0.2"]) == 0
    assert cli.main(["bench", "compare", a, slower, "--threshold", "0.05"]) == 1
    failing = _results(tmp_path, "f.json", {"cpu": 9.0, "torch-flash": 20.0}, {"cpu": "fail"})
    assert cli.main(["bench", "compare", a, failing]) == 1  # ok -> fail is a regression


def test_compare_lists_rows_present_in_one_file_only(tmp_path, capsys):
    a = _results(tmp_path, "a.json", {"cpu": 10.0, "torch-math": 50.0})
    b = _results(tmp_path, "b.json", {"cpu": 10.0, "triton": 1.0})
    assert cli.main(["bench", "compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "only in A" in out and "fwd/fp32/L16|torch-math" in out
    assert "only in B" in out and "fwd/fp32/L16|triton" in out


def test_compare_bad_files_exit_2(tmp_path, capsys):
    a = _results(tmp_path, "a.json", {"cpu": 10.0})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something/9", "rows": []}))
    assert cli.main(["bench", "compare", a, str(tmp_path / "missing.json")]) == 2
    assert cli.main(["bench", "compare", a, str(other)]) == 2
    assert "aigc_ext.bench/1" in capsys.readouterr().err


def test_compare_of_two_real_runs(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert _bench("--backends", "cpu", "--json", str(a)) == 0
    doc = json.loads(a.read_text())
    for r in doc["rows"]:
        r["time_ms"] *= 1.5
    b.write_text(json.dumps(doc))
    assert cli.main(["bench", "compare", str(a), str(a)]) == 0
    assert cli.main(["bench", "compare", str(a), str(b)]) == 1


# ----------------------------------------------------------------------------- plot, info, CLI


def test_plot_is_a_png(tmp_path):
    png = tmp_path / "sub" / "plot.png"
    assert _bench("--seq", "16", "32", "--backends", "cpu", "torch-math", "--plot", str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_reports_what_was_compiled_in(capsys):
    assert cli.main(["info", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)["compiled"]
    assert built["cpu_kernels"] is True
    assert "default" in built["cpu_isas"]
    assert built["cuda_kernels"] is False  # no CUDA sources exist yet
    assert built["torch_cuda"] == torch.version.cuda
    assert cli.main(["info"]) == 0
    assert "compiled in: CPU kernels yes" in capsys.readouterr().out


def test_console_script_smoke(tmp_path):
    out = tmp_path / "r.json"
    script = Path(sys.executable).with_name("aigc-ext")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "aigc_ext.cli"]
    proc = subprocess.run(
        [*command, "bench", *TINY, "--backends", "cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cpu" in proc.stdout and "GFLOP/s" in proc.stdout
    assert json.loads(out.read_text())["rows"][0]["status"] == "ok"
