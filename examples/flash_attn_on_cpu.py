"""FlashAttention code on a CPU: the snippet below is written for ``flash_attn``; only its import
line changed. Run: ``python examples/flash_attn_on_cpu.py``.

It calls ``flash_attn_func`` (causal, GQA, a sliding window), ``flash_attn_varlen_func`` (a
packed batch of three sequences, softcap) and ``flash_attn_with_kvcache`` (one decoding step
appending to a paged cache through a block table), prints what each returns, and compares each
result with the plain PyTorch reference in float64 (``aigc_ext.flash.reference``).
"""

from __future__ import annotations

import torch

from aigc_ext.flash.reference import flash_reference

# from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from aigc_ext.flash_attn_interface import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)


def flash_attention_snippet(dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple]:
    """A FlashAttention-style program: (inputs, output) of each call, by name."""
    torch.manual_seed(0)
    batch, heads, kv_heads, head_dim = 2, 8, 2, 64

    # 1. Dense batch: causal self-attention with grouped-query heads and a sliding window.
    q = torch.randn(batch, 128, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, 128, kv_heads, head_dim, dtype=dtype)
    v = torch.randn(batch, 128, kv_heads, head_dim, dtype=dtype)
    out = flash_attn_func(q, k, v, causal=True, window_size=(32, 0))

    # 2. Padding-free batch: three sequences packed into one (total, heads, head_dim) tensor.
    lengths = [37, 100, 5]
    cu_seqlens = torch.tensor([0, 37, 137, 142], dtype=torch.int32)
    qp = torch.randn(sum(lengths), heads, head_dim, dtype=dtype)
    kp = torch.randn(sum(lengths), kv_heads, head_dim, dtype=dtype)
    vp = torch.randn(sum(lengths), kv_heads, head_dim, dtype=dtype)
    out_varlen = flash_attn_varlen_func(
        qp, kp, vp, cu_seqlens, cu_seqlens, max(lengths), max(lengths), causal=True, softcap=30.0
    )

    # 3. One decoding step on a paged KV cache: pages of 16 positions, handed out by a table.
    page_size, pages_per_seq = 16, 8
    k_cache = torch.randn(batch * pages_per_seq, page_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.randn(batch * pages_per_seq, page_size, kv_heads, head_dim, dtype=dtype)
    block_table = torch.randperm(batch * pages_per_seq).view(batch, pages_per_seq).int()
    cache_seqlens = torch.tensor([70, 113], dtype=torch.int32)  # positions already filled
    q_step = torch.randn(batch, 1, heads, head_dim, dtype=dtype)
    k_step = torch.randn(batch, 1, kv_heads, head_dim, dtype=dtype)
    v_step = torch.randn(batch, 1, kv_heads, head_dim, dtype=dtype)
    cache_in = (k_cache.clone(), v_cache.clone())
    out_step, lse_step = flash_attn_with_kvcache(
        q_step, k_cache, v_cache, k_step, v_step, cache_seqlens=cache_seqlens,
        block_table=block_table, causal=True, return_softmax_lse=True,
    )  # fmt: skip
    return {
        "flash_attn_func": ((q, k, v), out),
        "flash_attn_varlen_func": ((qp, kp, vp, cu_seqlens), out_varlen),
        "flash_attn_with_kvcache": (
            (q_step, *cache_in, k_step, v_step, cache_seqlens, block_table, k_cache),
            (out_step, lse_step),
        ),
    }


def reference_results(calls: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The same calls through the float64 reference (the oracle of aigc_ext's kernels)."""
    d = torch.float64
    (q, k, v), _ = calls["flash_attn_func"]
    dense, _ = flash_reference(q.to(d), k.to(d), v.to(d), scale=64**-0.5, causal=True,
                               window_left=32)  # fmt: skip
    (qp, kp, vp, cu), _ = calls["flash_attn_varlen_func"]
    packed, _ = flash_reference(qp.to(d), kp.to(d), vp.to(d), cu, cu, 100, 100, scale=64**-0.5,
                                causal=True, softcap=30.0)  # fmt: skip
    (q_step, k_cache, v_cache, k_step, v_step, seqlens, table, _), _ = calls[
        "flash_attn_with_kvcache"
    ]
    k_cache, v_cache = k_cache.to(d), v_cache.to(d)
    page = table.long()[torch.arange(2), seqlens.long() // 16]  # where the new token goes
    k_cache[page, seqlens.long() % 16] = k_step[:, 0].to(d)
    v_cache[page, seqlens.long() % 16] = v_step[:, 0].to(d)
    step, _ = flash_reference(q_step.to(d), k_cache, v_cache, seqused_k=seqlens + 1,
                              block_table=table, scale=64**-0.5, causal=True)  # fmt: skip
    return {"flash_attn_func": dense, "flash_attn_varlen_func": packed,
            "flash_attn_with_kvcache": step}  # fmt: skip


def main() -> None:
    calls = flash_attention_snippet()
    reference = reference_results(calls)
    for name, (_, result) in calls.items():
        out = result[0] if isinstance(result, tuple) else result
        err = (out.double() - reference[name]).abs().max().item()
        extra = f", softmax_lse {tuple(result[1].shape)}" if isinstance(result, tuple) else ""
        print(f"{name:24s} out {tuple(out.shape)} {out.dtype}{extra}; out[0, 0, :4] = "
              f"{[round(x, 4) for x in out.reshape(-1, out.shape[-1])[0, :4].tolist()]}; "
              f"max |out - reference_fp64| = {err:.2e}")  # fmt: skip
    (*_, cache_after), _ = calls["flash_attn_with_kvcache"]
    (_, cache_before, *_), _ = calls["flash_attn_with_kvcache"]
    changed = (cache_after != cache_before).any(dim=(1, 2, 3)).nonzero().flatten().tolist()
    print(f"k_cache pages written in place by the decoding step: {changed}")


if __name__ == "__main__":
    main()
