"""``aigc-ext bench``'s peaks: bounded probes, the peak of each row's path, never above 100%."""

from __future__ import annotations

import re
import time

import pytest
import torch
from rich.console import Console

from aigc_ext import bench
from aigc_ext.bench import measure, report, roofline, runner
from aigc_ext.bench.config import BenchConfig, Case, quick_config
from aigc_ext.bench.roofline import Peak, Peaks

# What torch reaches with a bf16 matmul on a CPU without bf16 hardware.
SLOW_BF16_GFLOPS = 0.29
NO_REDUCED_HARDWARE = {
    "amx_bf16": False,
    "avx512_bf16": False,
    "amx_fp16": False,
    "avx512_fp16": False,
}
AVX512_BF16_ONLY = {**NO_REDUCED_HARDWARE, "avx512_bf16": True}
# The cpu kernel's configuration on AVX-512 without AMX: bf16 GEMMs on converted fp32 tiles.
CONVERTING = "isa=avx512 brgemm=1 amx=1 brgemm_bf16=0 brgemm_fp16=0 amx_tiles=0 threads=2"
AMX_TILES = "isa=avx512 brgemm=1 amx=1 brgemm_bf16=1 brgemm_fp16=0 amx_tiles=1 threads=2"


def _fields(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split())


@pytest.fixture
def slow_matmul(monkeypatch):
    """Every timed bf16/fp16 matmul runs at SLOW_BF16_GFLOPS (it sleeps); fp32 is left alone."""
    sizes: list[int] = []
    real = measure._matmul

    def slow(a, b):
        if a.dtype != torch.float32:
            sizes.append(a.shape[0])
            time.sleep(2.0 * a.shape[0] ** 3 / (SLOW_BF16_GFLOPS * 1e9))
        return real(a, b)

    monkeypatch.setattr(measure, "_matmul", slow)
    return sizes


@pytest.fixture
def timed_probes(monkeypatch):
    """Records the seconds each probe (FMA, matmul) takes."""
    spent: list[tuple[str, float]] = []
    for name in ("fma_peak", "matmul_peak_gflops"):
        probe = getattr(measure, name)

        def timed(*args, _probe=probe, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _probe(*args, **kwargs)
            finally:
                spent.append((_name, time.perf_counter() - t0))

        monkeypatch.setattr(measure, name, timed)
    return spent


def _features(
    monkeypatch, features: dict[str, bool], config: str = CONVERTING, dpbf16: Peak | None = None
) -> None:
    """Pretend the CPU has ``features`` and the kernel ``config``; the vdpbf16ps probe gives
    ``dpbf16`` (None: a build whose probe has no vdpbf16ps loop, so AVX512_BF16 is timed with a
    bf16 matmul as on other hardware)."""
    monkeypatch.setattr(roofline, "cpu_features", lambda: dict(features))
    monkeypatch.setattr(roofline, "_kernel_config", lambda: _fields(config))
    monkeypatch.setattr(roofline, "_dpbf16_peak", lambda threads: dpbf16)


# ----------------------------------------------------------------------------- bounded probes


def test_matmul_probe_is_bounded_on_slow_hardware(slow_matmul):
    t0 = time.perf_counter()
    gflops = measure.matmul_peak_gflops(torch.bfloat16, budget_s=1.0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"the probe took {elapsed:.1f} s"
    # What it measured is the slow rate (the sleeps dominate), not a made-up figure.
    assert 0.5 * SLOW_BF16_GFLOPS < gflops < 1.1 * SLOW_BF16_GFLOPS
    # It started small and stopped growing before a size whose calls would overrun the budget.
    assert slow_matmul[0] == 64 and max(slow_matmul) <= 256


def test_matmul_probe_grows_while_calls_are_short(monkeypatch):
    sizes: list[int] = []
    real = measure._matmul
    monkeypatch.setattr(measure, "_matmul", lambda a, b: (sizes.append(a.shape[0]), real(a, b))[1])
    gflops = measure.matmul_peak_gflops(torch.float32, n=256, reps=2, budget_s=5.0)
    assert gflops > 0
    assert sorted(set(sizes)) == [64, 128, 256]  # grew to the largest size allowed, no further


@pytest.mark.parametrize("budget", [0.0, -1.0, float("nan"), float("inf")])
def test_matmul_probe_refuses_a_bad_budget(budget):
    with pytest.raises(ValueError, match=r"budget_s must be a finite number > 0"):
        measure.matmul_peak_gflops(torch.float32, budget_s=budget)


def test_quick_peaks_stay_bounded_and_say_fp32_fma_when_bf16_is_slow(
    monkeypatch, slow_matmul, timed_probes
):
    # A CPU that claims bf16 hardware but whose bf16 matmul crawls: the probe times it within
    # its budget, and the bf16 rows are scaled by the fp32 FMA peak, which is higher.
    _features(monkeypatch, AVX512_BF16_ONLY)
    t0 = time.perf_counter()
    peaks = runner.measure_peaks(quick_config())
    total = time.perf_counter() - t0
    assert [name for name, _ in timed_probes] == ["fma_peak", "matmul_peak_gflops"]
    for name, seconds in timed_probes:
        assert seconds < 2.0, f"{name} took {seconds:.1f} s"
    assert total < 4.0
    assert peaks.fma is not None and peaks.fma.all_threads_gflops > 1.0
    fp32 = peaks["fp32"]
    assert peaks.dtypes["fp32"].source == "fp32 FMA"
    assert peaks.dtypes["bf16"].source == "fp32 FMA" and peaks["bf16"] == fp32
    assert peaks.matmul_gflops["bf16"] < 1.0
    for backend in ("cpu", "torch-flash", "torch-math"):
        assert peaks.for_row("bf16", backend) == fp32
    summary = peaks.summary()
    assert summary.startswith("fp32 FMA ") and f"{torch.get_num_threads()} thread" in summary
    assert re.search(
        r"bf16: fp32 FMA \(above the bf16 AVX512_BF16 matmul's 0\.\d+ GFLOP/s\)", summary
    )


def test_no_bf16_hardware_times_no_bf16_matmul(monkeypatch, slow_matmul):
    _features(monkeypatch, NO_REDUCED_HARDWARE)
    peaks = runner.measure_peaks(quick_config().with_overrides(dtype=["fp32", "bf16", "fp16"]))
    assert slow_matmul == []  # nothing timed in a dtype without hardware
    assert peaks.matmul_gflops == {}
    for dtype in ("bf16", "fp16"):
        assert peaks.dtypes[dtype].source == "fp32 FMA"
        assert peaks[dtype] == peaks["fp32"]
        assert f"{dtype}: fp32 FMA (no {dtype} hardware: computed in fp32)" in peaks.summary()


def test_bf16_hardware_peak_for_torch_rows_fp32_fma_for_a_converting_kernel(monkeypatch):
    _features(monkeypatch, AVX512_BF16_ONLY)
    fast = []

    def fast_matmul(dtype, device="cpu", n=None, reps=3, budget_s=1.0):
        fast.append(dtype)
        return 1e6  # far above any FMA figure

    monkeypatch.setattr(measure, "matmul_peak_gflops", fast_matmul)
    peaks = roofline.cpu_peaks(["fp32", "bf16"], 1)
    assert fast == [torch.bfloat16]
    assert peaks["bf16"] == 1e6 and peaks.dtypes["bf16"].source == "bf16 AVX512_BF16 matmul"
    assert peaks.for_row("bf16", "torch-flash") == 1e6
    # The cpu kernel converts bf16 to fp32 here: its rows get the fp32 FMA peak.
    assert peaks.for_row("bf16", "cpu") == peaks["fp32"] < 1e6
    assert "cpu backend bf16: fp32 FMA (the kernel computes bf16 in fp32 here)" in peaks.summary()

    # With AMX tiles serving the kernel, its bf16 rows are scaled by the bf16 peak too.
    _features(monkeypatch, {**AVX512_BF16_ONLY, "amx_bf16": True}, AMX_TILES)
    peaks = roofline.cpu_peaks(["bf16"], 1)
    assert peaks.dtypes["bf16"].source == "bf16 AMX matmul"
    assert peaks.for_row("bf16", "cpu") == 1e6
    assert peaks.summary().startswith("bf16 AMX matmul 1e+06 GFLOP/s")


VDPBF16 = "isa=avx512 brgemm=1 amx=1 brgemm_bf16=0 brgemm_fp16=0 amx_tiles=0 vdpbf16ps=1 threads=2"


def _no_matmul(*args, **kwargs):
    pytest.fail("no bf16 matmul is timed where the vdpbf16ps probe gives the peak")


def test_avx512_bf16_without_amx_is_scaled_by_the_vdpbf16ps_probe(monkeypatch):
    # Zen 4 / Cooper Lake: every bf16 product runs on vdpbf16ps (or in fp32), so its probe is the
    # ceiling for every backend's bf16 rows, and no bf16 matmul is timed.
    dp = Peak(500.0, "bf16 vdpbf16ps", "probe, 1 threads; 500 per core")
    _features(monkeypatch, AVX512_BF16_ONLY, VDPBF16, dpbf16=dp)
    monkeypatch.setattr(measure, "matmul_peak_gflops", _no_matmul)
    peaks = roofline.cpu_peaks(["fp32", "bf16"], 1)
    assert peaks["fp32"] < 500.0  # this machine's real FMA probe
    assert peaks.dtypes["bf16"] == dp and peaks.matmul_gflops == {}
    for backend in ("cpu", "torch-flash", "torch-math"):
        assert peaks.for_row("bf16", backend) == 500.0
    assert "bf16 vdpbf16ps 500 GFLOP/s (probe, 1 threads; 500 per core)" in peaks.summary()

    # A kernel that converts bf16 (vdpbf16ps switched off) is scaled by the fp32 FMA peak.
    _features(monkeypatch, AVX512_BF16_ONLY, VDPBF16.replace("vdpbf16ps=1", "vdpbf16ps=0"), dp)
    peaks = roofline.cpu_peaks(["fp32", "bf16"], 1)
    assert peaks.for_row("bf16", "torch-flash") == 500.0
    assert peaks.for_row("bf16", "cpu") == peaks["fp32"]

    # A vdpbf16ps slower than the FMAs (issued at a quarter of their rate) is no ceiling.
    _features(monkeypatch, AVX512_BF16_ONLY, VDPBF16, Peak(0.5, "bf16 vdpbf16ps"))
    peaks = roofline.cpu_peaks(["fp32", "bf16"], 1)
    assert peaks.dtypes["bf16"].source == "fp32 FMA" and peaks["bf16"] == peaks["fp32"]


def test_amx_machine_with_the_kernel_on_vdpbf16ps(monkeypatch):
    # cpu_kernel_config(use_amx=False) on an AMX CPU: torch's rows keep the AMX matmul peak, the
    # kernel's bf16 rows take the vdpbf16ps probe.
    monkeypatch.setattr(measure, "matmul_peak_gflops", lambda *a, **k: 1e6)
    dp = Peak(400.0, "bf16 vdpbf16ps", "probe")
    config = "isa=avx512 brgemm=1 amx=0 brgemm_bf16=0 amx_tiles=1 vdpbf16ps=1"
    _features(monkeypatch, {**AVX512_BF16_ONLY, "amx_bf16": True}, config, dpbf16=dp)
    peaks = roofline.cpu_peaks(["bf16"], 1)
    assert peaks.dtypes["bf16"].source == "bf16 AMX matmul"
    assert peaks.for_row("bf16", "torch-flash") == 1e6
    assert peaks.for_row("bf16", "cpu") == 400.0
    assert "cpu backend bf16: bf16 vdpbf16ps 400 GFLOP/s" in peaks.summary()


@pytest.mark.parametrize(
    ("config", "takes"),
    [
        (VDPBF16, True),
        (VDPBF16.replace("vdpbf16ps=1", "vdpbf16ps=0"), False),
        (AMX_TILES + " vdpbf16ps=1", False),  # the AMX tiles take bf16 first
        ("isa=avx512 brgemm=1 amx=0 brgemm_bf16=1 amx_tiles=1 vdpbf16ps=1", False),  # brgemm
        ("isa=avx512 brgemm=0 amx=0 brgemm_bf16=1 amx_tiles=1 vdpbf16ps=1", True),
        (CONVERTING, False),  # a build that does not report the field
    ],
)
def test_kernel_takes_vdpbf16ps_from_its_config(config, takes):
    assert roofline.kernel_takes_vdpbf16ps(_fields(config)) is takes


def test_the_real_vdpbf16ps_probe_counts_four_flops_a_lane():
    info = measure.fma_info()
    if info is None:
        pytest.skip("this build has no FMA probe")
    if info.get("avx512_bf16") != "1":
        with pytest.raises(RuntimeError, match="isa='avx512_bf16' is not supported by this CPU"):
            measure.fma_peak(1, isa="avx512_bf16")
        assert roofline._dpbf16_peak(1) is None
        return
    fp32 = measure.fma_peak(1, isa="avx512")
    dp = measure.fma_peak(1, isa="avx512_bf16")
    assert dp.isa == "avx512_bf16"
    # Two bf16 products a lane per instruction: at most twice the FMA's FLOPs (Zen 4 issues
    # both at one a cycle), about the same where vdpbf16ps issues at half the FMA rate.
    ratio = dp.per_core_gflops / fp32.per_core_gflops
    assert 0.7 < ratio < 2.4, (dp, fp32)
    peak = roofline._dpbf16_peak(1)
    assert peak is not None and peak.source == "bf16 vdpbf16ps" and peak.gflops > 0


@pytest.mark.parametrize(
    ("config", "dtype", "fp32_math"),
    [
        (CONVERTING, "bf16", True),
        (CONVERTING, "fp16", True),
        (CONVERTING, "fp32", False),
        (AMX_TILES, "bf16", False),
        # brgemm for bf16 (AMX through oneDNN) without the kernel's own tile code
        ("isa=avx512 brgemm=1 amx=0 brgemm_bf16=1 amx_tiles=1", "bf16", False),
        # brgemm turned off by the user: converted, even on an AMX machine
        ("isa=avx512 brgemm=0 amx=0 brgemm_bf16=1 amx_tiles=1", "bf16", True),
        # the kernel's AMX tile code exists only in its AVX-512 build
        ("isa=avx2 brgemm=1 amx=1 brgemm_bf16=0 amx_tiles=1", "bf16", True),
        ("isa=avx512 brgemm=1 amx=1 brgemm_fp16=1 amx_tiles=1", "fp16", False),
        # no brgemm for bf16 (an AVX-512 CPU without AMX): the vdpbf16ps micro-kernel
        ("isa=avx512 brgemm=1 amx=1 brgemm_bf16=0 amx_tiles=0 vdpbf16ps=1", "bf16", False),
        ("isa=avx512 brgemm=1 amx=1 brgemm_bf16=0 amx_tiles=0 vdpbf16ps=0", "bf16", True),
        # vdpbf16ps serves bf16 only
        ("isa=avx512 brgemm=1 amx=1 brgemm_fp16=0 amx_tiles=0 vdpbf16ps=1", "fp16", True),
    ],
)
def test_kernel_path_from_its_config(config, dtype, fp32_math):
    assert roofline.kernel_computes_in_fp32(dtype, _fields(config)) is fp32_math


def test_this_machines_kernel_config_parses():
    fields = _fields(" ".join(p for p in torch.ops.aigc_ext._cpu_kernel_config().split()))
    assert {"isa", "brgemm", "amx", "brgemm_bf16", "amx_tiles", "vdpbf16ps"} <= set(fields)


@pytest.mark.parametrize(
    ("per_core", "together", "threads", "cpus", "shared"),
    [
        (200.0, 390.0, 2, 2, False),  # two cores' worth
        (200.0, 210.0, 2, 2, True),  # the second core was busy
        (200.0, 200.0, 2, 1, False),  # one CPU: one core's worth is all there is
        (200.0, 200.0, 1, 8, False),
        (100.0, 500.0, 8, 8, True),
    ],
)
def test_fma_label_says_when_other_work_shared_the_cores(per_core, together, threads, cpus, shared):
    fma = measure.FmaPeak(per_core, together, threads, "avx512", cpus)
    assert fma.shared is shared
    peaks = Peaks({"fp32": Peak(together, "fp32 FMA")}, fma=fma)
    summary = peaks.summary()
    assert summary.startswith(f"fp32 FMA {together:.4g} GFLOP/s (probe, avx512, {threads} thread")
    assert ("busy with other work" in summary) is shared


def test_without_the_fma_op_fp32_comes_from_a_labelled_matmul(monkeypatch):
    _features(monkeypatch, NO_REDUCED_HARDWARE)
    monkeypatch.setattr(measure, "_fma_ops", lambda: None)
    peaks = roofline.cpu_peaks(["fp32", "bf16"], 1)
    assert peaks.fma is None
    assert peaks.dtypes["fp32"].source == "fp32 matmul"
    assert "this build has no FMA probe" in peaks.summary()
    assert peaks["bf16"] == peaks["fp32"] > 0


# ----------------------------------------------------------------------------- rows, table


def test_rows_get_the_peak_of_their_path():
    config = BenchConfig(
        batch=[1], heads=[2], seq=[16], head_dim=[8], dtype=["bf16"], causal=[False],
        mode=["fwd"], reps=1, warmup=0, backends=["cpu", "torch-flash"], memory=False,
    )  # fmt: skip
    peaks = Peaks(
        {"bf16": Peak(900.0, "bf16 AMX matmul")},
        {"bf16": Peak(300.0, "fp32 FMA", "the kernel computes bf16 in fp32 here")},
    )
    rows = {r.backend: r for r in bench.run(config, peaks=peaks)}
    assert rows["cpu"].peak_gflops == 300.0
    assert rows["torch-flash"].peak_gflops == 900.0
    # A plain mapping still works: one peak per dtype.
    (row,) = bench.run(config.with_overrides(backends=["cpu"]), peaks={"bf16": 5.0})
    assert row.peak_gflops == 5.0


def _row(backend: str, gflops: float, peak: float) -> runner.Row:
    case = Case("fwd", "bf16", 1, 8, 8, 1024, 1024, 64, 64, True, "none")
    return runner.Row(case, backend, "aigc_ext", "cpu", times_s=[case.flop / gflops / 1e9],
                      peak_gflops=peak)  # fmt: skip


def test_no_percentage_above_100_is_printed():
    # The broken run: bf16 rows at 44 GFLOP/s against a 0.29 GFLOP/s "peak" read 15296%.
    rows = [_row("cpu", 44.4, 0.29), _row("torch-flash", 20.0, 100.0)]
    console = Console(width=200, record=True)
    machine = {"cpu": {"model": "x", "isa": []}, "peaks": {"summary": "fp32 FMA 100 GFLOP/s"}}
    report.print_table(rows, console=console, machine=machine)
    text = console.export_text()
    percents = [int(p) for p in re.findall(r"(\d+)%", text)]
    assert percents and max(percents) <= 100, text
    assert "100%*" in text and "20%" in text
    assert "* above its peak, shown as 100%: that peak is too low" in text
    assert text.splitlines()[0] == "peak: fp32 FMA 100 GFLOP/s"
    rec = report.record(rows[0])
    assert rec["peak_fraction"] == 1.0 and rec["peak_capped"] is True
    rec = report.record(rows[1])
    assert rec["peak_fraction"] == pytest.approx(0.2) and rec["peak_capped"] is False


def test_machine_block_names_each_peak(monkeypatch):
    _features(monkeypatch, NO_REDUCED_HARDWARE)
    monkeypatch.setattr(measure, "FMA_SECONDS_PER_CORE", 0.01)
    monkeypatch.setattr(measure, "FMA_SECONDS_ALL_THREADS", 0.02)
    config = quick_config().with_overrides(dtype=["fp32", "bf16"])
    peaks = runner.measure_peaks(config)
    doc = report.machine_description(config, peaks)
    assert doc["peak_gflops"]["bf16"] == doc["peak_gflops"]["fp32"] > 0
    assert doc["peaks"]["dtypes"]["bf16"]["source"] == "fp32 FMA"
    assert doc["peaks"]["fma"]["threads"] == torch.get_num_threads()
    assert doc["peaks"]["summary"] == peaks.summary()
    assert doc["matmul_peak_gflops"] == {}


def test_cli_peak_line_on_a_cpu_without_bf16_hardware(monkeypatch, slow_matmul, capsys):
    _features(monkeypatch, NO_REDUCED_HARDWARE)
    t0 = time.perf_counter()
    code = bench.main([
        "--batch", "1", "--heads", "2", "--seq", "16", "--head-dim", "8", "--dtype", "fp32",
        "bf16", "--mode", "fwd", "--causal", "off", "--reps", "1", "--warmup", "0",
        "--backends", "cpu", "torch-math", "--no-progress", "--no-memory",
    ])  # fmt: skip
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert code == 0, out
    assert slow_matmul == []
    line = next(ln for ln in out.splitlines() if ln.startswith("peak: "))
    assert re.match(
        r"peak: fp32 FMA [\d.]+ GFLOP/s \(probe, \w+, \d+ threads?; [\d.]+ per core"
        r"(: the cores were busy with other work)?\)",
        line,
    )
    assert "bf16: fp32 FMA (no bf16 hardware: computed in fp32)" in line
    assert max(int(p) for p in re.findall(r"(\d+)%", out)) <= 100
    assert elapsed < 30


def test_gpu_peaks_are_bounded_matmuls_labelled_in_tflops(monkeypatch):
    calls = []

    def matmul(dtype, device="cpu", **kwargs):
        calls.append((dtype, str(device), kwargs))
        return {torch.float32: 5e4, torch.bfloat16: 8e5}[dtype]

    monkeypatch.setattr(measure, "matmul_peak_gflops", matmul)
    monkeypatch.setattr(measure, "fma_peak", lambda *a, **k: pytest.fail("no FMA probe on a GPU"))
    peaks = runner.measure_peaks(BenchConfig(dtype=["fp32", "bf16"], device="cuda"))
    # The probe's own sizes (1024^3 growing to 8192^3) and budget (about a second each).
    assert calls == [(torch.float32, "cuda", {}), (torch.bfloat16, "cuda", {})]
    assert peaks.for_row("bf16", "cpu") == peaks["bf16"] == 8e5  # no CPU-kernel override
    assert peaks.summary() == "fp32 matmul 50 TFLOP/s; bf16 matmul 800 TFLOP/s"


@pytest.mark.parametrize(("kernel_isa", "probe_isa"), [("avx2", "avx2"), ("default", "scalar")])
def test_fma_peak_follows_the_kernels_instruction_set(kernel_isa, probe_isa):
    """A kernel held to a narrower build (cpu_kernel_config(isa=...)) is scaled by the FMA peak
    of that build's vectors, not of the widest ones the CPU has."""
    info = measure.fma_info()
    if info is None:
        pytest.skip("this build has no FMA probe")
    if kernel_isa == "avx2" and info.get("isa") not in ("avx2", "avx512"):
        pytest.skip("the CPU has no AVX2")
    peaks = roofline.cpu_peaks(["fp32"], 1, kernel_config={"isa": kernel_isa})
    assert peaks.fma is not None and peaks.fma.isa == probe_isa
    assert f"probe, {probe_isa}," in peaks.summary()
    if kernel_isa == "avx2":
        # 8-lane FMAs: far above one lane at a time, never above the widest vectors (beyond
        # noise). Not necessarily below them: AMD Zen 4 issues a 512-bit FMA as two 256-bit
        # halves, so its AVX2 and AVX-512 peaks are the same.
        scalar = roofline.cpu_peaks(["fp32"], 1, kernel_config={"isa": "default"})
        assert scalar.fma is not None and scalar.fma.isa == "scalar"
        assert peaks.fma.per_core_gflops > 3 * scalar.fma.per_core_gflops
        if info.get("isa") == "avx512":
            widest = roofline.cpu_peaks(["fp32"], 1, kernel_config={"isa": "avx512"})
            assert peaks.fma.per_core_gflops < 1.25 * widest.fma.per_core_gflops
