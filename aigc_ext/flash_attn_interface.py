"""FlashAttention 2.8's Python API on aigc_ext's kernels: change one import, run on a CPU.

::

    from aigc_ext.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, ...

The seven public functions of ``flash_attn.flash_attn_interface`` with the same names,
positional order, defaults, layouts ``(B, S, H, D)`` / packed ``(total, H, D)`` and return
values: ``flash_attn_func``, ``flash_attn_qkvpacked_func``, ``flash_attn_kvpacked_func``,
``flash_attn_varlen_func``, ``flash_attn_varlen_qkvpacked_func``,
``flash_attn_varlen_kvpacked_func`` and ``flash_attn_with_kvcache``. They run on the
FlashAttention operators (:func:`aigc_ext.flash.ops.flash_attention`): the C++ kernels for CPU
tensors, Triton for CUDA tensors. Causal masks are aligned bottom-right, as in FlashAttention.

Where results differ from FlashAttention's (see ``docs/flash-attn.md``): the logsumexp of a
causal ALiBi call is the true logsumexp of the biased scores (FlashAttention drops a per-row
constant), the attention probabilities of ``return_attn_probs`` are exact (FlashAttention
warns that its own may be scaled), and head dims need no multiple of 8. Attention sinks
(gpt-oss ``s_aux``), which FlashAttention 2.8 lacks, are an argument of
:func:`aigc_ext.flash.ops.flash_attention`.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Sequence

import torch

from aigc_ext.flash import reference
from aigc_ext.flash.checks import FlashArgumentError, FlashTypeError, check_flash_forward
from aigc_ext.flash.ops import flash_attention, new_rng_state, run_flash_operator

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "install_flash_attn_shim",
]

_PROBS_BLOCK = 128  # FlashAttention pads its returned probabilities to multiples of this


def _window(window_size: Sequence[int], where: str) -> tuple[int, int]:
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise FlashTypeError(
            f"{where}: window_size must be a pair (left, right), -1 meaning unbounded; got "
            f"{window_size!r}"
        ) from None
    return left, right


def _strided_last_dim(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1


def _fa_lse(lse: torch.Tensor) -> torch.Tensor:
    """The logsumexp as FlashAttention reports it: ``+inf`` for a row that attends to nothing
    (the operators' ``-inf``)."""
    return torch.where(lse == -torch.inf, torch.inf, lse)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _attn_probs(q, k, v, kwargs, batch: int, len_q: int, len_k: int) -> torch.Tensor:
    """FlashAttention's third return value with dropout: the probabilities ``(B, H, Lq, S)``
    padded to multiples of 128, negative where dropout dropped the score."""
    probs = reference.flash_reference_probs(q.detach(), k.detach(), v.detach(), **kwargs)
    out = q.new_zeros(
        (batch, q.shape[-2], _round_up(len_q, _PROBS_BLOCK), _round_up(len_k, _PROBS_BLOCK))
    )
    out[:, :, : probs.shape[2], : probs.shape[3]] = probs.to(q.dtype)
    return out


def _run(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
         return_attn_probs, where, lengths=None, **layout):  # fmt: skip
    """The shared body of the six training functions: one ``flash_attention`` call."""
    left, right = _window(window_size, where)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    rng_state = new_rng_state() if dropout_p > 0 else None
    kwargs = dict(
        scale=scale, causal=causal, window_left=left, window_right=right, softcap=softcap,
        alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state, **layout,
    )  # fmt: skip
    out, lse = flash_attention(q, k, v, **kwargs)
    if not return_attn_probs:
        return out
    if dropout_p > 0:  # FlashAttention returns the probabilities only with dropout
        batch, len_q, len_k = lengths or (q.shape[0], q.shape[1], k.shape[1])
        probs = _attn_probs(q, k, v, kwargs, batch, len_q, len_k)
    else:
        probs = q.new_empty((0,))
    return out, _fa_lse(lse), probs


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention's ``flash_attn_qkvpacked_func``: qkv ``(B, S, 3, H, D)``.

    Returns ``out`` ``(B, S, H, D)``, or with ``return_attn_probs`` ``(out, softmax_lse
    (B, H, S) float32, S_dmask)``; ``S_dmask`` is empty without dropout, as in FlashAttention.
    Gradients flow into ``qkv``. ``deterministic`` is accepted: every backward here is.
    """
    q, k, v = qkv.unbind(dim=2)
    return _run(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, "flash_attn_qkvpacked_func")  # fmt: skip


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention's ``flash_attn_kvpacked_func``: q ``(B, Lq, H, D)``, kv ``(B, S, 2, Hkv,
    D)`` (MQA/GQA: ``H % Hkv == 0``). Returns as :func:`flash_attn_qkvpacked_func`."""
    k, v = kv.unbind(dim=2)
    return _run(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, "flash_attn_kvpacked_func")  # fmt: skip


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention's ``flash_attn_func``: q ``(B, Lq, H, D)``, k/v ``(B, S, Hkv, D)``.

    ``causal`` aligns the mask bottom-right; ``window_size=(left, right)`` lets query ``i`` see
    keys ``[i + S - Lq - left, i + S - Lq + right]``; ``softcap > 0`` caps the scores with
    ``softcap * tanh(x / softcap)``; ``alibi_slopes`` float32 ``(H,)`` or ``(B, H)`` subtracts
    ``slope * |i + S - Lq - j|``; ``dropout_p`` draws a fresh seed from torch's default
    generator per call (reproducible under ``torch.manual_seed``). Returns ``out``
    ``(B, Lq, H, D)``, or with ``return_attn_probs`` ``(out, softmax_lse, S_dmask)``.
    """
    return _run(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, "flash_attn_func")  # fmt: skip


def _varlen_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    layout = dict(
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    batch = cu_seqlens_q.shape[0] - 1 if isinstance(cu_seqlens_q, torch.Tensor) else 0
    return layout, (batch, max_seqlen_q, max_seqlen_k)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention's ``flash_attn_varlen_qkvpacked_func``: qkv ``(total, 3, H, D)``,
    ``cu_seqlens`` int32 ``(B + 1,)``. Returns ``out`` ``(total, H, D)``, or with
    ``return_attn_probs`` ``(out, softmax_lse (H, total), S_dmask)``."""
    q, k, v = qkv.unbind(dim=1)
    layout, lengths = _varlen_layout(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    return _run(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, "flash_attn_varlen_qkvpacked_func", lengths,
                **layout)  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention's ``flash_attn_varlen_kvpacked_func``: q ``(total_q, H, D)``, kv
    ``(total_k, 2, Hkv, D)``. Returns as :func:`flash_attn_varlen_qkvpacked_func`."""
    k, v = kv.unbind(dim=1)
    layout, lengths = _varlen_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _run(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, "flash_attn_varlen_kvpacked_func", lengths,
                **layout)  # fmt: skip


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """FlashAttention's ``flash_attn_varlen_func``: q ``(total_q, H, D)``, k/v ``(total_k,
    Hkv, D)``, sequence ``b`` in rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` (int32 ``(B + 1,)``).

    With ``block_table`` int32 ``(B, max_pages)``, k/v are a paged cache ``(num_pages,
    page_size, Hkv, D)`` holding ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` keys of sequence
    ``b`` from position 0 (inference only). Returns ``out`` ``(total_q, H, D)``, or with
    ``return_attn_probs`` ``(out, softmax_lse (H, total_q), S_dmask)``.
    """
    if block_table is not None:
        return _varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes,
                             return_attn_probs, block_table)  # fmt: skip
    layout, lengths = _varlen_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _run(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, "flash_attn_varlen_func", lengths, **layout)  # fmt: skip


def _varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, dropout_p, softmax_scale,
                  causal, window_size, softcap, alibi_slopes, return_attn_probs,
                  block_table):  # fmt: skip
    """Packed queries on a paged cache, through the dense-query KV-cache form of the operators.

    Sequence ``b``'s queries are placed at the end of row ``b`` of a ``(B, max_seqlen_q, H, D)``
    tensor, so that the bottom-right alignment of its ``Lq_b`` queries with its
    ``S_b = seqused_k[b]`` keys is the one a varlen call has; the rows are gathered back.
    """
    where = "flash_attn_varlen_func"
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise FlashTypeError(f"{where}: {name} must be an int32 tensor (B + 1,); got {t!r}")
    batch = cu_seqlens_q.shape[0] - 1
    lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    if not torch.compiler.is_compiling() and cu_seqlens_q.device.type == "cpu":
        if bool((lens_q > max_seqlen_q).any()) or bool((lens_q < 0).any()):
            raise FlashArgumentError(
                f"{where}: cu_seqlens_q {cu_seqlens_q.tolist()} must be non-decreasing with no "
                f"sequence longer than max_seqlen_q = {max_seqlen_q}"
            )
    tokens = torch.arange(q.shape[0], device=q.device)
    seq = torch.searchsorted(cu_seqlens_q[1:].long(), tokens, right=True).clamp(max=batch - 1)
    pos = tokens - cu_seqlens_q.long()[seq] + (max_seqlen_q - lens_q[seq])
    valid = tokens < cu_seqlens_q[-1].long()
    slot = torch.where(valid, seq * max_seqlen_q + pos, batch * max_seqlen_q)  # spare slot
    dense = q.new_zeros((batch * max_seqlen_q + 1, *q.shape[1:]))
    dense = dense.index_copy(0, slot, q)[:-1].view(batch, max_seqlen_q, *q.shape[1:])
    left, right = _window(window_size, where)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out, lse = flash_attention(
        dense, k, v, seqused_k=lens_k, block_table=block_table, scale=scale, causal=causal,
        window_left=left, window_right=right, softcap=softcap, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
    )  # fmt: skip
    out = out.reshape(batch * max_seqlen_q, *out.shape[2:])
    out = torch.where(valid.view(-1, 1, 1), out[slot.clamp(max=out.shape[0] - 1)], 0)
    lse = lse.transpose(1, 2).reshape(batch * max_seqlen_q, -1)
    lse = torch.where(valid.view(-1, 1), lse[slot.clamp(max=lse.shape[0] - 1)], -torch.inf).t()
    if not return_attn_probs:
        return out
    return out, _fa_lse(lse), q.new_empty((0,))


_FA_NAMES = (("seqused_k", "cache_seqlens"), ("leftpad_k", "cache_leftpad"),
             ("kv_batch_idx", "cache_batch_idx"))  # fmt: skip


def _in_fa_names(exc: FlashArgumentError) -> FlashArgumentError:
    """The error with FlashAttention's argument names (cache_seqlens, not seqused_k)."""
    message = str(exc)
    for ours, theirs in _FA_NAMES:
        message = re.sub(rf"\b{ours}\b", theirs, message)
    return type(exc)(message)


def _rotary(x, cos, sin, positions, interleaved: bool):
    """Rotary embedding of the first ``rotary_dim = 2 * cos.shape[1]`` features of x
    ``(B, L, H, D)`` at ``positions`` ``(B, L)``: pairs ``(2i, 2i + 1)`` when interleaved (GPT-J),
    ``(i, i + rotary_dim / 2)`` otherwise (GPT-NeoX); computed in float32 (float64 for float64)."""
    if not torch.compiler.is_compiling() and positions.device.type == "cpu" and positions.numel():
        if int(positions.max()) >= cos.shape[0]:
            raise FlashArgumentError(
                f"flash_attn_with_kvcache: rotary_cos/rotary_sin have {cos.shape[0]} positions; "
                f"the queries and new keys need position {int(positions.max())}"
            )
    half = cos.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = cos.to(work)[positions].unsqueeze(2)  # (B, L, 1, half)
    s = sin.to(work)[positions].unsqueeze(2)
    xr = x[..., : 2 * half].to(work)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rot.to(x.dtype), x[..., 2 * half :]], dim=-1)


def _check_new_kv(where, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens):
    if (k is None) != (v is None):
        raise FlashArgumentError(f"{where}: k and v are given together (the new keys, values)")
    if (rotary_cos is None) != (rotary_sin is None):
        raise FlashArgumentError(f"{where}: rotary_cos and rotary_sin are given together")
    if rotary_cos is not None and k is None:
        raise FlashArgumentError(
            f"{where}: rotary_cos/rotary_sin need the new k and v to append to the cache"
        )
    if k is not None:
        if cache_seqlens is None:
            raise FlashArgumentError(f"{where}: appending k and v needs cache_seqlens")
        for name, new, cache in (("k", k, k_cache), ("v", v, v_cache)):
            if not isinstance(new, torch.Tensor) or new.dim() != 4:
                raise FlashArgumentError(f"{where}: {name} must be 4-D (B, seqlen_new, Hkv, D)")
            if new.shape[0] != q.shape[0] or new.shape[2:] != cache.shape[2:] or (
                new.dtype != cache.dtype
            ) or new.shape[1] != k.shape[1]:  # fmt: skip
                raise FlashArgumentError(
                    f"{where}: {name} {tuple(new.shape)} {new.dtype} must be (B, seqlen_new, "
                    f"Hkv, D) with B = {q.shape[0]} and the cache's heads, head dim and dtype "
                    f"({name}_cache {tuple(cache.shape)} {cache.dtype})"
                )
    if rotary_cos is not None:
        if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape or (
            2 * rotary_cos.shape[1] > q.shape[-1]
        ):  # fmt: skip
            raise FlashArgumentError(
                f"{where}: rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2) "
                f"with rotary_dim <= head dim {q.shape[-1]}; got {tuple(rotary_cos.shape)} and "
                f"{tuple(rotary_sin.shape)}"
            )


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """FlashAttention's ``flash_attn_with_kvcache``: decoding and chunked prefill on a KV cache.

    q ``(B, Lq, H, D)``; ``k_cache``/``v_cache`` ``(B_cache, S_cache, Hkv, D)``, or a paged cache
    ``(num_pages, page_size, Hkv, D)`` read through ``block_table`` int32 ``(B, max_pages)``
    (any page size). ``k``/``v`` ``(B, seqlen_new, Hkv, D)``, when given, are written into the
    cache *in place* at positions ``cache_seqlens[b] + t`` (int or int32 ``(B,)``), after rotary
    embedding of k when ``rotary_cos``/``rotary_sin`` ``(seqlen_ro, rotary_dim / 2)`` are given;
    q is rotated at the same positions when causal or windowed, else every query at
    ``cache_seqlens[b]``. Batch ``b`` then attends to cache positions ``cache_leftpad[b] <= t <
    cache_seqlens[b] + seqlen_new`` of cache row ``cache_batch_idx[b]`` (default ``b``).
    ``num_splits`` sizes the split-KV decode (0: chosen by the kernel). No backward, as in
    FlashAttention. Returns ``out`` ``(B, Lq, H, D)``, or ``(out, softmax_lse (B, H, Lq))``.
    """
    where = "flash_attn_with_kvcache"
    left, right = _window(window_size, where)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32,
                                   device=q.device)  # fmt: skip
    _check_new_kv(where, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens)
    seqused = cache_seqlens
    if k is not None:
        seqused = cache_seqlens + k.shape[1]
        if seqused.dtype != cache_seqlens.dtype:
            seqused = seqused.to(cache_seqlens.dtype)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if _strided_last_dim(cache):  # it is written in place: a copy would lose the append
            raise FlashArgumentError(
                f"{where}: {name} must be contiguous in its last dim; got strides "
                f"{tuple(cache.stride())}"
            )
    if _strided_last_dim(q):
        q = q.contiguous()
    args = (
        None, None, 0, 0, seqused, cache_leftpad, cache_batch_idx, block_table, scale, causal,
        left, right, softcap, alibi_slopes, 0.0, None, None, num_splits,
    )  # fmt: skip
    try:  # every index checked before the cache is written
        check_flash_forward(q, k_cache, v_cache, *args, op=where)
    except FlashArgumentError as exc:
        raise _in_fa_names(exc) from None
    if rotary_cos is not None:
        per_token = causal or (left, right) != (-1, -1)  # else every query at cache_seqlens
        q = _rotated_queries(q, rotary_cos, rotary_sin, cache_seqlens, per_token,
                             rotary_interleaved)  # fmt: skip
    if k is not None:
        positions = cache_seqlens.long().view(-1, 1) + torch.arange(k.shape[1], device=q.device)
        if rotary_cos is not None:
            k = _rotary(k, rotary_cos, rotary_sin, positions, rotary_interleaved)
        _append(k_cache, v_cache, k, v, positions, cache_batch_idx, block_table)
    out, lse = run_flash_operator(q, k_cache, v_cache, *args)
    return (out, _fa_lse(lse)) if return_softmax_lse else out


def _rotated_queries(q, cos, sin, cache_seqlens, per_token: bool, interleaved: bool):
    start = cache_seqlens.long().view(-1, 1)
    offsets = torch.arange(q.shape[1], device=q.device) if per_token else q.new_zeros(
        q.shape[1], dtype=torch.long
    )  # fmt: skip
    return _rotary(q, cos, sin, start + offsets.view(1, -1), interleaved)


def _append(k_cache, v_cache, k, v, positions, cache_batch_idx, block_table) -> None:
    """Writes the new keys and values into the cache in place at ``positions`` ``(B, new)``."""
    if block_table is not None:
        page_size = k_cache.shape[1]
        pages = block_table.long().gather(1, positions // page_size)
        index = (pages, positions % page_size)
    else:
        rows = (
            cache_batch_idx.long()
            if cache_batch_idx is not None
            else torch.arange(positions.shape[0], device=positions.device)
        )
        index = (rows.view(-1, 1).expand_as(positions), positions)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)


def install_flash_attn_shim() -> types.ModuleType:
    """Makes ``import flash_attn`` and ``from flash_attn.flash_attn_interface import ...``
    resolve to this module's functions, for code that cannot change its import.

    Not done by default. Raises ``RuntimeError`` when a real ``flash_attn`` is already
    imported. Returns the ``flash_attn`` module object.
    """
    current = sys.modules.get("flash_attn")
    if current is not None and not getattr(current, "__aigc_ext_shim__", False):
        raise RuntimeError(
            "install_flash_attn_shim: a flash_attn package is already imported; the shim would "
            "shadow it"
        )
    package = types.ModuleType("flash_attn", "aigc_ext's FlashAttention-compatible functions")
    package.__aigc_ext_shim__ = True
    package.__path__ = []  # a package, so that flash_attn.flash_attn_interface imports
    for name in __all__[:-1]:
        setattr(package, name, globals()[name])
    package.flash_attn_interface = sys.modules[__name__]
    sys.modules["flash_attn"] = package
    sys.modules["flash_attn.flash_attn_interface"] = sys.modules[__name__]
    return package
