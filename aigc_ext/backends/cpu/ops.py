"""The `torch.ops.aigc_ext` operators: loading, fake (meta) kernels and autograd.

Every backend implements the same contract (see ``csrc/ops.cpp``):

* ``attention_forward(q, k, v, attn_mask, is_causal, scale) -> (out, lse)`` with
  q ``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)``, ``Hq % Hkv == 0``;
  ``lse`` is the per-row logsumexp of the scaled, masked scores (float32, or float64 for
  float64 inputs), ``-inf`` for a row with no visible key (whose output is zero).
* ``attention_backward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale)
  -> (grad_q, grad_k, grad_v)``.

The fake kernels make the operators traceable by ``torch.compile`` and ``torch.export``; the
autograd registration (:mod:`aigc_ext.contract`) lets gradients flow through the forward
operator.
"""

from __future__ import annotations

import torch

from aigc_ext import _C  # noqa: F401  (loads the library: registers torch.ops.aigc_ext.*)
from aigc_ext.backends.cpu.op_checks import (
    check_attention_backward,
    check_attention_forward,
    lse_dtype,
)
from aigc_ext.contract import register_attention_autograd

__all__ = ["cpu_kernel_config", "lse_dtype"]


# The fake kernels run the CPU kernel's checks first (same errors, see op_checks), and
# describe outputs laid out as the kernel's: contiguous, whatever the inputs' strides.


@torch.library.register_fake("aigc_ext::attention_forward")
def _attention_forward_fake(query, key, value, attn_mask=None, is_causal=False, scale=1.0):
    check_attention_forward(query, key, value, attn_mask, scale)
    batch, heads, length, _ = query.shape
    out = query.new_empty((batch, heads, length, value.shape[-1]))
    lse = query.new_empty((batch, heads, length), dtype=lse_dtype(query.dtype))
    return out, lse


@torch.library.register_fake("aigc_ext::attention_backward")
def _attention_backward_fake(
    grad_out, query, key, value, out, lse, attn_mask=None, is_causal=False, scale=1.0
):
    check_attention_backward(grad_out, query, key, value, out, lse, attn_mask, scale)
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


register_attention_autograd("aigc_ext::attention_forward", "attention_backward")


def cpu_kernel_config(
    isa: str | None = None,
    use_brgemm: bool | None = None,
    use_amx: bool | None = None,
    use_avx512_bf16: bool | str | None = None,
) -> str:
    """Reads (and optionally sets) the CPU kernel's instruction set and GEMM engines.

    ``isa`` is one of ``"auto"``, ``"default"``, ``"avx2"``, ``"avx512"``; ``use_brgemm``
    switches bf16/fp16 GEMMs between torch's brgemm (AMX where present) and the kernel's own
    paths; ``use_amx`` switches the bf16 forward between the kernel's own AMX tile code (on CPUs
    with AMX-BF16, AVX-512 build) and the brgemm path; ``use_avx512_bf16`` switches bf16 GEMMs
    that brgemm does not serve (no AMX, or ``use_brgemm=False``) between the kernel's
    ``vdpbf16ps`` micro-kernel (AVX-512 build, CPUs with AVX512_BF16) and fp32 math on widened
    operands: ``True``/``"on"``, ``False``/``"off"``, or ``"auto"`` (the default: on where the CPU
    has no AMX; on AMX CPUs such as Sapphire Rapids ``vdpbf16ps`` runs at half the fp32 FMA
    rate). Returns a description such as ``"isa=avx512 brgemm=1 amx=1 ... avx512_bf16=auto
    vdpbf16ps=0 compiled=default,avx2,avx512 threads=2"`` (``vdpbf16ps``: whether bf16 products
    that brgemm does not take run on the micro-kernel now).
    """
    if isinstance(use_avx512_bf16, bool):
        use_avx512_bf16 = "on" if use_avx512_bf16 else "off"
    return torch.ops.aigc_ext._cpu_kernel_config(isa, use_brgemm, use_amx, use_avx512_bf16)
