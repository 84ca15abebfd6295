"""Timing, peak memory and the matmul peak probe.

Clocks: on the CPU, ``time.perf_counter`` around the timed part (the thread count is fixed
with ``torch.set_num_threads`` for the whole run). On CUDA, a pair of CUDA events around it,
with the L2 cache flushed before each timed part (by writing a buffer twice its size, as
``triton.testing.do_bench`` does), so that no call profits from data a previous one left there.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import time
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "Clock",
    "CpuClock",
    "CudaClock",
    "NullClock",
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


def matmul_peak_gflops(
    dtype: torch.dtype, device: torch.device | str = "cpu", n: int = 2048, reps: int = 3
) -> float:
    """This machine's practical peak for ``dtype``: the best of ``reps`` ``n^3`` matmuls, GFLOP/s.

    Run in the same process, with the same thread count, as the attention rows it scales.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    clock = make_clock(device)
    a @ b  # warm-up: kernel selection, JIT, thread pool
    best = math.inf
    for _ in range(reps):
        clock.start()
        a @ b
        clock.stop()
        best = min(best, clock.read())
    return 2.0 * n**3 / best / 1e9


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
