"""Built-in plugin: the ``cpu`` and ``reference`` attention backends.

It implements the same :func:`~aigc_ext.hookspecs.aigc_register_attention_backends` hook a
third-party plugin does, and :mod:`aigc_ext.plugins` loads it before the installed plugins; the
dispatcher and the benchmark only ever see the registry.
"""

from __future__ import annotations

from aigc_ext.hookspecs import hookimpl

__all__ = ["aigc_register_attention_backends"]


@hookimpl
def aigc_register_attention_backends(register):
    """Registers ``cpu`` (the fused C++ kernel) and ``reference`` (pure PyTorch)."""
    from aigc_ext.builtins import cpu, reference

    register(
        "reference",
        reference.sdpa,
        devices=("cpu", "cuda", "mps", "xpu", "meta"),
        priority=-100,
        description="pure-PyTorch math in fp32/fp64 (test oracle and fallback)",
    )
    register(
        "cpu",
        cpu.sdpa,
        devices=("cpu",),
        priority=100,
        description="fused C++ kernel (FlashAttention-2 tiling, AVX-512/AVX2, AMX brgemm)",
        unavailable_reason=cpu.unavailable_reason,
        unsupported_reason=cpu.unsupported_reason,
    )
