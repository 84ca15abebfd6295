"""Helpers of the ``cuda`` backend's tests: whether its kernels can run here, and why not.

The GPU tests skip with :data:`SKIP_REASON` (no CUDA device, or a library built without CUDA
kernels) and run on a machine with both: ``AIGC_EXT_TEST_DEVICE=cuda pytest tests/cuda``.
"""

from __future__ import annotations

import pytest
import torch

from aigc_ext.backends.cuda import backend as cuda_backend

SKIP_REASON: str | None = cuda_backend.unavailable_reason()
READY = SKIP_REASON is None

requires_cuda_kernels = pytest.mark.skipif(
    not READY, reason=f"cuda backend not available: {SKIP_REASON}"
)


def dense(batch, heads, heads_kv, length, length_k, dim, dtype, *, seed=0, dim_v=None):
    """q ``(B, L, H, D)``, k, v ``(B, S, Hkv, D)`` on the GPU (the flash layout), normal
    samples drawn on the CPU so that every run sees the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    dim_v = dim if dim_v is None else dim_v

    def draw(*shape):
        return torch.randn(shape, generator=gen).to(dtype).cuda()

    return (
        draw(batch, length, heads, dim),
        draw(batch, length_k, heads_kv, dim),
        draw(batch, length_k, heads_kv, dim_v),
    )


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest absolute difference, in float64."""
    return (got.double() - want.double()).abs().max().item()
