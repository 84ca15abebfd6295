"""The feature benchmarks' loop: plan the jobs (feature x dtype), run them, collect rows."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aigc_ext.bench.features import paged_decode, softcap, varlen, window
from aigc_ext.bench.features.config import DTYPES, FeatureConfig, Sizes
from aigc_ext.bench.features.rows import FeatureRow, error_row
from aigc_ext.bench.features.timing import Timing

__all__ = ["BF16_WARNING", "Job", "exit_code", "plan", "run_features"]

BF16_WARNING = (
    "bf16: this CPU has no bf16 matmul instructions (AVX512_BF16 or AMX-BF16), where torch "
    "computes bf16 matmuls at about 0.3 GFLOP/s; bf16 rows run at the reduced (--quick) sizes"
)


@dataclass(frozen=True)
class Job:
    """One feature in one dtype, at ``sizes`` (``reduced``: the bf16 fallback sizes)."""

    feature: str
    dtype: str
    modes: tuple[str, ...]
    sizes: Sizes
    reduced: bool

    def problem(self, seed: int) -> str:
        """The table title: the feature's problem, marked when reduced."""
        text = {
            "varlen": lambda: varlen.describe(self.sizes.varlen, seed),
            "window": lambda: window.describe(self.sizes.window),
            "softcap": lambda: softcap.describe(self.sizes.softcap),
            "paged-decode": lambda: paged_decode.describe(self.sizes.paged),
        }[self.feature]()
        return text + (" (reduced: no bf16 matmul hardware)" if self.reduced else "")


def _bf16_hardware() -> bool:
    from aigc_ext.training.distributed import cpu_has_bf16_matmul

    return cpu_has_bf16_matmul()


def plan(config: FeatureConfig, bf16_hardware: bool | None = None) -> list[Job]:
    """The jobs of ``config`` in run order (feature by feature, fp32 before bf16).

    ``bf16_hardware`` None: asks the CPU (:func:`aigc_ext.training.distributed.
    cpu_has_bf16_matmul`); without it, bf16 jobs take ``config.bf16_fallback`` sizes.
    """
    config.validate()
    if bf16_hardware is None:
        bf16_hardware = _bf16_hardware() if "bf16" in config.dtypes else True
    jobs = []
    for feature in config.features:
        modes = config.modes_of(feature)
        if not modes:
            continue
        for dtype in config.dtypes:
            reduced = dtype == "bf16" and not bf16_hardware
            sizes = config.bf16_fallback if reduced else config.sizes
            jobs.append(Job(feature, dtype, modes, sizes, reduced))
    return jobs


def _measure(job: Job, config: FeatureConfig) -> list[FeatureRow]:
    dtype = DTYPES[job.dtype]
    args = (dtype, job.dtype)
    timing = (Timing(config.reps, config.warmup, config.max_time_s), config.seed)
    problem = job.problem(config.seed)
    if job.feature == "varlen":
        return varlen.measure_varlen(job.sizes.varlen, *args, job.modes, *timing, problem)
    if job.feature == "window":
        return window.measure_window(job.sizes.window, *args, *timing, problem)
    if job.feature == "softcap":
        return softcap.measure_softcap(job.sizes.softcap, *args, *timing, problem)
    return paged_decode.measure_paged_decode(job.sizes.paged, *args, *timing, problem)


def run_features(
    config: FeatureConfig,
    on_row: Callable[[FeatureRow], None] | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    bf16_hardware: bool | None = None,
) -> list[FeatureRow]:
    """Runs every job of ``config`` and returns the rows, in order.

    ``on_row`` gets each row as it is measured, ``on_progress(done, total, text)`` is called
    before each job, ``on_warning`` (default :func:`warnings.warn`) gets
    :data:`BF16_WARNING` when bf16 rows are reduced. A job whose operator raises (a
    ``RuntimeError``, out of memory) gives one ``error`` row and the run goes on.
    ``config.threads`` sets torch's thread count for the run (restored afterwards).
    """
    jobs = plan(config, bf16_hardware)
    if any(job.reduced for job in jobs):
        (on_warning or (lambda text: warnings.warn(text, RuntimeWarning, stacklevel=3)))(
            BF16_WARNING
        )
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    rows: list[FeatureRow] = []
    try:
        for i, job in enumerate(jobs):
            if on_progress is not None:
                on_progress(i, len(jobs), f"{job.feature} {job.dtype}")
            try:
                new = _measure(job, config)
            except (RuntimeError, MemoryError) as exc:
                new = [error_row(job.feature, job.problem(config.seed), job.dtype, "-", exc)]
            for row in new:
                rows.append(row)
                if on_row is not None:
                    on_row(row)
        if on_progress is not None:
            on_progress(len(jobs), len(jobs), "done")
    finally:
        torch.set_num_threads(threads_before)
    return rows


def exit_code(rows: list[FeatureRow]) -> int:
    """1 when a row failed its output check or raised, else 0 (a missed target is reported,
    not an error: timings on a shared machine move)."""
    return 1 if any(r.status != "ok" for r in rows) else 0
