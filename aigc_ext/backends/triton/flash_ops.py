"""The Triton operators of the FlashAttention contract: ``torch.ops.aigc_ext.triton_flash_forward``
and ``triton_flash_backward`` (``docs/flash-contract.md``).

Their schemas are the contract's (:data:`aigc_ext.flash.ops.FORWARD_SCHEMA` /
``BACKWARD_SCHEMA``), the same as the C++ ``flash_forward`` / ``flash_backward``: dense and
variable-length layouts, bottom-right causal, sliding windows, softcap, ALiBi, ``attn_mask``,
sinks, counter-based dropout, and the KV-cache forward (``seqused_k``, ``leftpad_k``,
``kv_batch_idx``, paged ``block_table``). The kernels are in
:mod:`aigc_ext.backends.triton.flash_kernels`.

Every call is validated by :mod:`aigc_ext.flash.checks` first (values of the index tensors too
when they are on the CPU) plus what the Triton backend adds: float16, bfloat16 or float32
inputs on a CUDA device (CPU tensors only under ``TRITON_INTERPRET=1``). ``num_splits`` is
accepted and ignored: the forward has no split-KV path; decoding steps fill their tiles with
the grouped query heads instead.

On a GPU they are ``torch.library.triton_op`` operators (``torch.compile`` traces into them and
sees the kernels through ``wrap_triton``); under the interpreter they are opaque
``custom_op`` operators, as :mod:`aigc_ext.backends.triton.ops` does. Fake kernels and autograd
(the backward operator for q, k, v; the sinks' gradient from ``lse``) come from
:func:`aigc_ext.flash.ops.register_flash_operator`.
"""

from __future__ import annotations

import torch
import triton
from torch.library import wrap_triton

from aigc_ext.backends.triton import kernels as K
from aigc_ext.backends.triton.flash_kernels import (
    flash_bwd_dkdv,
    flash_bwd_dq,
    flash_bwd_preprocess,
    flash_fwd,
)
from aigc_ext.flash.checks import (
    FlashArgumentError,
    FlashTypeError,
    check_flash_backward,
    check_flash_forward,
)
from aigc_ext.flash.ops import BACKWARD_SCHEMA, FORWARD_SCHEMA, register_flash_operator
from aigc_ext.flash.philox import dropout_threshold

__all__ = ["SUPPORTED_DTYPES", "triton_flash_backward", "triton_flash_forward"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FORWARD_OP = "aigc_ext::triton_flash_forward"
_BACKWARD_OP = "aigc_ext::triton_flash_backward"
_PREPROCESS_BLOCK = 32 if K.INTERPRET else 64

_define = torch.library.custom_op if K.INTERPRET else torch.library.triton_op


def _check_backend(op: str, q: torch.Tensor) -> None:
    """What the Triton kernels add to the contract's checks: dtype and device."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise FlashTypeError(
            f"{op}: q has dtype {q.dtype}; the Triton kernels support float16, bfloat16 and float32"
        )
    if q.device.type != "cuda" and not K.INTERPRET and q.device.type != "meta":
        raise FlashArgumentError(
            f"{op}: tensors must be on a CUDA device (got {q.device}); CPU tensors run only "
            "under the Triton interpreter (TRITON_INTERPRET=1)"
        )


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _mask_view(attn_mask, batch, heads, len_q, len_k):
    """``(tensor, strides, MASK_MODE, MASK_BOOL)`` of the mask broadcast to ``(B, Hq, Lq, S)``
    (a view, never a copy). Mode 1: one key vector per batch row (nothing varies over heads and
    query positions), read once per key block; mode 2: tiles."""
    if attn_mask is None:
        return None, (0, 0, 0, 0), 0, False
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    m = m.expand(batch, heads, len_q, len_k)
    is_bool = m.dtype == torch.bool
    if is_bool:
        m = m.view(torch.uint8)
    strides = tuple(m.stride())
    vector = (heads == 1 or strides[1] == 0) and (len_q == 1 or strides[2] == 0)
    return m, strides, 1 if vector else 2, is_bool


def _options(
    causal, window_left, window_right, softcap, alibi_slopes, dropout_p, q, span: int
) -> dict:
    """The scalar arguments and feature switches shared by the three main kernels.

    ``span`` bounds query plus key positions (the longest query length plus the key capacity):
    a window side at least that wide hides nothing and is dropped, which also keeps the
    kernels' int32 window arithmetic far from overflow."""
    right = 0 if causal else int(window_right)
    left = int(window_left)
    left = -1 if left > span else left
    right = -1 if right > span else right
    p = float(dropout_p)
    softcap = float(softcap)
    return {
        "softcap": softcap,
        "inv_softcap": 1.0 / softcap if softcap > 0 else 0.0,
        "window_left": max(left, 0),
        "window_right": max(right, 0),
        "threshold": dropout_threshold(p) if p > 0 else 0,
        "drop_scale": 1.0 / (1.0 - p) if p > 0 else 1.0,
        "WINDOW_LEFT": left >= 0,
        "WINDOW_RIGHT": right >= 0,
        "SOFTCAP": softcap > 0,
        "ALIBI": alibi_slopes is not None,
        "DROPOUT": p > 0,
        "PRECISE": q.dtype == torch.float32,
        "UPCAST": K.INTERPRET and q.dtype == torch.bfloat16,
    }


def _param(t: torch.Tensor | None, dummy: torch.Tensor, dtype=None) -> torch.Tensor:
    """An optional tensor argument of a kernel: ``t`` on the kernel's device (contiguous), or
    ``dummy`` where the kernel does not read it (its switch is off)."""
    if t is None:
        return dummy
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device=dummy.device).contiguous()


def _forward(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, leftpad_k,
    kv_batch_idx, block_table, scale, causal, window_left, window_right, softcap, alibi_slopes,
    dropout_p, rng_state, sinks, num_splits, attn_mask,
):  # fmt: skip
    layout = check_flash_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, leftpad_k,
        kv_batch_idx, block_table, scale, causal, window_left, window_right, softcap,
        alibi_slopes, dropout_p, rng_state, sinks, num_splits, attn_mask, op=_FORWARD_OP,
    )  # fmt: skip
    _check_backend(_FORWARD_OP, q)
    varlen, paged = layout.varlen, layout.paged
    heads, heads_kv = layout.heads_q, layout.heads_kv
    e, ev, batch = layout.head_dim, layout.head_dim_v, layout.batch
    group = heads // heads_kv
    if varlen:
        out = q.new_zeros(layout.out_shape)  # rows past cu_seqlens_q[-1]: zeros, lse -inf
        lse = torch.full(layout.lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
        t_q = q.shape[0]
        length_q = min(max_seqlen_q, t_q) if max_seqlen_q > 0 else t_q
        q4, out4 = q.unsqueeze(0), out.unsqueeze(0)
        q_strides = (0, *q.stride())
        o_strides = (0, *out.stride())
        lse_strides = (0, lse.stride(0))
    else:
        out = q.new_empty(layout.out_shape)
        lse = torch.empty(layout.lse_shape, dtype=torch.float32, device=q.device)
        t_q = length_q = q.shape[1]
        q4, out4 = q, out
        q_strides, o_strides = tuple(q.stride()), tuple(out.stride())
        lse_strides = (lse.stride(0), lse.stride(1))
    if batch == 0 or length_q == 0 or heads == 0:
        if not varlen:
            out.zero_()
            lse.fill_(float("-inf"))
        return out, lse

    if paged:
        k4, v4 = k, v
        page_size = k.shape[1]
        s_cap, t_k, kv_rows = block_table.shape[1] * page_size, 0, k.shape[0]
    elif varlen:
        k4, v4 = k.unsqueeze(0), v.unsqueeze(0)
        t_k = k.shape[0]
        s_cap = min(max_seqlen_k, t_k) if max_seqlen_k > 0 else t_k
        page_size, kv_rows = 1, 1
    else:
        k4, v4 = k, v
        page_size, s_cap, t_k, kv_rows = 1, k.shape[1], k.shape[1], k.shape[0]

    opts = _options(
        causal, window_left, window_right, softcap, alibi_slopes, dropout_p, q, length_q + s_cap
    )
    alibi = _param(alibi_slopes, q, torch.float32)
    stride_ab = alibi.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    rng = _param(rng_state if opts["DROPOUT"] else None, q)
    sink = _param(sinks, q, torch.float32)
    table = _param(block_table, q)
    stride_btb = table.stride(0) if paged else 0
    mask, m_strides, mask_mode, mask_bool = _mask_view(
        attn_mask, batch, heads, length_q, k.shape[1]
    )
    if mask is None:
        mask = q
    block_d, block_dv = _block_d(e), _block_d(ev)
    rows = length_q * group
    # int32 indices of the optional tensors as the kernel reads them
    cu_q = _param(cu_seqlens_q, q)
    cu_k = _param(cu_seqlens_k, q)
    used = _param(seqused_k, q)
    left = _param(leftpad_k, q)
    kv_idx = _param(kv_batch_idx, q)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * batch * heads_kv,)

    wrap_triton(flash_fwd)[grid](
        q4, k4, v4, out4, lse, cu_q, cu_k, used, left, kv_idx, table, alibi, rng, sink, mask,
        *q_strides, *k4.stride(), *v4.stride(), *o_strides, *lse_strides, stride_btb, stride_ab,
        *m_strides,
        heads, group, length_q, s_cap, t_q, t_k, kv_rows,
        float(scale), float(scale) * K.LOG2E, opts["softcap"], opts["inv_softcap"],
        opts["window_left"], opts["window_right"], opts["threshold"], opts["drop_scale"],
        triton.next_power_of_2(rows), triton.next_power_of_2(max(1, s_cap)),
        E=e, EV=ev, BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_D=e == block_d,
        EVEN_DV=ev == block_dv, VARLEN=varlen, PAGED=paged, PAGE_SIZE=page_size,
        HAS_SEQUSED=seqused_k is not None, HAS_LEFTPAD=leftpad_k is not None,
        HAS_KV_IDX=kv_batch_idx is not None,
        WINDOW_LEFT=opts["WINDOW_LEFT"], WINDOW_RIGHT=opts["WINDOW_RIGHT"],
        SOFTCAP=opts["SOFTCAP"], ALIBI=opts["ALIBI"], DROPOUT=opts["DROPOUT"],
        SINKS_ON=sinks is not None, MASK_MODE=mask_mode, MASK_BOOL=mask_bool,
        PRECISE=opts["PRECISE"], UPCAST=opts["UPCAST"],
    )  # fmt: skip
    return out, lse


def _backward(
    grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
    causal, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state, attn_mask,
):  # fmt: skip
    layout = check_flash_backward(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state,
        attn_mask, op=_BACKWARD_OP,
    )  # fmt: skip
    _check_backend(_BACKWARD_OP, q)
    varlen = layout.varlen
    heads, heads_kv = layout.heads_q, layout.heads_kv
    e, ev, batch = layout.head_dim, layout.head_dim_v, layout.batch
    group = heads // heads_kv
    make = torch.zeros_like if varlen else torch.empty_like  # packed: rows outside stay zero
    dq = make(q, memory_format=torch.contiguous_format)
    dk = make(k, memory_format=torch.contiguous_format)
    dv = make(v, memory_format=torch.contiguous_format)
    if varlen:
        t_q, t_k = q.shape[0], k.shape[0]
        length_q = min(max_seqlen_q, t_q) if max_seqlen_q > 0 else t_q
        s_cap = min(max_seqlen_k, t_k) if max_seqlen_k > 0 else t_k
        views = [x.unsqueeze(0) for x in (q, k, v, grad_out, out, dq, dk, dv)]
        rows_pre, batch_pre = t_q, 1
    else:
        t_q = length_q = q.shape[1]
        t_k = s_cap = k.shape[1]
        views = [q, k, v, grad_out, out, dq, dk, dv]
        rows_pre, batch_pre = t_q, batch
    if batch == 0 or heads == 0 or t_q == 0 or (not varlen and s_cap == 0):
        return dq.zero_(), dk.zero_(), dv.zero_()
    q4, k4, v4, do4, o4, dq4, dk4, dv4 = views

    def strides(x4):  # packed tensors: the batch index of a program is a sequence, not a row
        return (0, *x4.stride()[1:]) if varlen else tuple(x4.stride())

    lse_c = lse.to(torch.float32).contiguous()
    delta = torch.empty_like(lse_c)
    lse_strides = (0, lse_c.stride(0)) if varlen else (lse_c.stride(0), lse_c.stride(1))

    def grid_pre(meta):
        return (triton.cdiv(rows_pre, _PREPROCESS_BLOCK) * batch_pre * heads,)

    wrap_triton(flash_bwd_preprocess)[grid_pre](
        o4, do4, delta, *o4.stride(), *do4.stride(), heads, rows_pre, ev,
        BLOCK_M=_PREPROCESS_BLOCK, BLOCK_DV=_block_d(ev),
    )  # fmt: skip

    opts = _options(
        causal, window_left, window_right, softcap, alibi_slopes, dropout_p, q, length_q + s_cap
    )
    alibi = _param(alibi_slopes, q, torch.float32)
    stride_ab = alibi.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    rng = _param(rng_state if opts["DROPOUT"] else None, q)
    cu_q = _param(cu_seqlens_q, q)
    cu_k = _param(cu_seqlens_k, q)
    mask, m_strides, mask_mode, mask_bool = _mask_view(
        attn_mask, batch, heads, length_q, k.shape[1]
    )
    if mask is None:
        mask = q
    block_d, block_dv = _block_d(e), _block_d(ev)
    rows = length_q * group
    common = {
        "E": e,
        "EV": ev,
        "BLOCK_D": block_d,
        "BLOCK_DV": block_dv,
        "EVEN_D": e == block_d,
        "EVEN_DV": ev == block_dv,
        "VARLEN": varlen,
        "PAGED": False,
        "WINDOW_LEFT": opts["WINDOW_LEFT"],
        "WINDOW_RIGHT": opts["WINDOW_RIGHT"],
        "SOFTCAP": opts["SOFTCAP"],
        "ALIBI": opts["ALIBI"],
        "DROPOUT": opts["DROPOUT"],
        "MASK_MODE": mask_mode,
        "MASK_BOOL": mask_bool,
        "PRECISE": opts["PRECISE"],
        "UPCAST": opts["UPCAST"],
    }
    scalars = (
        heads, group, length_q, s_cap, t_q, t_k, 1 if varlen else k.shape[0],
        float(scale), float(scale) * K.LOG2E, opts["softcap"], opts["inv_softcap"],
        opts["window_left"], opts["window_right"], opts["threshold"], opts["drop_scale"],
        triton.next_power_of_2(rows), triton.next_power_of_2(max(1, s_cap)),
    )  # fmt: skip

    def grid_kv(meta):
        return (triton.cdiv(s_cap, meta["BLOCK_N"]) * batch * heads_kv,)

    wrap_triton(flash_bwd_dkdv)[grid_kv](
        q4, k4, v4, do4, lse_c, delta, dk4, dv4, cu_q, cu_k, alibi, rng, mask,
        *strides(q4), *k4.stride(), *v4.stride(), *strides(do4), *dk4.stride(), *dv4.stride(),
        *lse_strides, stride_ab, *m_strides, *scalars,
        **common,
    )  # fmt: skip

    def grid_q(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * batch * heads_kv,)

    wrap_triton(flash_bwd_dq)[grid_q](
        q4, k4, v4, do4, lse_c, delta, dq4, cu_q, cu_k, alibi, rng, mask,
        *strides(q4), *k4.stride(), *v4.stride(), *strides(do4), *strides(dq4),
        *lse_strides, stride_ab, *m_strides, *scalars,
        **common,
    )  # fmt: skip
    return dq, dk, dv


@_define(_FORWARD_OP, mutates_args=(), schema=FORWARD_SCHEMA)
def triton_flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    seqused_k: torch.Tensor | None = None,
    leftpad_k: torch.Tensor | None = None,
    kv_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int = 0,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's forward on the Triton kernels: ``(out, lse)``."""
    return _forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, leftpad_k,
        kv_batch_idx, block_table, scale, causal, window_left, window_right, softcap,
        alibi_slopes, dropout_p, rng_state, sinks, num_splits, attn_mask,
    )  # fmt: skip


@_define(_BACKWARD_OP, mutates_args=(), schema=BACKWARD_SCHEMA)
def triton_flash_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    scale: float = 1.0,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract's backward on the Triton kernels: ``(grad_q, grad_k, grad_v)`` from the
    forward's ``out`` and ``lse``, the dropout mask regenerated from ``rng_state``."""
    return _backward(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state,
        attn_mask,
    )  # fmt: skip


register_flash_operator("triton_flash_forward", "triton_flash_backward")
