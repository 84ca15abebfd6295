"""benchmarks/bench_gpu.py on the CPU: argument parsing, heads per head dim, and the summary
table from fake timings (the GPU run itself is benchmarks/gpu_check.sh's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"
_spec = importlib.util.spec_from_file_location("bench_gpu", PATH)
bench_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_gpu)


def test_defaults_cover_the_planned_grid():
    a = bench_gpu._args([])
    assert a.head_dims == [64, 128, 256] and a.seqs[0] == 1024 and a.seqs[-1] == 16384
    assert "cuda" in a.providers and "triton" in a.providers and a.tokens == 16384
    assert [bench_gpu.heads_for(a, e) for e in a.head_dims] == [32, 16, 8]  # H * E = 2048
    assert bench_gpu.heads_for(bench_gpu._args(["--heads", "4"]), 64) == 4


@pytest.mark.parametrize("argv", [["--heads", "-1"], ["--tokens", "0"], ["--seqs", "0"]])
def test_bad_arguments_are_named(argv, capsys):
    with pytest.raises(SystemExit):
        bench_gpu._args(argv)
    assert argv[0] in capsys.readouterr().err


def _row(provider, tflops, mode="fwd", **kw):
    base = {"provider": provider, "mode": mode, "B": 16, "H": 16, "L": 1024, "S": 1024, "E": 128,
            "causal": False, "tflops": tflops}  # fmt: skip
    return {**base, **kw}


def test_summary_ratios_and_table_from_fake_timings():
    rows = [
        {"provider": "matmul", "mode": "matmul", "N": 8192, "tflops": 800.0},
        _row("triton", 400.0, max_abs_diff=0.0, diff_against="triton"),
        _row("cuda", 200.0, max_abs_diff=0.004, diff_against="triton"),
        _row("flash", 500.0, max_abs_diff=0.002, diff_against="triton"),
        _row("cudnn", None, error="RuntimeError: no"),
        _row("flex", 250.0),
    ]
    (g,) = bench_gpu.summarize(rows)
    assert g["fastest_torch_sdpa"] == "flash" and g["matmul_tflops"] == 800.0
    assert g["triton_vs_fastest_torch_sdpa"] == pytest.approx(0.8)
    assert g["cuda_vs_fastest_torch_sdpa"] == pytest.approx(0.4)
    assert g["cuda_vs_flex"] == pytest.approx(0.8)
    assert g["triton_pct_of_matmul"] == pytest.approx(50.0)
    text = bench_gpu.table([g])
    assert "800.0 TFLOP/s" in text and "50.0%" in text and "25.0%" in text
    assert "0.40x" in text and "4.0e-03" in text
    line = text.splitlines()[-1]
    assert line.split()[:5] == ["128", "1024", "16", "False", "fwd"]
