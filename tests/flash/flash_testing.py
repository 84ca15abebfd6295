"""Helpers of the FlashAttention tests: inputs, packing, and a naive dense oracle.

:func:`naive_dense` is written from the contract's text for the dense layout only, with the
whole ``(B, H, L, S)`` score tensor and explicit loops for the window: an oracle independent of
``aigc_ext.flash.reference`` (which works per sequence). The other layouts are tested by
reducing them to dense calls (one per sequence) that it can check.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from aigc_ext.flash import ops


def cpu_ready() -> bool:
    """Whether this build has the C++ flash operators, implemented."""
    if "cpu" not in ops.available_flash_backends():
        return False
    q = torch.zeros(1, 1, 1, 8)
    try:
        torch.ops.aigc_ext.flash_forward(q, q, q)
    except (NotImplementedError, RuntimeError) as exc:
        return "not implemented" not in str(exc).lower()
    return True


def triton_ready() -> bool:
    """Whether the Triton flash operators load here (a GPU, or CPU tensors under
    ``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        ops._load_triton()
    except Exception:
        return False
    return True


def flash_backends() -> list[str]:
    """The backends whose flash operators run here: reference always, cpu and triton when ready."""
    names = ["reference"]
    if cpu_ready():
        names.append("cpu")
    if triton_ready():
        names.append("triton")
    return names


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(shape, dtype=torch.float64, *, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Deterministic normal samples, drawn in float32 and cast (so every dtype sees the same
    numbers, rounded)."""
    t = torch.randn(tuple(shape), generator=generator(seed), dtype=torch.float32) * scale
    return t.to(dtype)


def cu_seqlens(lengths) -> torch.Tensor:
    """int32 cumulative lengths ``[0, l0, l0 + l1, ...]``."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32)


def window_mask(len_q: int, len_k: int, left: int, right: int, causal: bool) -> torch.Tensor:
    """Bool ``(L, S)``: query ``i`` sees key ``j`` (bottom-right alignment), by explicit loops."""
    if causal:
        right = 0
    mask = torch.zeros((len_q, len_k), dtype=torch.bool)
    for i in range(len_q):
        for j in range(len_k):
            diag = i + len_k - len_q
            ok = (left < 0 or j >= diag - left) and (right < 0 or j <= diag + right)
            mask[i, j] = ok
    return mask


def naive_dense(
    q,
    k,
    v,
    *,
    scale=1.0,
    causal=False,
    window=(-1, -1),
    softcap=0.0,
    alibi=None,
    sinks=None,
    keep=None,
    dropout_p=0.0,
    attn_mask=None,
):
    """Dense ``(out, lse)`` from the contract's text: q ``(B, L, H, D)``, k/v ``(B, S, Hkv, D)``;
    ``keep`` a bool ``(B, H, L, S)`` dropout mask; ``attn_mask`` bool (True = takes part) or
    float (added), broadcast to ``(B, H, L, S)``."""
    batch, len_q, heads, _ = q.shape
    len_k, heads_kv = k.shape[1], k.shape[2]
    rep = heads // heads_kv
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(rep, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(rep, dim=2).transpose(1, 2)
    x = qt @ kt.transpose(-1, -2) * scale
    if softcap > 0:
        x = softcap * torch.tanh(x / softcap)
    if alibi is not None:
        slopes = alibi.to(x.dtype)
        slopes = slopes.expand(batch, heads) if slopes.dim() == 1 else slopes
        i = torch.arange(len_q).view(-1, 1)
        j = torch.arange(len_k).view(1, -1)
        x = x - slopes[:, :, None, None] * (i + len_k - len_q - j).abs().to(x.dtype)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        x = x + attn_mask.to(x.dtype)
    allowed = window_mask(len_q, len_k, window[0], window[1], causal)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    x = x.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        col = sinks.to(x.dtype).view(1, heads, 1, 1).expand(batch, heads, len_q, 1)
        x = torch.cat([x, col], dim=-1)
    m = x.amax(dim=-1, keepdim=True) if x.shape[-1] else x.new_zeros((*x.shape[:-1], 1))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    total = e.sum(-1, keepdim=True)
    p = torch.where(total > 0, e / total, torch.zeros_like(e))[..., :len_k]
    lse = (m + torch.log(total)).squeeze(-1)  # log 0 = -inf for empty rows
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    out = (p @ vt).transpose(1, 2)
    return out, lse


def paged_cache(
    cache: torch.Tensor, page_size: int, seed: int = 0, *, spare: int = 2, fill: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache ``(B, S, H, D)`` cut into pages of ``page_size``, shuffled (by ``seed``) into a
    pool with ``spare`` unused pages, and the int32 block table ``(B, pages per sequence)`` that
    reads it back. Positions past S and the spare pages hold ``fill``."""
    batch, length = cache.shape[:2]
    per_seq = -(-length // page_size)
    padded = torch.full((batch, per_seq * page_size, *cache.shape[2:]), fill, dtype=cache.dtype)
    padded[:, :length] = cache
    n = batch * per_seq
    order = torch.randperm(n + spare, generator=torch.Generator().manual_seed(seed))[:n]
    pool = torch.full((n + spare, page_size, *cache.shape[2:]), fill, dtype=cache.dtype)
    pool[order] = padded.reshape(n, page_size, *cache.shape[2:])
    return pool, order.view(batch, per_seq).to(torch.int32)
