"""Timing, peak memory and the peak probes (fp32 FMA, matmul) a roofline needs.

Clocks: on the CPU, ``time.perf_counter`` around the timed part (the thread count is fixed
with ``torch.set_num_threads`` for the whole run). On CUDA, a pair of CUDA events around it,
with the L2 cache flushed before each timed part (by writing a buffer twice its size, as
``triton.testing.do_bench`` does), so that no call profits from data a previous one left there.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Clock",
    "CpuClock",
    "CudaClock",
    "FmaPeak",
    "NullClock",
    "fma_info",
    "fma_peak",
    "make_clock",
    "matmul_peak_gflops",
    "peak_memory_mib",
    "percentile",
    "reset_peak_rss",
    "status_kib",
]


class Clock:
    """Measures the part of a step between :meth:`start` and :meth:`stop` (seconds)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def read(self) -> float:
        """Seconds between the last start and stop (waits for the device where needed)."""
        raise NotImplementedError


class NullClock(Clock):
    """Measures nothing (for calls that are not timed)."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def read(self) -> float:
        return 0.0


class CpuClock(Clock):
    def __init__(self) -> None:
        self._t0 = self._t1 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._t1 = time.perf_counter()

    def read(self) -> float:
        return self._t1 - self._t0


class CudaClock(Clock):
    """CUDA events around the timed part; the L2 cache is flushed before each start."""

    def __init__(self, device: torch.device) -> None:
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
        self._flush = torch.empty(2 * l2, dtype=torch.int8, device=device)
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self._flush.zero_()  # evicts the previous call's data from L2 (not timed)
        self._start.record()

    def stop(self) -> None:
        self._end.record()

    def read(self) -> float:
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3  # ms -> s


def make_clock(device: torch.device | str) -> Clock:
    device = torch.device(device)
    return CudaClock(device) if device.type == "cuda" else CpuClock()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile: values is empty")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- peak probes

# Seconds each probe may take. The FMA probe: per core, then all threads together.
FMA_SECONDS_PER_CORE = 0.15
FMA_SECONDS_ALL_THREADS = 0.5
MATMUL_BUDGET_S = 1.0
# Square matmul sizes the matmul probe starts from and stops at, per device type.
_MATMUL_FIRST = {"cuda": 1024}
_MATMUL_LAST = {"cuda": 8192}


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The call the matmul probe times (tests replace it to play slow hardware)."""
    return a @ b


def _timed_matmul(clock: Clock, a: torch.Tensor, b: torch.Tensor) -> float:
    clock.start()
    _matmul(a, b)
    clock.stop()
    return clock.read()


def matmul_peak_gflops(
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    n: int | None = None,
    reps: int = 3,
    budget_s: float = MATMUL_BUDGET_S,
) -> float:
    """A practical matmul peak for ``dtype``: the best GFLOP/s of square matmuls, bounded in time.

    Starts at ``64^3`` (``1024^3`` on a GPU) and doubles the size up to ``n`` (default 2048 on a
    CPU, 8192 on a GPU) only while the next size's warm-up and one timed call are projected to
    fit in what is left of ``budget_s``; each size gets a warm-up and up to ``reps`` timed calls
    while time is left. Hardware that runs ``dtype`` slowly (torch runs a bf16 matmul at
    ~0.3 GFLOP/s on a CPU without bf16 units, where ``2048^3`` takes minutes) therefore costs
    about ``budget_s``; the first size is always timed once. Run it in the same process, with
    the same thread count, as the rows it scales.
    """
    if not (isinstance(budget_s, int | float) and math.isfinite(budget_s) and budget_s > 0):
        raise ValueError(
            f"matmul_peak_gflops: budget_s must be a finite number > 0, got {budget_s!r}"
        )
    if reps < 1:
        raise ValueError(f"matmul_peak_gflops: reps must be >= 1, got {reps}")
    device = torch.device(device)
    last = _MATMUL_LAST.get(device.type, 2048) if n is None else n
    if last < 1:
        raise ValueError(f"matmul_peak_gflops: n must be >= 1, got {n}")
    size = min(_MATMUL_FIRST.get(device.type, 64), last)
    deadline = time.perf_counter() + budget_s
    gen = torch.Generator().manual_seed(0)
    clock = make_clock(device)
    best = 0.0
    while True:
        a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
        fastest = _timed_matmul(clock, a, b)  # warm-up: kernel selection, JIT, thread pool
        for i in range(reps):
            if i > 0 and time.perf_counter() + fastest > deadline:
                break
            t = _timed_matmul(clock, a, b)
            fastest = min(fastest, t)
            best = max(best, 2.0 * size**3 / max(t, 1e-9) / 1e9)
        # The next size costs ~8x per call: its warm-up and one timed call must fit.
        if 2 * size > last or time.perf_counter() + 16 * fastest > deadline:
            return best
        size *= 2


@dataclass(frozen=True)
class FmaPeak:
    """The fp32 FMA probe's figures (GFLOP/s)."""

    per_core_gflops: float
    all_threads_gflops: float  # the threads running together; never below one core's rate
    threads: int
    isa: str  # the loop it ran: avx512, avx2 or scalar
    cpus: int = 1  # the CPUs this process may run on

    @property
    def shared(self) -> bool:
        """Whether the threads together got well under one core's rate per thread (on the
        CPUs there are): other work shared the cores while the probe ran."""
        cores = min(self.threads, self.cpus)
        return cores > 1 and self.all_threads_gflops < 0.75 * cores * self.per_core_gflops


def _fma_ops() -> tuple[Callable, Callable] | None:
    """The extension's probe operators; None in a build without them."""
    try:
        return torch.ops.aigc_ext._fma_peak_gflops, torch.ops.aigc_ext._fma_peak_info
    except (AttributeError, RuntimeError):
        return None


def fma_info() -> dict[str, str] | None:
    """What the FMA probe runs and what the CPU has, e.g. ``{"isa": "avx512", "lanes": "16",
    "avx512_bf16": "1", "amx_bf16": "0", ...}``; None in a build without the probe."""
    ops = _fma_ops()
    if ops is None:
        return None
    return dict(part.split("=", 1) for part in ops[1]().split() if "=" in part)


def fma_peak(
    threads: int | None = None,
    per_core_s: float | None = None,
    all_threads_s: float | None = None,
    isa: str = "auto",
) -> FmaPeak | None:
    """This machine's fp32 FMA peak, per core and for ``threads`` threads together (default:
    torch's thread count), from register-only FMAs in the widest vector width the CPU has
    (csrc/cpu/fma_peak.h), or in ``isa`` (``scalar``, ``avx2``, ``avx512``). About ``per_core_s + all_threads_s`` seconds (default
    :data:`FMA_SECONDS_PER_CORE` and :data:`FMA_SECONDS_ALL_THREADS`). None in a build of the
    extension without the probe.

    On a machine shared with other work, the all-thread figure is what the threads get
    together at the time (the best ~0.5 ms round), so it may fall short of threads x per core.
    """
    ops = _fma_ops()
    if ops is None:
        return None
    per_core_s = FMA_SECONDS_PER_CORE if per_core_s is None else per_core_s
    all_threads_s = FMA_SECONDS_ALL_THREADS if all_threads_s is None else all_threads_s
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"fma_peak: threads must be >= 1, got {threads}")
    per_core = float(ops[0](per_core_s, 1, isa))
    together = float(ops[0](all_threads_s, threads, isa)) if threads > 1 else per_core
    if isa == "auto":
        isa = (fma_info() or {}).get("isa", "?")
    return FmaPeak(per_core, max(per_core, together), threads, isa, _usable_cpus())


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- memory


def status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status, in KiB (Linux)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                values[name] = int(rest.split()[0])
    return values


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        s = status_kib("VmHWM", "VmRSS")
    except (OSError, ValueError):
        return False
    return s.get("VmHWM", -1) - s.get("VmRSS", 0) < 1024


def _trim_heap() -> None:
    """Returns freed heap memory to the system, so that reusing it shows up as new RSS.

    (No ``gc.collect()``: tensors are freed by reference counting, and a collection costs
    about 0.2 s with torch loaded.)
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_mib(step: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak memory one call of ``step`` needs beyond what was in use before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` growth. CPU: growth of the peak resident set
    (VmHWM, reset through ``/proc/self/clear_refs``) after returning free heap to the system;
    ``None`` where the kernel does not allow that (non-Linux).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return (peak - base) / 2**20
    _trim_heap()
    if not reset_peak_rss():
        return None
    base = status_kib("VmRSS")["VmRSS"]
    result = step()
    peak = status_kib("VmHWM")["VmHWM"]
    del result
    return max(0, peak - base) / 1024
