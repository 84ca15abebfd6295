"""Runs a sweep: one :class:`Row` per (case, implementation).

For each case, every implementation that can serve it

1. runs ``warmup`` untimed rounds (the first call compiles, for those that compile; its time
   is recorded as ``compile_s`` and never timed);
2. runs one checked call: its result (output, and gradients in the backward modes) is compared
   with the float64 reference under the error rule (:mod:`aigc_ext.bench.correctness`), and its
   peak memory is measured (with ``warmup`` 0 this is the first call, so one-time allocations
   count too);
3. runs ``reps`` timed rounds; within each round the implementations run one after the other,
   so that machine noise falls on all of them alike; an implementation whose timed runs add up
   to ``max_time_s`` stops there (slow reference implementations then get fewer runs than
   ``reps``, always at least one).

A row reports the median time and the 20th-80th percentile range, throughput, the fraction of
the peak of the path its kernel takes (:mod:`aigc_ext.bench.roofline`), peak memory, the
speedup over torch's fastest SDPA backend on the same case and the largest error.

Statuses: ``ok``; ``fail`` (the error rule does not hold); ``skipped`` (with the reason);
``oom`` (out of memory, the sweep goes on); ``error`` (an aigc_ext backend raised on a case it
claimed to support). Other implementations tell what they support only by trying, so an
exception of theirs that is not out-of-memory is reported as ``skipped`` with its message.
"""

from __future__ import annotations

import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

import aigc_ext
from aigc_ext.bench import impls as impls_mod
from aigc_ext.bench.config import BenchConfig, Case, UsageError
from aigc_ext.bench.correctness import (
    ErrorCheck,
    ErrorRule,
    reference64,
    run_with_grads,
    torch_baseline,
)
from aigc_ext.bench.impls import Impl, Skip
from aigc_ext.bench.measure import (
    Clock,
    make_clock,
    peak_memory_mib,
    percentile,
)
from aigc_ext.bench.problem import Problem, make_problem
from aigc_ext.bench.roofline import Peaks, cpu_peaks, gpu_peaks, peak_for
from aigc_ext.dispatch import BackendError

__all__ = [
    "FAILING_STATUSES",
    "STATUSES",
    "Row",
    "exit_code",
    "measure_peaks",
    "prepare",
    "run",
]

STATUSES = ("ok", "fail", "skipped", "oom", "error")
FAILING_STATUSES = ("fail", "error")


@dataclass
class Row:
    """The result of one implementation on one case."""

    case: Case
    backend: str
    kind: str
    device: str
    status: str = "ok"
    reason: str | None = None
    times_s: list[float] = field(default_factory=list)
    peak_gflops: float | None = None  # the ceiling of the row's path (aigc_ext.bench.roofline)
    mem_mib: float | None = None
    speedup: float | None = None  # time of torch's fastest SDPA backend / this time
    torch_best: str | None = None  # which torch SDPA backend that was
    check: ErrorCheck | None = None
    compile_s: float | None = None

    @property
    def key(self) -> str:
        return f"{self.case.key}|{self.backend}"

    @property
    def timed(self) -> bool:
        return bool(self.times_s)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def p20_s(self) -> float | None:
        return percentile(self.times_s, 20) if self.times_s else None

    @property
    def p80_s(self) -> float | None:
        return percentile(self.times_s, 80) if self.times_s else None

    @property
    def gflops(self) -> float | None:
        t = self.median_s
        return self.case.flop / t / 1e9 if t else None

    @property
    def peak_fraction(self) -> float | None:
        g = self.gflops
        return g / self.peak_gflops if g is not None and self.peak_gflops else None

    @property
    def max_err(self) -> float | None:
        return self.check.max_err if self.check is not None else None

    @property
    def correct(self) -> bool | None:
        return self.check.ok if self.check is not None else None

    def skip(self, reason: str) -> Row:
        self.status, self.reason = "skipped", reason
        return self


def exit_code(rows: list[Row]) -> int:
    """0 when every row that ran is correct, 1 when one fails the error rule or errors."""
    return 1 if any(r.status in FAILING_STATUSES for r in rows) else 0


# ----------------------------------------------------------------------------- setup


def prepare(config: BenchConfig) -> list[Impl]:
    """Validates ``config``, fixes the thread count and returns the implementations to run.

    Raises :class:`UsageError` for a bad sweep, an unknown backend name (the message lists the
    known ones), an ``AIGC_EXT_BACKEND`` that names no registered backend, a device that is not
    here, or a row whose inputs alone need more memory than the device has, before anything
    runs.
    """
    config.validate()
    _check_backend_override()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device: {config.device!r} requested but CUDA is not available here")
    _check_input_memory(config, device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    impls = impls_mod.available_impls(config.device, config.flex_compile_budget_s)
    if config.backends is None:
        return impls
    by_name = {i.name: i for i in impls}
    unknown = [b for b in config.backends if b not in by_name]
    if unknown:
        raise UsageError(
            f"backends: unknown name{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; known: {', '.join(by_name)}"
        )
    wanted = set(config.backends)
    return [i for i in impls if i.name in wanted]


def _check_backend_override() -> None:
    """``AIGC_EXT_BACKEND``, when set, names a registered backend (checked before anything runs
    rather than at the first attention call)."""
    name = os.environ.get("AIGC_EXT_BACKEND") or None  # empty: not set, as the dispatcher reads it
    if name is None:
        return
    known = sorted(b.name for b in aigc_ext.backends())
    if name not in known:
        raise UsageError(
            f"environment variable AIGC_EXT_BACKEND={name!r}: unknown attention backend; "
            f"registered: {', '.join(known)}"
        )


def _memory_bytes(device: torch.device) -> int | None:
    """The memory the inputs are allocated from: the GPU's, else this machine's RAM (or the
    container's limit, when lower). None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _check_input_memory(config: BenchConfig, device: torch.device) -> None:
    """Every row's inputs fit in the device's memory; a row whose inputs alone do not would
    fail to allocate (or, on a CPU with overcommit, get the process killed)."""
    available = _memory_bytes(device)
    if available is None:
        return
    for case in config.cases():
        need = case.input_bytes
        if need > available:
            where = "shapes (--shape)" if config.shapes else "shape"
            raise UsageError(
                f"{where}: the inputs of {case.key} need {_gib(need)}, more than the "
                f"{_gib(available)} of memory of {device.type} here"
            )


def measure_peaks(config: BenchConfig) -> Peaks:
    """The peaks the sweep's rows are scaled by, in this process and thread count: on a CPU the
    fp32 FMA probe, plus a bf16/fp16 matmul only where the CPU has hardware for that dtype; on
    a GPU a matmul per dtype (see :mod:`aigc_ext.bench.roofline`). Each probe takes about a
    second at most, on any machine."""
    if torch.device(config.device).type == "cuda":
        return gpu_peaks(config.dtype, config.device)
    return cpu_peaks(config.dtype, torch.get_num_threads())


# ----------------------------------------------------------------------------- one case


# What torch's allocators say when an allocation fails: CUDA's "out of memory", the CPU
# allocator's "can't allocate memory: you tried to allocate N bytes".
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _OOM_MESSAGES)


_TRIGGERED = re.compile(r"\s*\(Triggered internally at [^)]*\)\.?")


def _describe(exc: BaseException, caught: list[warnings.WarningMessage] | None = None) -> str:
    """One line: the exception, plus the reasons torch gives in warnings just before it
    ("No available kernel" comes after a warning per refused kernel saying why)."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()
    reasons = []
    for w in caught or ():
        msg = " ".join(_TRIGGERED.sub("", str(w.message)).split())
        if msg and not msg.endswith(":") and msg not in reasons:
            reasons.append(msg)
    if reasons:
        text += " (" + "; ".join(reasons[:3]) + ")"
    return text[:400]


def _record_exception(row: Row, impl: Impl, exc: BaseException, caught: list | None = None) -> None:
    """Sets the status a failed call earns (see the module docstring)."""
    if _is_oom(exc):
        row.status, row.reason = "oom", _describe(exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    elif isinstance(exc, Skip | BackendError) or impl.kind != "aigc_ext":
        row.skip(_describe(exc, caught) if not isinstance(exc, Skip) else str(exc))
    else:
        row.status, row.reason = "error", _describe(exc)
    row.times_s.clear()


def _make_step(attn: Callable, p: Problem) -> Callable[[Clock], None]:
    """One timed unit of the case's mode; the clock brackets the part that is measured."""
    mode = p.case.mode
    if mode in ("fwd", "decode"):

        def step(clock: Clock) -> None:
            with torch.no_grad():
                clock.start()
                attn(p.query, p.key, p.value)
                clock.stop()

        return step
    leaves = [t.detach().requires_grad_(True) for t in (p.query, p.key, p.value)]

    def step(clock: Clock) -> None:
        if mode == "bwd":  # the forward is not timed
            out = attn(*leaves)
            clock.start()
        else:
            clock.start()
            out = attn(*leaves)
        torch.autograd.grad(out, leaves, p.grad_out)
        clock.stop()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    case: Case,
    impls: list[Impl],
    config: BenchConfig,
    peaks: Mapping[str, float] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """All rows of one case (see the module docstring for the procedure)."""
    device = torch.device(config.device)
    report = on_progress or (lambda _text: None)
    rows = {
        i.name: Row(
            case, i.name, i.kind, str(device), peak_gflops=peak_for(peaks, case.dtype, i.name)
        )
        for i in impls
    }
    try:
        p = make_problem(case, device, config.seed)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        for row in rows.values():
            row.status, row.reason = "oom", f"inputs: {_describe(exc)}"
        return list(rows.values())

    # Which implementations can serve the case.
    steps: dict[str, tuple[Impl, Callable, Callable[[Clock], None]]] = {}
    for impl in impls:
        row = rows[impl.name]
        if impl.unavailable is not None:
            row.skip(impl.unavailable)
            continue
        try:
            attn = impl.build(p)
        except Exception as exc:
            _record_exception(row, impl, exc)
            continue
        steps[impl.name] = (impl, attn, _make_step(attn, p))

    clock = make_clock(device)
    first = set(steps)  # implementations not called yet

    def call(name: str, fn: Callable[[], object]) -> tuple[bool, object]:
        """Runs one call of ``name``; on an exception records the row's status, drops the
        implementation from the case and returns (False, None)."""
        impl = steps[name][0]
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=name in first) as caught:
            if name in first:  # torch explains refusals in warnings: keep them for the reason
                warnings.simplefilter("always")
            try:
                result = fn()
                _sync(device)
            except Exception as exc:
                _record_exception(rows[name], impl, exc, caught)
                del steps[name]
                return False, None
        if name in first and impl.compile_budget is not None:
            rows[name].compile_s = time.perf_counter() - t0
            impl.compile_budget.spent += rows[name].compile_s
        first.discard(name)
        return True, result

    # Warm-up rounds (the first call compiles, for implementations that do).
    for rnd in range(config.warmup):
        report(f"warm-up {rnd + 1}/{config.warmup}")
        for name, (_, _, step) in list(steps.items()):
            call(name, lambda step=step: step(clock))

    # The checked call: output (and gradients) against the float64 reference, peak memory.
    rule, unchecked = None, None
    if steps:
        report("float64 reference")
        try:
            rule = ErrorRule(reference64(p), torch_baseline(p))
        except Exception as exc:  # no yardstick: the rows stay unchecked (correct: null)
            unchecked = f"not checked: reference or torch baseline failed: {_describe(exc)}"
    for name, (_, attn, _) in list(steps.items()):
        report(f"{name}: error check")
        results: list = []

        def checked(attn=attn, results=results) -> None:
            results.extend(run_with_grads(attn, p, p.query, p.key, p.value))

        if config.memory:
            ok, mem = call(name, lambda checked=checked: peak_memory_mib(checked, device))
            rows[name].mem_mib = mem
        else:
            ok, _ = call(name, checked)
        if ok and rule is not None:
            rows[name].check = rule.check(results)
        del results

    # Timed rounds: implementations alternate within every round, so that machine noise falls
    # on all alike; one stops once its timed runs add up to max_time_s (it always gets one).
    spent = dict.fromkeys(steps, 0.0)
    for rnd in range(config.reps):
        report(f"round {rnd + 1}/{config.reps}")
        for name, (_, _, step) in list(steps.items()):
            if config.max_time_s is not None and spent[name] >= config.max_time_s:
                continue
            ok, _ = call(name, lambda step=step: step(clock))
            if ok:
                elapsed = clock.read()
                rows[name].times_s.append(elapsed)
                spent[name] += elapsed

    # Speedup over torch's fastest SDPA backend on this case.
    torch_times = {
        r.backend: r.median_s for r in rows.values() if r.kind == "torch-sdpa" and r.timed
    }
    if torch_times:
        best = min(torch_times, key=torch_times.__getitem__)
        for r in rows.values():
            if r.timed:
                r.speedup, r.torch_best = torch_times[best] / r.median_s, best
    for r in rows.values():
        if r.status == "ok" and r.check is not None and not r.check.ok:
            r.status, r.reason = "fail", r.check.describe_failure()
        elif r.status == "ok" and r.check is None:
            r.reason = unchecked
    return list(rows.values())


def run(
    config: BenchConfig,
    *,
    peaks: Mapping[str, float] | None = None,
    on_row: Callable[[Row], None] | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> list[Row]:
    """Runs the sweep of ``config`` and returns its rows, one per (case, implementation).

    ``peaks`` (GFLOP/s per dtype name, or :class:`~aigc_ext.bench.roofline.Peaks`) defaults to
    :func:`measure_peaks`; ``on_row`` is called with each row as soon as its case is done (to
    save results as they come); ``on_progress(done, total, text)`` reports progress over the
    cases.
    """
    impls = prepare(config)
    if peaks is None:
        peaks = measure_peaks(config)
    cases = config.cases()
    rows: list[Row] = []
    for i, case in enumerate(cases):

        def progress(text: str, i: int = i, case: Case = case) -> None:
            if on_progress is not None:
                on_progress(i, len(cases), f"{case.key}: {text}")

        for row in run_case(case, impls, config, peaks, progress):
            rows.append(row)
            if on_row is not None:
                on_row(row)
        if on_progress is not None:
            on_progress(i + 1, len(cases), case.key)
    return rows
