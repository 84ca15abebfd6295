"""One row of a feature table: two contenders, their times, the ratio and its target."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from aigc_ext.bench.features.timing import Stats

__all__ = ["FeatureRow", "Target", "check_status", "error_row", "timed_row"]

_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Target:
    """A bound on a ratio: ``ratio >= value`` or ``ratio <= value``."""

    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"Target: op must be '>=' or '<=', got {self.op!r}")
        if not (math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"Target: value must be a finite number > 0, got {self.value!r}")

    def holds(self, ratio: float) -> bool:
        return bool(_OPS[self.op](ratio, self.value))

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}x"


@dataclass(frozen=True)
class FeatureRow:
    """``subject`` measured against ``baseline``.

    ``ratio`` holds the statistics of the per-run ratio named by ``ratio_name`` (e.g.
    ``"torch / ours"``: above 1 when ours is faster); ``holds`` compares its median with the
    ``target``. ``max_diff`` is ``max |subject output - baseline output|`` where the two compute
    the same thing (else None), ``tolerance`` what it may reach before the row fails.
    ``status``: ``ok``, ``fail`` (the outputs differ beyond the tolerance) or ``error`` (a
    contender raised; ``reason`` says what).
    """

    feature: str
    problem: str
    dtype: str
    mode: str
    subject: str
    baseline: str
    subject_ms: Stats | None
    baseline_ms: Stats | None
    ratio_name: str
    ratio: Stats | None
    target: Target | None = None
    max_diff: float | None = None
    tolerance: float | None = None
    status: str = "ok"
    reason: str = ""
    note: str = ""  # how the feature's ratios are defined (printed under its table)

    @property
    def holds(self) -> bool | None:
        """Whether the target holds (None: no target, or nothing measured)."""
        if self.target is None or self.ratio is None:
            return None
        return self.target.holds(self.ratio.median)

    def as_dict(self) -> dict:
        def stats(s: Stats | None) -> dict | None:
            return None if s is None else s.as_dict()

        return {
            "feature": self.feature,
            "problem": self.problem,
            "dtype": self.dtype,
            "mode": self.mode,
            "subject": self.subject,
            "baseline": self.baseline,
            "subject_ms": stats(self.subject_ms),
            "baseline_ms": stats(self.baseline_ms),
            "ratio_name": self.ratio_name,
            "ratio": stats(self.ratio),
            "target": None if self.target is None else str(self.target),
            "holds": self.holds,
            "max_diff": (
                self.max_diff
                if self.max_diff is None or math.isfinite(self.max_diff)
                else str(self.max_diff)
            ),
            "tolerance": self.tolerance,
            "status": self.status,
            "reason": self.reason,
            "note": self.note,
        }


def check_status(max_diff: float | None, tolerance: float | None) -> str:
    """``fail`` when a measured difference is not finite or above the tolerance, else ``ok``."""
    if max_diff is None or tolerance is None:
        return "ok"
    return "ok" if math.isfinite(max_diff) and max_diff <= tolerance else "fail"


def timed_row(
    *,
    feature: str,
    problem: str,
    dtype: str,
    mode: str,
    subject: str,
    baseline: str,
    subject_times: list[float],
    baseline_times: list[float],
    ratio_name: str,
    ratio: Stats,
    target: Target | None = None,
    max_diff: float | None = None,
    tolerance: float | None = None,
    note: str = "",
) -> FeatureRow:
    """A row from the seconds of two contenders (shown in milliseconds) and their ratio."""
    return FeatureRow(
        feature=feature,
        problem=problem,
        dtype=dtype,
        mode=mode,
        subject=subject,
        baseline=baseline,
        subject_ms=Stats.of(subject_times).scaled(1e3),
        baseline_ms=Stats.of(baseline_times).scaled(1e3),
        ratio_name=ratio_name,
        ratio=ratio,
        target=target,
        max_diff=max_diff,
        tolerance=tolerance,
        status=check_status(max_diff, tolerance),
        note=note,
    )


def error_row(feature: str, problem: str, dtype: str, mode: str, exc: BaseException) -> FeatureRow:
    """The row of a measurement that raised."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return FeatureRow(
        feature=feature,
        problem=problem,
        dtype=dtype,
        mode=mode,
        subject="-",
        baseline="-",
        subject_ms=None,
        baseline_ms=None,
        ratio_name="-",
        ratio=None,
        status="error",
        reason=f"{type(exc).__name__}: {text[:300]}",
    )
