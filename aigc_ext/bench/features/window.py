"""Sliding windows: causal attention with the window ``(W, 0)`` at length ``S``, forward.

Four calls of ``flash_forward`` on the same values, batch 1, ``L = S``:

* **window**: ``causal=True, window_left=W, window_right=0`` at length ``S``: query ``i`` sees
  keys ``i - W .. i`` (at most ``W + 1``);
* **full causal** at ``S``: query ``i`` sees keys ``0 .. i``;
* **causal at W**: the first ``W`` rows of the same tensors, plain causal;
* **diagonal**: the window ``(0, 0)`` at ``S``: query ``i`` sees key ``i`` alone. It costs what
  every call at ``S`` pays whatever its window: reading Q, K and V, packing K and V, writing
  the output and its logsumexp.

Rows (all ratios are of the same run's times):

1. ``full causal@S / window@S`` (target ``>= 8``): the blocks outside the window are skipped.
2. ``(window@S / S) / (causal@W / W)``, the time **per query row** (target ``<= 1.3``). A
   window row sees up to ``W + 1`` keys, a row of causal attention at ``W`` on average
   ``(W + 1) / 2``, so this ratio is about 2 when the time per visible score is the same.
3. ``(window@S / P_win) / (causal@W / P_W)``, the time **per visible (query, key) pair**, with
   ``P_win = W (W + 1) / 2 + (S - W)(W + 1)`` and ``P_W = W (W + 1) / 2`` (no target: the
   normalisation that takes the different work per row out).
4. ``(full@S - diagonal) / (window@S - diagonal)`` (no target): row 1 without the cost that
   does not depend on the window, which bounds row 1 from above; how far the work that grows
   with the window tracks its pairs.

Checks: the window's first ``W`` output rows equal the causal-at-W output (their window covers
every earlier key), and so do full causal's; the diagonal's output equals V.
"""

from __future__ import annotations

import torch

from aigc_ext.bench.features.common import OUTPUT_TOLERANCE, flash_ops, max_abs_diff, randn
from aigc_ext.bench.features.config import WindowSizes
from aigc_ext.bench.features.rows import FeatureRow, Target, timed_row
from aigc_ext.bench.features.timing import Stats, Timing, paired_ratio

__all__ = [
    "FULL_TARGET",
    "ROW_TARGET",
    "describe",
    "excess_ratio",
    "measure_window",
    "note",
    "visible_pairs",
]

FULL_TARGET = Target(">=", 8.0)  # full causal@S / window@S
ROW_TARGET = Target("<=", 1.3)  # per query row: window@S / causal@W


def visible_pairs(seq: int, window: int | None) -> int:
    """(query, key) pairs causal attention at ``seq`` computes, with the window ``(window,
    0)`` (None: no window)."""
    if window is None or window >= seq - 1:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * (window + 1)


def describe(sizes: WindowSizes) -> str:
    return (
        f"window: causal, window ({sizes.window}, 0) at S={sizes.seq}, B=1, H={sizes.heads}, "
        f"D={sizes.head_dim}, forward"
    )


def note(sizes: WindowSizes) -> str:
    """How the window's ratios are normalised (printed under its table)."""
    s, w = sizes.seq, sizes.window
    return (
        f"full / window: time of full causal @{s} over the window's. per query row: "
        f"(window time / {s} rows) / (causal @{w} time / {w} rows); a window row sees up to "
        f"{w + 1} keys, a causal @{w} row {(w + 1) / 2:g} on average. per (q, k) pair: each "
        f"time over the (query, key) pairs it computes, {visible_pairs(s, w):,} and "
        f"{visible_pairs(w, None):,}. less diagonal: full and window each less the time of "
        f"the window (0, 0) at {s} (each query sees its own key: reading, packing and writing, "
        f"which do not shrink with the window)."
    )


def measure_window(
    sizes: WindowSizes,
    dtype: torch.dtype,
    dtype_name: str,
    timing: Timing,
    seed: int,
    problem: str | None = None,
) -> list[FeatureRow]:
    """The three rows of the module docstring."""
    forward, _ = flash_ops()
    s, w = sizes.seq, sizes.window
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (randn((1, s, sizes.heads, sizes.head_dim), dtype, gen) for _ in range(3))
    qw, kw, vw = (x[:, :w].contiguous() for x in (q, k, v))
    scale = sizes.head_dim**-0.5

    calls = {
        "window": lambda: forward(q, k, v, scale=scale, causal=True, window_left=w, window_right=0)[
            0
        ],
        "full": lambda: forward(q, k, v, scale=scale, causal=True)[0],
        "short": lambda: forward(qw, kw, vw, scale=scale, causal=True)[0],
        "diagonal": lambda: forward(
            q, k, v, scale=scale, causal=True, window_left=0, window_right=0
        )[0],
    }
    windowed, full, short, diagonal = (
        calls[name]() for name in ("window", "full", "short", "diagonal")
    )
    diff = max(
        max_abs_diff(windowed[:, :w], short),
        max_abs_diff(full[:, :w], short),
        max_abs_diff(diagonal, v),
    )
    del windowed, full, short, diagonal
    times = timing.run(calls, checked=True)
    common = dict(
        feature="window",
        problem=problem or describe(sizes),
        dtype=dtype_name,
        mode="fwd",
        note=note(sizes),
    )
    win = f"window ({w}, 0) @{s}"

    def row(baseline: str, against: str, ratio_name: str, ratio: Stats, **extra) -> FeatureRow:
        """A row of the window's times against those of the contender ``against``."""
        return timed_row(
            **common,
            subject=win,
            baseline=baseline,
            subject_times=times["window"],
            baseline_times=times[against],
            ratio_name=ratio_name,
            ratio=ratio,
            **extra,
        )

    per_pair = paired_ratio(
        times["window"], times["short"], 1 / visible_pairs(s, w), 1 / visible_pairs(w, None)
    )
    return [
        row(
            f"full causal @{s}",
            "full",
            "full / window",
            paired_ratio(times["full"], times["window"]),
            target=FULL_TARGET,
            max_diff=diff,
            tolerance=OUTPUT_TOLERANCE[dtype],
        ),
        row(
            f"full causal @{w}",
            "short",
            "per query row",
            paired_ratio(times["window"], times["short"], 1 / s, 1 / w),
            target=ROW_TARGET,
        ),
        row(f"full causal @{w}", "short", "per (q, k) pair", per_pair),
        row(
            f"window (0, 0) @{s}",
            "diagonal",
            "full / window, less diagonal",
            excess_ratio(times["full"], times["window"], times["diagonal"]),
        ),
    ]


def excess_ratio(full: list[float], windowed: list[float], diagonal: list[float]) -> Stats:
    """Per run, ``(full - diagonal) / (windowed - diagonal)``: the two times less what a call
    at the same length costs with no keys to speak of (runs from one alternation). A time at
    or below the diagonal's (timer noise at tiny sizes) counts as a picosecond above it."""

    def less(times: list[float]) -> list[float]:
        return [max(t - d, 1e-12) for t, d in zip(times, diagonal, strict=True)]

    return paired_ratio(less(full), less(windowed))
