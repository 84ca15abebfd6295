"""benchmarks/amx_probe.cpp builds with the command the README gives and prints sane numbers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "benchmarks" / "amx_probe.cpp"


def _cpu_has_amx_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags and "amx_tile" in flags


@pytest.fixture(scope="module")
def probe_binary(tmp_path_factory) -> Path:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ on this machine")
    out = tmp_path_factory.mktemp("amx_probe") / "amx_probe"
    cmd = [compiler, "-O2", "-mavx512f", "-mamx-tile", "-mamx-bf16", str(SOURCE), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "amx" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip(f"this g++ has no AMX support: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    return out


def test_amx_probe_reports_each_instruction_and_gemm(probe_binary: Path) -> None:
    if not _cpu_has_amx_bf16():
        result = subprocess.run([str(probe_binary), "2"], capture_output=True, text=True)
        assert result.returncode == 1
        assert "AMX" in result.stdout
        return
    result = subprocess.run([str(probe_binary), "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    assert "3 interleaved rounds" in text
    names = [
        "TILELOADD, 64-byte aligned",
        "TILELOADD, 16-byte aligned",
        "TDPBF16PS",
        "TILESTORED, 64-byte aligned",
        "TILESTORED, 16-byte aligned",
    ]
    for name in names:
        line = next(ln for ln in text.splitlines() if ln.startswith(name))
        ticks_min, ticks_med, ns_min, ns_med = (float(x) for x in line[len(name) :].split())
        assert 0 < ticks_min <= ticks_med, line
        assert 0 < ns_min <= ns_med, line
    gemms = re.findall(r"^GEMM 64x512x(\d+), 64-byte\s+(\d+)\s+(\d+)", text, flags=re.M)
    assert [k for k, _, _ in gemms] == ["64", "128"]
    no_stores = re.findall(r"^  same, no result stores\s+(\d+)\s+(\d+)", text, flags=re.M)
    shifted = re.findall(r"^  same, 16-byte aligned\s+(\d+)\s+(\d+)", text, flags=re.M)
    assert len(no_stores) == 2 and len(shifted) == 2
    for (_, best, median), (best_ns, _) in zip(gemms, no_stores, strict=True):
        assert 0 < int(median) <= int(best)
        # Leaving the result stores out cannot make the same GEMM much slower.
        assert int(best_ns) > 0.8 * int(best)
    work = {}
    for line in text.splitlines():
        m = re.match(r"^(none|FMAs on registers|64-byte loads|64-byte stores)\s+(.*)$", line)
        if m:
            work[m.group(1)] = m.group(2).split()
    assert list(work) == ["none", "FMAs on registers", "64-byte loads", "64-byte stores"]
    for name, cells in work.items():
        both, alone, gemm = cells[0], cells[1], cells[2]
        assert float(both) > 0 and float(gemm) > 0
        if name != "none":
            assert float(alone) > 0 and cells[3].endswith("%")
