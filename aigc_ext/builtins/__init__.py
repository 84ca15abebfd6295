"""Built-in attention backends.

They register through the same :func:`aigc_ext.dispatch.register_backend` call a third-party
backend uses; the dispatcher and the benchmark only ever see the registry.
"""

from __future__ import annotations

from aigc_ext.dispatch import register_backend

__all__ = ["register_builtin_backends"]


def register_builtin_backends() -> None:
    """Registers ``cpu`` (the fused C++ kernel) and ``reference`` (pure PyTorch)."""
    from aigc_ext.builtins import cpu, reference

    register_backend(
        "reference",
        reference.sdpa,
        devices=("cpu", "cuda", "mps", "xpu", "meta"),
        priority=-100,
        description="pure-PyTorch math in fp32/fp64 (test oracle and fallback)",
    )
    register_backend(
        "cpu",
        cpu.sdpa,
        devices=("cpu",),
        priority=100,
        description="fused C++ kernel (FlashAttention-2 tiling, AVX-512/AVX2, AMX brgemm)",
        unavailable_reason=cpu.unavailable_reason,
        unsupported_reason=cpu.unsupported_reason,
    )
