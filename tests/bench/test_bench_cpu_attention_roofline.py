"""benchmarks/bench_cpu_attention.py: each row of our kernel as a % of the peak of its path."""

from __future__ import annotations

import json
import re

import pytest
from bench_scripts import load_benchmark

from aigc_ext.bench.roofline import Peak, Peaks


@pytest.fixture
def script(monkeypatch):
    return load_benchmark("bench_cpu_attention", monkeypatch, "bench_cpu_attention_roofline")


def _row(script, dtype: str, gflops: float | None, seq: int = 2048, head_dim: int = 128):
    row = script.Row(dtype, "fwd", False, 1, 8, seq, seq, head_dim, 1.0)
    if gflops is not None:
        row.gflops["ours"] = gflops
    return row


def test_rows_take_the_peak_of_the_kernels_path(script):
    # bf16 rows of the cpu backend have their own peak (here: the kernel converts to fp32).
    fp32 = Peak(200.0, "fp32 FMA")
    peaks = Peaks({"fp32": fp32, "bf16": Peak(800.0, "bf16 AMX matmul")}, {"bf16": fp32})
    rows = [_row(script, "fp32", 150.0), _row(script, "bf16", 150.0), _row(script, "fp64", 9.0)]
    for row in rows:
        script.set_peak_fraction(row, peaks)
    assert rows[0].peak_gflops == 200.0 and rows[0].peak_fraction == pytest.approx(0.75)
    assert rows[1].peak_gflops == 200.0 and rows[1].peak_fraction == pytest.approx(0.75)
    assert rows[2].peak_fraction is None  # no fp64 peak
    failed = _row(script, "fp32", None)  # our call failed: nothing to scale
    script.set_peak_fraction(failed, peaks)
    assert failed.peak_fraction is None
    script.set_peak_fraction(no_peaks := _row(script, "fp32", 150.0), None)
    assert no_peaks.peak_fraction is None


@pytest.mark.parametrize(
    ("fraction", "text"), [(None, "-"), (0.0, "0%"), (0.794, "79%"), (1.0, "100%"), (1.3, "100%*")]
)
def test_no_percentage_above_100(script, fraction, text):
    assert script._percent_of_peak(fraction) == text


def test_summary_gives_the_best_cell_and_the_long_ones(script):
    fp32 = Peak(200.0, "fp32 FMA")
    peaks = Peaks({"fp32": fp32})
    rows = [
        _row(script, "fp32", 120.0, seq=512, head_dim=64),
        _row(script, "fp32", 170.0, seq=2048, head_dim=128),
        _row(script, "fp32", 160.0, seq=4096, head_dim=128),
        _row(script, "fp32", 180.0, seq=4096, head_dim=64),  # long, but E < 128
    ]
    for row in rows:
        script.set_peak_fraction(row, peaks)
    (entry,) = script.summarize(rows)
    p = entry["peak"]
    assert p["best"] == pytest.approx(0.9) and p["best_cell"] == "L=4096 E=64 causal=off"
    assert p["long_min"] == pytest.approx(0.8) and p["long_max"] == pytest.approx(0.85)


def test_the_grid_prints_and_saves_the_fraction(script, capsys, tmp_path):
    out = tmp_path / "grid.json"
    argv = ["--dtypes", "fp32", "--seqs", "128", "--head-dims", "32", "--modes", "fwd"]
    argv += ["--causal", "off", "--impls", "ours", "flash", "--reps", "1", "--warmup", "0"]
    assert script.main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    peak_line = re.search(r"^peak: +fp32 FMA ([\d.]+) GFLOP/s", text, re.M)
    assert peak_line, text
    header = next(line for line in text.splitlines() if line.startswith("dtype"))
    assert "% peak" in header
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["peak_gflops"] == pytest.approx(float(peak_line.group(1)), rel=1e-3)
    assert row["peak_fraction"] == pytest.approx(row["gflops"]["ours"] / row["peak_gflops"])
    shown = script._percent_of_peak(row["peak_fraction"])
    line = next(ln for ln in text.splitlines() if ln.startswith("fp32 ") and " 128 " in ln)
    assert f" {shown} " in line
    assert re.search(r"^  fp32 fwd +of [\d.]+ GFLOP/s: best \d+%\*? \(L=128 E=32", text, re.M)
    assert max(int(p) for p in re.findall(r"(\d+)%", text)) <= 100
