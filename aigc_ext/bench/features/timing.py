"""Alternating timings and the statistics the feature tables print.

A shared machine drifts: other work starts and stops, clocks change. Timing contender A for a
while and then contender B would fold that drift into their ratio. Here every run times each
contender once, one after another (the order rotates from run to run, so none always goes
first), and a ratio is taken per run, between times measured seconds apart; the tables report
the median of those per-run ratios and their range.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["MIN_REPS", "Stats", "Timing", "alternate", "paired_ratio"]

# The fewest timed runs a comparison gets when a time limit stops it early (fewer only when
# fewer are asked for).
MIN_REPS = 3


@dataclass(frozen=True)
class Stats:
    """Median, minimum and maximum of a list of measurements (seconds or ratios)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("Stats.of: values is empty")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> Stats:
        """The same statistics multiplied by ``factor`` (> 0), e.g. seconds to milliseconds."""
        return Stats(self.median * factor, self.min * factor, self.max * factor, self.n)

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}


def alternate(
    contenders: Mapping[str, Callable[[], object]],
    reps: int,
    warmup: int = 0,
    max_time_s: float | None = None,
) -> dict[str, list[float]]:
    """Times every contender once per run, ``reps`` runs, after ``warmup`` untimed rounds.

    Returns the seconds of each run per contender name, in run order, so that entry ``i`` of
    two contenders was measured in the same run. Run ``r`` starts with contender
    ``r % len(contenders)``. With ``max_time_s``, runs stop once the timed runs add up to
    that many seconds, after at least ``min(reps, MIN_REPS)`` runs. The garbage collector is
    paused while timing (tensors are freed by reference counting; a collection would land in
    one contender's time).
    """
    if reps < 1:
        raise ValueError(f"alternate: reps must be >= 1, got {reps}")
    if warmup < 0:
        raise ValueError(f"alternate: warmup must be >= 0, got {warmup}")
    if max_time_s is not None and not max_time_s > 0:
        raise ValueError(f"alternate: max_time_s must be > 0, got {max_time_s!r}")
    names = list(contenders)
    if not names:
        raise ValueError("alternate: no contenders")
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        spent = 0.0
        for r in range(reps):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn = contenders[name]
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                spent += times[name][-1]
            if max_time_s is not None and spent >= max_time_s and r + 1 >= min(reps, MIN_REPS):
                break
    finally:
        if was_enabled:
            gc.enable()
    return times


@dataclass(frozen=True)
class Timing:
    """How each comparison is timed: at most ``reps`` runs (fewer once they add up to
    ``max_time_s``), after ``warmup`` untimed rounds."""

    reps: int = 5
    warmup: int = 1
    max_time_s: float | None = None

    def run(
        self, contenders: Mapping[str, Callable[[], object]], checked: bool = False
    ) -> dict[str, list[float]]:
        """:func:`alternate` with these settings; ``checked``: every contender was just called
        once (for the output check), which counts as the first warm-up round."""
        warmup = max(self.warmup - 1, 0) if checked else self.warmup
        return alternate(contenders, self.reps, warmup, self.max_time_s)


def paired_ratio(
    numerator: Sequence[float],
    denominator: Sequence[float],
    numerator_scale: float = 1.0,
    denominator_scale: float = 1.0,
) -> Stats:
    """Statistics of ``(numerator[i] * numerator_scale) / (denominator[i] * denominator_scale)``
    over the runs ``i`` (the two lists come from the same :func:`alternate` call)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(
            f"paired_ratio: expected two equally long, non-empty lists, got "
            f"{len(numerator)} and {len(denominator)} values"
        )
    ratios = [
        (n * numerator_scale) / max(d * denominator_scale, 1e-12)
        for n, d in zip(numerator, denominator, strict=True)
    ]
    return Stats.of(ratios)
