"""Built-in plugin: the ``cpu``, ``triton`` and ``reference`` attention backends.

It implements the same :func:`~aigc_ext.hookspecs.aigc_register_attention_backends` hook a
third-party plugin does, and :mod:`aigc_ext.plugins` loads it before the installed plugins; the
dispatcher and the benchmark only ever see the registry.
"""

from __future__ import annotations

from aigc_ext.hookspecs import hookimpl

__all__ = ["aigc_register_attention_backends"]


@hookimpl
def aigc_register_attention_backends(register):
    """Registers ``cpu`` (the fused C++ kernel), ``triton`` (FlashAttention-2 Triton kernels
    for CUDA) and ``reference`` (pure PyTorch)."""
    from aigc_ext.builtins import cpu, reference
    from aigc_ext.triton import backend as triton_backend

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
    # Devices and priority depend on the Triton interpreter, which is fixed for the process:
    # CUDA tensors (default there, priority above cpu's); CPU tensors too under
    # TRITON_INTERPRET=1, for testing, below the C++ kernel so that it stays the CPU default.
    register(
        "triton",
        triton_backend.sdpa,
        devices=triton_backend.devices(),
        priority=triton_backend.priority(),
        description="FlashAttention-2 Triton kernels (CUDA; CPU through the Triton interpreter)",
        unavailable_reason=triton_backend.unavailable_reason,
        unsupported_reason=triton_backend.unsupported_reason,
    )
