"""Softcap: ``flash_forward`` with ``softcap`` against the same call without, forward.

``L = S = seq``, batch 1, non-causal and causal. The ratio is ``time without / time with``,
the speed kept with the softcap (target ``>= 0.9``). Softcap changes the result, so there is no
output check here (its values are tested against the reference in the operator tests).
"""

from __future__ import annotations

import torch

from aigc_ext.bench.features.common import flash_ops, randn
from aigc_ext.bench.features.config import SoftcapSizes
from aigc_ext.bench.features.rows import FeatureRow, Target, timed_row
from aigc_ext.bench.features.timing import Timing, paired_ratio

__all__ = ["TARGET", "describe", "measure_softcap"]

TARGET = Target(">=", 0.9)  # time without softcap / time with it
NOTE = "without / with: the time without softcap over the time with it (the speed kept)."


def describe(sizes: SoftcapSizes) -> str:
    return (
        f"softcap: L=S={sizes.seq}, B=1, H={sizes.heads}, D={sizes.head_dim}, "
        f"softcap={sizes.softcap:g}, forward"
    )


def measure_softcap(
    sizes: SoftcapSizes,
    dtype: torch.dtype,
    dtype_name: str,
    timing: Timing,
    seed: int,
    problem: str | None = None,
) -> list[FeatureRow]:
    """One row per causal setting: ``time without / time with softcap``."""
    forward, _ = flash_ops()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (randn((1, sizes.seq, sizes.heads, sizes.head_dim), dtype, gen) for _ in range(3))
    scale = sizes.head_dim**-0.5
    rows = []
    for causal in (False, True):

        def capped(causal: bool = causal) -> torch.Tensor:
            return forward(q, k, v, scale=scale, causal=causal, softcap=sizes.softcap)[0]

        def plain(causal: bool = causal) -> torch.Tensor:
            return forward(q, k, v, scale=scale, causal=causal)[0]

        times = timing.run({"softcap": capped, "plain": plain})
        what = "causal" if causal else "non-causal"
        rows.append(
            timed_row(
                feature="softcap",
                problem=problem or describe(sizes),
                dtype=dtype_name,
                mode="fwd",
                subject=f"softcap={sizes.softcap:g}, {what}",
                baseline=f"no softcap, {what}",
                subject_times=times["softcap"],
                baseline_times=times["plain"],
                ratio_name="without / with",
                ratio=paired_ratio(times["plain"], times["softcap"]),
                target=TARGET,
                note=NOTE,
            )
        )
    return rows
