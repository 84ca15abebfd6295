"""Paged decoding: one decode step against a paged KV cache and against a contiguous one.

A decode step is one new query row per batch row (``q`` of shape ``(B, 1, Hq, D)``) attending
to the whole cache, ``seqused_k = cache`` for every row. The contiguous cache is
``(B, cache, Hkv, D)``; each paged cache holds the same keys and values in pages of
``page_size`` positions, ``(B * cache / page_size, page_size, Hkv, D)``, in a seeded random
page order (as pages come out of a serving engine's allocator), addressed by ``block_table``.
The kernel reads the pages in place (docs/flash-contract.md).

Rows: ``time paged / time contiguous`` per page size (target ``<= 1.10``: within 10%), each
checked for the same output as the contiguous cache.
"""

from __future__ import annotations

import torch

from aigc_ext.bench.features.common import OUTPUT_TOLERANCE, flash_ops, max_abs_diff, randn
from aigc_ext.bench.features.config import PagedSizes
from aigc_ext.bench.features.rows import FeatureRow, Target, timed_row
from aigc_ext.bench.features.timing import Timing, paired_ratio

__all__ = ["TARGET", "describe", "measure_paged_decode", "paged_copy"]

TARGET = Target("<=", 1.10)  # time paged / time contiguous
NOTE = (
    "paged / contiguous: the step's time with a block_table over its time on the contiguous "
    "cache (B, S, Hkv, D); pages in a seeded random order, read in place."
)


def describe(sizes: PagedSizes) -> str:
    return (
        f"paged decode: one step (Lq=1), B={sizes.batch}, Hq={sizes.heads}, "
        f"Hkv={sizes.kv_heads}, D={sizes.head_dim}, cache length {sizes.cache}"
    )


def paged_copy(
    cache: torch.Tensor, page_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contiguous cache ``(B, S, H, D)`` as pages ``(B * S / page_size, page_size, H, D)``
    in a random order, and the int32 ``(B, S / page_size)`` block table that addresses them."""
    batch, seq, heads, dim = cache.shape
    if seq % page_size:
        raise ValueError(
            f"paged_copy: page_size ({page_size}) must divide the cache length ({seq})"
        )
    per_row = seq // page_size
    order = torch.randperm(batch * per_row, generator=gen)
    pages = cache.new_empty((batch * per_row, page_size, heads, dim))
    # Page j of batch row b (positions j * page_size ...) goes to slot order[b * per_row + j].
    pages[order] = cache.reshape(batch * per_row, page_size, heads, dim)
    return pages, order.view(batch, per_row).to(torch.int32)


def measure_paged_decode(
    sizes: PagedSizes,
    dtype: torch.dtype,
    dtype_name: str,
    timing: Timing,
    seed: int,
    problem: str | None = None,
) -> list[FeatureRow]:
    """One row per page size: paged against contiguous, in the same alternation."""
    forward, _ = flash_ops()
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, d, s = sizes.batch, sizes.heads, sizes.kv_heads, sizes.head_dim, sizes.cache
    q = randn((b, 1, hq, d), dtype, gen)
    k = randn((b, s, hkv, d), dtype, gen)
    v = randn((b, s, hkv, d), dtype, gen)
    used = torch.full((b,), s, dtype=torch.int32)
    scale = d**-0.5
    calls = {"contiguous": lambda: forward(q, k, v, seqused_k=used, scale=scale)[0]}
    for size in sizes.page_sizes:
        k_pages, table = paged_copy(k, size, gen)
        v_pages = v.new_empty(k_pages.shape)
        # The same page order for values as for keys (one block table addresses both).
        v_pages[table.flatten().long()] = v.reshape(-1, size, hkv, d)

        def paged(kp=k_pages, vp=v_pages, bt=table) -> torch.Tensor:
            return forward(q, kp, vp, seqused_k=used, block_table=bt, scale=scale)[0]

        calls[f"paged{size}"] = paged
    outputs = {name: call() for name, call in calls.items()}
    times = timing.run(calls, checked=True)
    rows = []
    for size in sizes.page_sizes:
        rows.append(
            timed_row(
                feature="paged-decode",
                problem=problem or describe(sizes),
                dtype=dtype_name,
                mode="decode",
                subject=f"paged, {size} per page",
                baseline="contiguous cache",
                subject_times=times[f"paged{size}"],
                baseline_times=times["contiguous"],
                ratio_name="paged / contiguous",
                ratio=paired_ratio(times[f"paged{size}"], times["contiguous"]),
                target=TARGET,
                max_diff=max_abs_diff(outputs[f"paged{size}"], outputs["contiguous"]),
                tolerance=OUTPUT_TOLERANCE[dtype],
                note=NOTE,
            )
        )
    return rows
