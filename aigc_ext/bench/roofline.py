"""The peak each row's throughput is a fraction of: the ceiling of the path its kernel takes.

On a CPU:

* fp32 rows: the fp32 FMA peak of the threads the run uses (register-only probe,
  :func:`~aigc_ext.bench.measure.fma_peak`).
* bf16 / fp16 rows: a matmul peak of that dtype only where the CPU has hardware for it (AMX or
  AVX512_BF16 for bf16; AMX-FP16 or AVX512_FP16 for fp16), and never below the fp32 FMA peak,
  since any implementation can convert to fp32. bf16 on AVX512_BF16 without AMX takes the
  register-only ``vdpbf16ps`` probe instead of a matmul (every bf16 product there runs on that
  instruction or in fp32): torch's bf16 matmul reaches 80-90% of it, which would make a
  kernel at the instruction's ceiling read above 100%. Without such hardware the dtype is computed in
  fp32 and its rows are scaled by the fp32 FMA peak; no matmul is timed (torch runs a bf16
  matmul at ~0.3 GFLOP/s on such a CPU: a ``2048^3`` probe took minutes and gave a "peak" that
  rows exceeded 150-fold).
* rows of the ``cpu`` backend (this package's kernel) in bf16 / fp16 where that kernel computes
  in fp32 (``_cpu_kernel_config`` reports none of its AMX tile path, ``amx=1 amx_tiles=1`` on
  an AVX-512 build, torch's brgemm for the dtype, ``brgemm=1 brgemm_bf16=1``, or, for bf16, its
  vdpbf16ps micro-kernel, ``vdpbf16ps=1``): the fp32 FMA peak, whatever torch's matmul
  reaches.

On a GPU: a matmul peak per dtype. Every probe is bounded to about a second.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from aigc_ext.bench import emulate, measure

__all__ = [
    "CPU_KERNEL_BACKEND",
    "Peak",
    "Peaks",
    "cpu_features",
    "cpu_peaks",
    "gpu_peaks",
    "kernel_computes_in_fp32",
    "kernel_takes_vdpbf16ps",
    "peak_for",
]

CPU_KERNEL_BACKEND = "cpu"  # the backend that runs csrc/cpu/kernels.cpp

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Hardware for a reduced dtype, widest first: (CPU feature, name shown).
_HARDWARE = {
    "bf16": (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512_BF16")),
    "fp16": (("amx_fp16", "AMX-FP16"), ("avx512_fp16", "AVX512_FP16")),
}
_FP32_FMA = "fp32 FMA"


@dataclass(frozen=True)
class Peak:
    """A ceiling in GFLOP/s, what it is (``source``) and how it was found (``note``)."""

    gflops: float
    source: str  # "fp32 FMA", "bf16 AMX matmul", "fp32 matmul", ...
    note: str = ""

    def label(self, scale: float = 1.0, unit: str = "GFLOP/s") -> str:
        text = f"{self.source} {self.gflops * scale:.4g} {unit}"
        return f"{text} ({self.note})" if self.note else text

    def as_dict(self) -> dict[str, object]:
        return {"gflops": self.gflops, "source": self.source, "note": self.note}


@dataclass
class Peaks(Mapping[str, float]):
    """The peaks of a run: a mapping dtype -> GFLOP/s for most rows, plus the dtypes where the
    ``cpu`` backend's rows have another one (:meth:`for_row`)."""

    dtypes: dict[str, Peak]
    cpu_kernel: dict[str, Peak] = field(default_factory=dict)
    fma: measure.FmaPeak | None = None
    matmul_gflops: dict[str, float] = field(default_factory=dict)  # the matmuls timed
    device: str = "cpu"

    def __getitem__(self, dtype: str) -> float:
        return self.dtypes[dtype].gflops

    def __iter__(self) -> Iterator[str]:
        return iter(self.dtypes)

    def __len__(self) -> int:
        return len(self.dtypes)

    def peak(self, dtype: str, backend: str | None = None) -> Peak | None:
        """The peak a row of ``backend`` in ``dtype`` is scaled by."""
        if backend == CPU_KERNEL_BACKEND and dtype in self.cpu_kernel:
            return self.cpu_kernel[dtype]
        return self.dtypes.get(dtype)

    def for_row(self, dtype: str, backend: str | None = None) -> float | None:
        p = self.peak(dtype, backend)
        return p.gflops if p is not None else None

    def summary(self) -> str:
        """One line naming every peak by what it is, e.g. ``fp32 FMA 452 GFLOP/s (probe,
        avx512, 2 threads; 232 per core); bf16: fp32 FMA (no bf16 hardware)``."""
        gpu = self.device.startswith("cuda")
        scale, unit = (1e-3, "TFLOP/s") if gpu else (1.0, "GFLOP/s")
        parts, fma_shown = [], False
        entries = [(d, p, "") for d, p in self.dtypes.items()]
        entries += [(d, p, f"{CPU_KERNEL_BACKEND} backend ") for d, p in self.cpu_kernel.items()]
        for dtype, p, who in entries:
            if p.source == _FP32_FMA and self.fma is not None and fma_shown:
                why = p.note or ""
                text = f"{_FP32_FMA}" + (f" ({why})" if why else "")
            elif p.source == _FP32_FMA and self.fma is not None:
                text = Peak(p.gflops, _FP32_FMA, _fma_note(self.fma)).label(scale, unit)
                if p.note:
                    text += f"; {p.note}"
                fma_shown = True
            else:
                text = p.label(scale, unit)
            # "fp32 FMA ..." names its dtype already; the others say which rows they serve.
            named = not who and p.source.startswith(f"{dtype} ") and text.startswith(p.source)
            parts.append(text if named else f"{who}{dtype}: {text}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, object]:
        """The JSON form (machine block of the results)."""
        fma = self.fma
        return {
            "summary": self.summary(),
            "dtypes": {d: p.as_dict() for d, p in self.dtypes.items()},
            "cpu_kernel": {d: p.as_dict() for d, p in self.cpu_kernel.items()},
            "fma": None
            if fma is None
            else {
                "per_core_gflops": fma.per_core_gflops,
                "all_threads_gflops": fma.all_threads_gflops,
                "threads": fma.threads,
                "isa": fma.isa,
                "cpus": fma.cpus,
                "shared": fma.shared,
            },
            "matmul_gflops": dict(self.matmul_gflops),
        }


def peak_for(peaks: Mapping[str, float] | None, dtype: str, backend: str) -> float | None:
    """The peak of a row: :meth:`Peaks.for_row`, or ``peaks[dtype]`` for a plain mapping."""
    if peaks is None:
        return None
    if isinstance(peaks, Peaks):
        return peaks.for_row(dtype, backend)
    return peaks.get(dtype)


def _fma_note(fma: measure.FmaPeak) -> str:
    threads = f"{fma.threads} thread{'s' if fma.threads != 1 else ''}"
    note = f"probe, {fma.isa}, {threads}; {fma.per_core_gflops:.4g} per core"
    return note + (": the cores were busy with other work" if fma.shared else "")


def cpu_features() -> dict[str, bool]:
    """The CPU's bf16/fp16 hardware: keys ``amx_bf16``, ``avx512_bf16``, ``amx_fp16``,
    ``avx512_fp16``. From the extension's cpuid reading, else from ``/proc/cpuinfo``; under an
    emulated CPU family (:mod:`aigc_ext.bench.emulate`) without what that family lacks."""
    keys = [feature for options in _HARDWARE.values() for feature, _ in options]
    emulation = emulate.active()
    lacks = set(emulation.lacks) if emulation is not None else set()
    info = measure.fma_info()
    if info is not None:
        return {k: info.get(k) == "1" and k not in lacks for k in keys}
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {k: k in flags and k not in lacks for k in keys}


def _kernel_config() -> dict[str, str] | None:
    try:
        text = torch.ops.aigc_ext._cpu_kernel_config()
    except (AttributeError, RuntimeError):
        return None
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def kernel_computes_in_fp32(dtype: str, config: Mapping[str, str] | None) -> bool:
    """Whether the ``cpu`` backend's GEMMs in ``dtype`` run as fp32 math (converted operands),
    by the fields of ``_cpu_kernel_config``: bf16 is served by the kernel's AMX tile code
    (``amx=1 amx_tiles=1``, AVX-512 build), torch's brgemm (``brgemm=1 brgemm_bf16=1``) or,
    failing both, the kernel's vdpbf16ps micro-kernel (``vdpbf16ps=1``); fp16 by brgemm
    (``brgemm=1 brgemm_fp16=1``); anything else is converted to fp32."""
    if dtype not in _HARDWARE or config is None:
        return False
    on = {k for k, v in config.items() if v == "1"}
    if dtype == "bf16" and {"amx", "amx_tiles"} <= on and config.get("isa") == "avx512":
        return False
    if {"brgemm", f"brgemm_{dtype}"} <= on:
        return False
    # bf16 that brgemm does not take: the AVX-512 build's vdpbf16ps micro-kernel, where the CPU
    # has AVX512_BF16 and it is switched on.
    return not (dtype == "bf16" and "vdpbf16ps" in on)


def kernel_takes_vdpbf16ps(config: Mapping[str, str] | None) -> bool:
    """Whether the ``cpu`` backend's bf16 GEMMs run on its vdpbf16ps micro-kernel (neither AMX
    tiles nor brgemm take them, and ``vdpbf16ps=1``)."""
    if config is None or config.get("vdpbf16ps") != "1":
        return False
    return kernel_computes_in_fp32("bf16", {**config, "vdpbf16ps": "0"})


# The FMA probe's loop for each instruction set the CPU kernel is built for.
_KERNEL_FMA_ISA = {"avx512": "avx512", "avx2": "avx2", "default": "scalar"}


def cpu_peaks(
    dtypes: list[str],
    threads: int | None = None,
    *,
    features: Mapping[str, bool] | None = None,
    kernel_config: Mapping[str, str] | None = None,
) -> Peaks:
    """The peaks of a CPU run over ``dtypes`` with ``threads`` threads (default: torch's count).

    ``features`` (:func:`cpu_features`) and ``kernel_config`` (fields of
    ``_cpu_kernel_config``) default to this machine's. Takes about 0.4 s for the FMA probe plus
    at most ~1 s per reduced dtype that has hardware.
    """
    features = cpu_features() if features is None else features
    kernel_config = _kernel_config() if kernel_config is None else kernel_config
    # The FMAs of the kernel's own build: a kernel held to AVX2 (cpu_kernel_config(isa=...)) on
    # an AVX-512 CPU is measured against the AVX2 peak.
    isa = _KERNEL_FMA_ISA.get((kernel_config or {}).get("isa", ""), "auto")
    fma = measure.fma_peak(threads, isa=isa)
    matmuls: dict[str, float] = {}
    if fma is not None:
        fp32 = Peak(fma.all_threads_gflops, _FP32_FMA)
    else:
        matmuls["fp32"] = measure.matmul_peak_gflops(torch.float32)
        fp32 = Peak(matmuls["fp32"], "fp32 matmul", "this build has no FMA probe")
    out: dict[str, Peak] = {}
    kernel: dict[str, Peak] = {}
    for dtype in dtypes:
        if dtype not in _HARDWARE:
            out[dtype] = fp32
            continue
        hardware = next((name for f, name in _HARDWARE[dtype] if features.get(f)), None)
        dpbf16 = _dpbf16_peak(threads) if hardware == "AVX512_BF16" and dtype == "bf16" else None
        if hardware is None:
            out[dtype] = _as_fp32(fp32, f"no {dtype} hardware: computed in fp32")
        elif dpbf16 is not None:
            out[dtype] = dpbf16 if dpbf16.gflops > fp32.gflops else fp32
        else:
            matmuls[dtype] = measure.matmul_peak_gflops(_TORCH_DTYPES[dtype])
            if matmuls[dtype] > fp32.gflops:
                out[dtype] = Peak(matmuls[dtype], f"{dtype} {hardware} matmul")
            else:
                note = f"above the {dtype} {hardware} matmul's {matmuls[dtype]:.3g} GFLOP/s"
                out[dtype] = _as_fp32(fp32, note)
        fp32_path = kernel_computes_in_fp32(dtype, kernel_config)
        if fp32_path and out[dtype].gflops != fp32.gflops:
            kernel[dtype] = _as_fp32(fp32, f"the kernel computes {dtype} in fp32 here")
        elif hardware == "AMX" and dtype == "bf16" and kernel_takes_vdpbf16ps(kernel_config):
            # AMX switched off for the kernel (cpu_kernel_config(use_amx=False)), vdpbf16ps on.
            dp = _dpbf16_peak(threads)
            if dp is not None:
                kernel[dtype] = dp if dp.gflops > fp32.gflops else fp32
    return Peaks(out, kernel, fma, matmuls, "cpu")


def _dpbf16_peak(threads: int | None) -> Peak | None:
    """The vdpbf16ps probe's peak for ``threads`` threads; None in a build without that probe
    (or where the CPU refuses it)."""
    try:
        dp = measure.fma_peak(threads, isa="avx512_bf16")
    except RuntimeError:  # an extension built before the probe had the loop
        return None
    if dp is None:
        return None
    note = f"probe, {dp.threads} threads; {dp.per_core_gflops:.4g} per core"
    return Peak(dp.all_threads_gflops, "bf16 vdpbf16ps", note)


def _as_fp32(fp32: Peak, why: str) -> Peak:
    note = f"{fp32.note}; {why}" if fp32.note else why
    return Peak(fp32.gflops, fp32.source, note)


def gpu_peaks(dtypes: list[str], device: torch.device | str) -> Peaks:
    """A bounded matmul peak per dtype on a GPU (``1024^3`` growing to ``8192^3``)."""
    matmuls = {d: measure.matmul_peak_gflops(_TORCH_DTYPES[d], device) for d in dtypes}
    peaks = {d: Peak(g, f"{d} matmul") for d, g in matmuls.items()}
    return Peaks(peaks, {}, None, matmuls, str(device))
