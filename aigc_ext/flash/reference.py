"""The FlashAttention operator contract in plain PyTorch: the oracle of every fused backend.

:func:`flash_reference` computes what ``flash_forward`` computes (``docs/flash-contract.md``):
dense, variable-length and KV-cache layouts (``seqused_k``, ``leftpad_k``, ``kv_batch_idx``,
paged ``block_table``), softcap, ALiBi, windows with bottom-right causal alignment, attention
sinks and the contract's counter-based dropout. It works one sequence at a time with every head
at once, materialising the ``(H, L, S)`` scores, in the inputs' dtype (tests pass float64
copies), and is differentiable by autograd in q, k, v and sinks.

:func:`flash_reference_backward` is the contract's backward written out (``P`` rebuilt from
``lse``, ``D = rowsum(dO * O)``, the dropout mask regenerated): what ``flash_backward``
computes, checked against autograd through :func:`flash_reference`.

Each function validates its arguments first (:mod:`aigc_ext.flash.checks`, values included),
so it also serves to check a call's arguments before they reach a kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aigc_ext.flash.checks import check_flash_backward, check_flash_forward, lse_dtype
from aigc_ext.flash.philox import dropout_keep_mask

__all__ = [
    "dropout_keep_mask",
    "flash_reference",
    "flash_reference_backward",
    "flash_reference_probs",
    "lse_dtype",
]


@dataclass(frozen=True)
class _Options:
    """The masking and scoring options of one call, resolved (``causal`` -> ``right = 0``)."""

    scale: float
    left: int
    right: int
    softcap: float
    alibi_slopes: torch.Tensor | None
    dropout_p: float
    rng_state: torch.Tensor | None
    sinks: torch.Tensor | None
    heads_q: int
    attn_mask: torch.Tensor | None  # expanded to (B, Hq, Lq, S), or None


@dataclass(frozen=True)
class _Sequence:
    """Where sequence ``b`` lives: its query rows and the key rows it attends to."""

    b: int
    q_index: int | slice  # into q's dim 0: the batch row (dense) or the packed rows (varlen)
    kv_first: int  # dense/varlen: the rows k[kv_row][kv_first:kv_first + len_k] (kv_row None:
    kv_row: int | None  # packed rows k[kv_first:...]); paged: cache positions from kv_first
    len_q: int
    len_k: int


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(x) for x in t.tolist()]


def _sequences(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, kv_batch_idx,
               block_table) -> list[_Sequence]:  # fmt: skip
    """The sequences of a call, from its layout (the arguments are valid: see checks)."""
    if cu_seqlens_q is not None:  # packed: no cache arguments
        cu_q, cu_k = _ints(cu_seqlens_q), _ints(cu_seqlens_k)
        return [
            _Sequence(
                b,
                slice(cu_q[b], cu_q[b + 1]),
                cu_k[b],
                None,
                cu_q[b + 1] - cu_q[b],
                cu_k[b + 1] - cu_k[b],
            )
            for b in range(len(cu_q) - 1)
        ]
    used, left, rows = _ints(seqused_k), _ints(leftpad_k), _ints(kv_batch_idx)
    paged = block_table is not None
    capacity = block_table.shape[1] * k.shape[1] if paged else k.shape[1]
    out = []
    for b in range(q.shape[0]):
        first = left[b] if left is not None else 0
        end = used[b] if used is not None else capacity
        row = None if paged else (rows[b] if rows is not None else b)
        out.append(_Sequence(b, b, first, row, q.shape[1], end - first))
    return out


def _keys(k: torch.Tensor, seq: _Sequence, block_table: torch.Tensor | None) -> torch.Tensor:
    """The ``(len_k, Hkv, D)`` keys (or values) of ``seq``; paged caches are gathered."""
    if block_table is None:
        rows = k if seq.kv_row is None else k[seq.kv_row]
        return rows[seq.kv_first : seq.kv_first + seq.len_k]
    page_size = k.shape[1]
    pos = torch.arange(seq.kv_first, seq.kv_first + seq.len_k, device=k.device)
    pages = block_table[seq.b].to(device=k.device, dtype=torch.long)[pos // page_size]
    return k[pages, pos % page_size]


def _options(q, k, scale, causal, window_left, window_right, softcap, alibi, p, rng, sinks,
             attn_mask) -> _Options:  # fmt: skip
    heads_q = q.shape[-2]
    if attn_mask is not None:
        attn_mask = attn_mask.expand(q.shape[0], heads_q, q.shape[1], k.shape[1])
    return _Options(
        scale=float(scale),
        left=int(window_left),
        right=0 if causal else int(window_right),
        softcap=float(softcap),
        alibi_slopes=alibi,
        dropout_p=float(p),
        rng_state=rng,
        sinks=sinks,
        heads_q=heads_q,
        attn_mask=attn_mask,
    )


def _allowed(len_q: int, len_k: int, opts: _Options, device) -> torch.Tensor:
    """Bool ``(L, S)``: key ``j`` takes part for query ``i`` (the window, bottom-right)."""
    i = torch.arange(len_q, device=device).view(-1, 1)
    j = torch.arange(len_k, device=device).view(1, -1)
    diag = i + (len_k - len_q)
    allowed = torch.ones((len_q, len_k), dtype=torch.bool, device=device)
    if opts.left >= 0:
        allowed &= j >= diag - opts.left
    if opts.right >= 0:
        allowed &= j <= diag + opts.right
    return allowed


def _scores(qb, kb, seq: _Sequence, opts: _Options):
    """``(x_raw, x, allowed)``: the scaled scores ``(H, L, S)`` before and after softcap,
    ALiBi and a float ``attn_mask`` (before the window), and the keys that take part: the
    window ``(L, S)``, and with a bool ``attn_mask`` ``(H, L, S)``."""
    groups = opts.heads_q // kb.shape[1]
    k_rep = kb.repeat_interleave(groups, dim=1) if groups > 1 else kb
    raw = torch.einsum("lhd,shd->hls", qb, k_rep) * opts.scale
    x = raw
    if opts.softcap > 0:
        x = opts.softcap * torch.tanh(x / opts.softcap)
    if opts.alibi_slopes is not None:
        slopes = opts.alibi_slopes
        slopes = (slopes[seq.b] if slopes.dim() == 2 else slopes).to(device=x.device, dtype=x.dtype)
        i = torch.arange(seq.len_q, device=x.device).view(-1, 1)
        j = torch.arange(seq.len_k, device=x.device).view(1, -1)
        dist = (i + (seq.len_k - seq.len_q) - j).abs().to(x.dtype)
        x = x - slopes.view(-1, 1, 1) * dist
    allowed = _allowed(seq.len_q, seq.len_k, opts, x.device)
    if opts.attn_mask is not None:
        mask = opts.attn_mask[seq.b].to(x.device)
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            x = x + mask.to(x.dtype)
    return raw, x, allowed


def _keep(seq: _Sequence, opts: _Options, device) -> torch.Tensor | None:
    """The dropout keep mask ``(H, L, S)`` of ``seq``, or None without dropout."""
    if opts.dropout_p <= 0:
        return None
    heads = range(opts.heads_q)
    return dropout_keep_mask(
        opts.rng_state, seq.b, heads, seq.len_q, seq.len_k, opts.dropout_p, opts.heads_q,
        device=device,
    )  # fmt: skip


def _probabilities(qb, kb, seq: _Sequence, opts: _Options):
    """One sequence's softmax ``p`` ``(H, L, S)`` (before dropout) and ``lse`` ``(H, L)``."""
    _, x, allowed = _scores(qb, kb, seq, opts)
    x = x.masked_fill(~allowed, -math.inf)
    if opts.sinks is not None:
        sink = opts.sinks.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)
        x = torch.cat([x, sink.expand(-1, seq.len_q, 1)], dim=-1)
        empty = None  # the sink is always there
    else:
        empty = (x == -math.inf).all(dim=-1, keepdim=True)  # (H, L, 1): rows with no key
        if not bool(empty.any()):
            empty = None
    if empty is not None:  # keep -inf away from logsumexp's backward (0 * nan)
        x = x.masked_fill(empty, 0.0)
    lse = torch.logsumexp(x, dim=-1)
    p = torch.exp(x - lse.unsqueeze(-1))[..., : seq.len_k]
    if empty is not None:
        p = p.masked_fill(empty, 0.0)
        lse = lse.masked_fill(empty.squeeze(-1), -math.inf)
    return p, lse


def _attend(qb, kb, vb, seq: _Sequence, opts: _Options):
    """One sequence's forward: ``out`` ``(L, H, Dv)`` and ``lse`` ``(H, L)``."""
    p, lse = _probabilities(qb, kb, seq, opts)
    keep = _keep(seq, opts, p.device)
    if keep is not None:
        p = p * keep / (1.0 - opts.dropout_p)
    groups = opts.heads_q // vb.shape[1]
    v_rep = vb.repeat_interleave(groups, dim=1) if groups > 1 else vb
    return torch.einsum("hls,shd->lhd", p, v_rep), lse


def flash_reference(
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
    """``flash_forward`` in plain PyTorch: ``(out, lse)`` in the contract's layouts.

    Arguments and layouts are the operator's (``docs/flash-contract.md``). Computes in the
    inputs' dtype (``alibi_slopes`` and ``sinks`` are cast to it; float64 ones are accepted
    too, for float64 gradient checks); ``lse`` is float32, or float64 for float64 inputs.
    ``max_seqlen_*`` and ``num_splits`` only size a kernel's work: they are validated, not used.
    """
    check_flash_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, leftpad_k,
        kv_batch_idx, block_table, scale, causal, window_left, window_right, softcap,
        alibi_slopes, dropout_p, rng_state, sinks, num_splits, attn_mask, check_values=True,
        float64_params=True, op="flash_reference",
    )  # fmt: skip
    opts = _options(
        q, k, scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
        rng_state, sinks, attn_mask,
    )  # fmt: skip
    seqs = _sequences(
        q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, kv_batch_idx, block_table
    )
    outs, lses = [], []
    for seq in seqs:
        qb = q[seq.q_index]
        kb, vb = _keys(k, seq, block_table), _keys(v, seq, block_table)
        out_b, lse_b = _attend(qb, kb, vb, seq, opts)
        outs.append(out_b)
        lses.append(lse_b)
    heads, dv = q.shape[-2], v.shape[-1]
    lse_t = lse_dtype(q.dtype)
    if cu_seqlens_q is None:
        if not seqs:
            out = q.new_zeros((0, q.shape[1], heads, dv))
            return out, q.new_zeros((0, heads, q.shape[1]), dtype=lse_t)
        return torch.stack(outs), torch.stack(lses).to(lse_t)
    used = sum(seq.len_q for seq in seqs)
    tail = q.shape[0] - used  # rows past cu_seqlens_q[-1]: zeros, lse -inf
    outs.append(q.new_zeros((tail, heads, dv)))
    lses.append(q.new_full((heads, tail), -math.inf))
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1).to(lse_t)


def flash_reference_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          **kwargs) -> torch.Tensor:  # fmt: skip
    """The attention probabilities of a call (the arguments of :func:`flash_reference`):
    ``(B, Hq, Lq, S)``, per sequence ``b`` in ``[:, :, :Lq_b, :S_b]`` and zero elsewhere, as
    FlashAttention's ``return_attn_probs`` reports them: the softmax before dropout, negated
    where dropout drops the score (a dropped zero stays zero). For tests and debugging: it
    materialises every score."""
    check_flash_forward(q, k, v, **kwargs, check_values=True, float64_params=True,
                        op="flash_reference_probs")  # fmt: skip
    get = kwargs.get
    opts = _options(
        q, k, get("scale", 1.0), get("causal", False), get("window_left", -1),
        get("window_right", -1), get("softcap", 0.0), get("alibi_slopes"), get("dropout_p", 0.0),
        get("rng_state"), get("sinks"), get("attn_mask"),
    )  # fmt: skip
    table = get("block_table")
    seqs = _sequences(
        q, k, get("cu_seqlens_q"), get("cu_seqlens_k"), get("seqused_k"), get("leftpad_k"),
        get("kv_batch_idx"), table,
    )  # fmt: skip
    len_q = max((seq.len_q for seq in seqs), default=0)
    len_k = max((seq.len_k for seq in seqs), default=0)
    probs = q.new_zeros((len(seqs), opts.heads_q, len_q, len_k))
    for seq in seqs:
        p, _ = _probabilities(q[seq.q_index], _keys(k, seq, table), seq, opts)
        keep = _keep(seq, opts, p.device)
        if keep is not None:
            p = torch.where(keep, p, -p)
        probs[seq.b, :, : seq.len_q, : seq.len_k] = p
    return probs


def flash_reference_backward(
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
    """``flash_backward`` in plain PyTorch: ``(grad_q, grad_k, grad_v)``.

    The probabilities are rebuilt from the forward's ``lse`` (which includes a sink when the
    forward had one, so sinks need no argument here), ``D_i = rowsum(dO_i * O_i)`` and
    ``dS = P * (dP - D)``, with the dropout mask regenerated from ``rng_state`` and the softcap's
    derivative ``1 - tanh^2`` applied before the scale.
    """
    check_flash_backward(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state,
        attn_mask, check_values=True,
        float64_params=True, op="flash_reference_backward",
    )  # fmt: skip
    opts = _options(
        q, k, scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
        rng_state, None, attn_mask,
    )  # fmt: skip
    seqs = _sequences(q, k, cu_seqlens_q, cu_seqlens_k, None, None, None, None)
    grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    varlen = cu_seqlens_q is not None
    for seq in seqs:
        q_rows = seq.q_index
        k_rows = slice(seq.kv_first, seq.kv_first + seq.len_k) if varlen else seq.b
        qb, kb, vb = q[q_rows], k[k_rows], v[k_rows]
        dob, ob = grad_out[q_rows], out[q_rows]
        lse_b = (lse[:, q_rows] if varlen else lse[seq.b]).to(q.dtype)  # (H, L)
        dq, dk, dv = _attend_backward(qb, kb, vb, ob, dob, lse_b, seq, opts)
        grad_q[q_rows] = dq
        grad_k[k_rows] = dk
        grad_v[k_rows] = dv
    return grad_q, grad_k, grad_v


def _attend_backward(qb, kb, vb, ob, dob, lse_b, seq: _Sequence, opts: _Options):
    """One sequence's gradients ``(dq (L, H, D), dk (S, Hkv, D), dv (S, Hkv, Dv))``."""
    heads, heads_kv = opts.heads_q, kb.shape[1]
    groups = heads // heads_kv
    raw, x, allowed = _scores(qb, kb, seq, opts)
    finite = torch.isfinite(lse_b).unsqueeze(-1)  # rows that attended to something
    p = torch.exp(x - torch.where(finite, lse_b.unsqueeze(-1), 0.0))
    p = torch.where(allowed & finite, p, 0.0)
    keep = _keep(seq, opts, p.device)
    p_used = p if keep is None else p * keep / (1.0 - opts.dropout_p)
    v_rep = vb.repeat_interleave(groups, dim=1) if groups > 1 else vb
    k_rep = kb.repeat_interleave(groups, dim=1) if groups > 1 else kb
    dv_rep = torch.einsum("hls,lhd->shd", p_used, dob)
    dp = torch.einsum("lhd,shd->hls", dob, v_rep)
    if keep is not None:
        dp = dp * keep / (1.0 - opts.dropout_p)
    delta = (dob * ob).sum(-1).transpose(0, 1).unsqueeze(-1)  # (H, L, 1)
    ds = p * (dp - delta)
    if opts.softcap > 0:
        ds = ds * (1.0 - torch.tanh(raw / opts.softcap) ** 2)
    ds = ds * opts.scale
    dq = torch.einsum("hls,shd->lhd", ds, k_rep)
    dk_rep = torch.einsum("hls,lhd->shd", ds, qb)
    dk = dk_rep.reshape(seq.len_k, heads_kv, groups, kb.shape[-1]).sum(2)
    dv = dv_rep.reshape(seq.len_k, heads_kv, groups, vb.shape[-1]).sum(2)
    return dq, dk, dv
