"""The fp32 FMA peak probe: the extension's operator and benchmarks/fma_probe.cpp (README build)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import aigc_ext  # noqa: F401  (loads the operators)

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "benchmarks" / "fma_probe.cpp"
# No CPU today exceeds ~350 fp32 GFLOP/s per core (2 x 512-bit FMA units at ~5 GHz).
PLAUSIBLE_PER_CORE = (0.5, 2000.0)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _info() -> dict[str, str]:
    text = torch.ops.aigc_ext._fma_peak_info()
    return dict(part.split("=", 1) for part in text.split())


def _supported(info: dict[str, str]) -> list[str]:
    return ["scalar"] + [
        isa for isa, key in (("avx2", "avx2_fma"), ("avx512", "avx512f")) if info[key] == "1"
    ]


# ----------------------------------------------------------------------------- the operator


def test_op_returns_a_plausible_peak_quickly():
    t0 = time.perf_counter()
    per_core = torch.ops.aigc_ext._fma_peak_gflops(0.1, 1)
    elapsed = time.perf_counter() - t0
    assert isinstance(per_core, float) and math.isfinite(per_core)
    assert PLAUSIBLE_PER_CORE[0] < per_core < PLAUSIBLE_PER_CORE[1]
    assert elapsed < 1.0, f"a 0.1 s probe took {elapsed:.2f} s"
    two = torch.ops.aigc_ext._fma_peak_gflops(0.1, 2)
    # Two threads together: positive, and at most two cores' worth (with room for noise).
    assert 0 < two < 2 * per_core * 1.5


def test_op_default_threads_are_torchs():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.aigc_ext._fma_peak_gflops(0.05)
        assert PLAUSIBLE_PER_CORE[0] < one < PLAUSIBLE_PER_CORE[1]
    finally:
        torch.set_num_threads(threads)


def test_info_matches_the_cpu_flags_and_default_is_the_widest():
    info = _info()
    assert set(info) >= {"isa", "lanes", "accumulators", "avx2_fma", "avx512f", "avx512_bf16"}
    flags = _cpu_flags()
    if flags:  # Linux: the cpuid reading agrees with the kernel's
        assert info["avx512f"] == ("1" if "avx512f" in flags else "0")
        assert info["avx2_fma"] == ("1" if {"avx2", "fma"} <= flags else "0")
        assert info["avx512_bf16"] == ("1" if "avx512_bf16" in flags else "0")
        assert info["amx_bf16"] == ("1" if "amx_bf16" in flags else "0")
        assert info["avx512_fp16"] == ("1" if "avx512_fp16" in flags else "0")
    widest = _supported(info)[-1]
    assert info["isa"] == widest
    assert info["lanes"] == {"scalar": "1", "avx2": "8", "avx512": "16"}[widest]


def test_every_supported_isa_runs_and_wider_is_faster():
    info = _info()
    rates = {isa: torch.ops.aigc_ext._fma_peak_gflops(0.05, 1, isa) for isa in _supported(info)}
    assert all(r > 0 for r in rates.values()), rates
    if "avx2" in rates:  # 8-lane FMAs against one multiply and one add per cycle or two
        assert rates["avx2"] > 2 * rates["scalar"], rates


def test_unsupported_isa_is_refused():
    info = _info()
    for isa, key in (("avx2", "avx2_fma"), ("avx512", "avx512f"), ("avx512_bf16", "avx512_bf16")):
        if info[key] == "0":
            with pytest.raises(RuntimeError, match=f"isa='{isa}' is not supported by this CPU"):
                torch.ops.aigc_ext._fma_peak_gflops(0.01, 1, isa)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((float("nan"),), r"seconds must be a finite number in \(0, 60\], got nan"),
        ((float("inf"),), r"seconds must be a finite number in \(0, 60\], got inf"),
        ((0.0,), r"seconds must be .*, got 0"),
        ((-1.0,), r"seconds must be .*, got -1"),
        ((61.0,), r"seconds must be .*, got 61"),
        ((0.01, -1), r"threads must be in \[0, 4096\] .*, got -1"),
        ((0.01, 5000), r"threads must be in \[0, 4096\] .*, got 5000"),
        (
            (0.01, 1, "sse"),
            r"isa must be one of auto, scalar, avx2, avx512, avx512_bf16; got 'sse'",
        ),
    ],
)
def test_bad_arguments_are_named(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.aigc_ext._fma_peak_gflops(*args)


# ----------------------------------------------------------------------------- the program


@pytest.fixture(scope="module")
def probe_binary(tmp_path_factory) -> Path:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ on this machine")
    out = tmp_path_factory.mktemp("fma_probe") / "fma_probe"
    cmd = [compiler, "-O2", "-pthread", str(SOURCE), "-o", str(out)]  # the README's command
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


def _figures(text: str) -> tuple[dict[str, float], tuple[int, str, float]]:
    per_core = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^per core, (\w+): ([\d.]+) GFLOP/s$", text, flags=re.M)
    }
    m = re.search(r"^(\d+) threads?, (\w+): ([\d.]+) GFLOP/s \(\1 probes run together", text, re.M)
    assert m, text
    return per_core, (int(m.group(1)), m.group(2), float(m.group(3)))


def test_program_prints_per_core_and_all_thread_figures(probe_binary: Path):
    t0 = time.perf_counter()
    result = subprocess.run(
        [str(probe_binary), "0.2", "2"], capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - t0
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    head = re.search(r"widest FMA (\w+) \((\d+) fp32 lanes, 12 accumulators\), 0.20 s", text)
    assert head, text
    widest = head.group(1)
    assert widest == _info()["isa"]  # the program and the extension choose alike
    per_core, (threads, isa, together) = _figures(text)
    assert list(per_core) == _supported(_info())
    assert threads == 2 and isa == widest
    assert PLAUSIBLE_PER_CORE[0] < per_core[widest] < PLAUSIBLE_PER_CORE[1]
    assert per_core[widest] >= per_core["scalar"]
    assert 0 < together < 2 * per_core[widest] * 1.5
    dp = re.search(
        r"^per core, vdpbf16ps \(avx512_bf16, bf16 pairs into fp32\): ([\d.]+) GFLOP/s$", text, re.M
    )
    assert (dp is not None) == (_info()["avx512_bf16"] == "1"), text
    if dp is not None:  # two bf16 products a lane: up to twice the fp32 FMA's FLOPs
        assert 0.7 * per_core[widest] < float(dp.group(1)) < 2.4 * per_core[widest]
    assert elapsed < 10, f"0.2 s per figure took {elapsed:.1f} s"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["abc"], "seconds must be a number in (0, 60]"),
        (["0"], "seconds must be a number in (0, 60]"),
        (["nan"], "seconds must be a number in (0, 60]"),
        (["0.1", "0"], "threads must be an integer in [1, 4096]"),
        (["0.1", "2x"], "threads must be an integer in [1, 4096]"),
        (["0.1", "1", "extra"], "too many arguments"),
    ],
)
def test_program_refuses_bad_arguments(probe_binary: Path, args, message):
    result = subprocess.run([str(probe_binary), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr and "usage: fma_probe" in result.stderr
