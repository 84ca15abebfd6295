"""What the feature benchmarks share: the operators, random inputs and output checks."""

from __future__ import annotations

import torch

__all__ = ["OUTPUT_TOLERANCE", "flash_ops", "max_abs_diff", "randn"]

# How far two implementations of the same attention may differ (max |a - b| over the output)
# before a row is marked failed: the inputs are N(0, 1), so the outputs are below 1 and these
# are a few units in the last place of each dtype's rounding of them.
OUTPUT_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


def flash_ops():
    """``(flash_forward, flash_backward)``: the CPU operators (loading the compiled library)."""
    from aigc_ext.backends.cpu import ops  # noqa: F401  (registers torch.ops.aigc_ext.*)

    return torch.ops.aigc_ext.flash_forward, torch.ops.aigc_ext.flash_backward


def randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Standard normal values drawn in float32 from ``gen`` (the same values for every dtype
    of a seed), then rounded to ``dtype``."""
    return torch.randn(shape, generator=gen).to(dtype)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float32 (0 for empty tensors); shapes must match."""
    if a.shape != b.shape:
        raise ValueError(f"max_abs_diff: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return float((a.float() - b.float()).abs().max())
