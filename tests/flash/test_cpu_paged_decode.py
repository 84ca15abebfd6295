"""The CPU decoding path on a paged cache: blocks of keys span pages, each page read in place.

A decoding block (512 keys) covers several pages of a paged cache; the steps that touch memory
(score products, key/value conversion, P V) go page by page. Pages that start on a 16-key panel
are packed side by side into one micro-kernel product, others take a product each. Every
instruction set this build carries, the bf16 dot-product path, the fused P V of one or two rows
and the micro-kernel scores of more rows are checked against the same call on the contiguous
cache, over caches longer than a block, with page sizes that are and are not multiples of 16.
"""

from __future__ import annotations

import pytest
import torch
from flash_testing import cpu_ready, naive_dense, paged_cache, rand
from sdpa_testing import cpu_isa

from aigc_ext import flash_attn_interface as fa
from aigc_ext.testing import check_error_rule

pytestmark = pytest.mark.skipif(not cpu_ready(), reason="no C++ flash op")

ISAS = ["default", "avx2", "avx512"]
nan = float("nan")  # in the spare pages and past each sequence: a read of them would show


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 6, 8])  # query heads per KV head
@pytest.mark.parametrize("page_size", [16, 48, 24, 1000])
@pytest.mark.parametrize("d", [64, 40])  # 40: value rows that do not fill 16-column panels
def test_paged_decode_equals_the_contiguous_cache(isa, dtype, group, page_size, d):
    hkv, length = 2, 1300  # three blocks, the last one partial
    q = rand((2, 1, hkv * group, d), dtype, seed=1)
    k_cache = rand((2, length, hkv, d), dtype, seed=2)
    v_cache = rand((2, length, hkv, d), dtype, seed=3)
    pool_k, table = paged_cache(k_cache, page_size, seed=page_size, spare=3, fill=nan)
    pool_v, _ = paged_cache(v_cache, page_size, seed=page_size, spare=3, fill=nan)
    seqlens = torch.tensor([length, 777], dtype=torch.int32)
    kw = dict(cache_seqlens=seqlens, causal=True, num_splits=2, return_softmax_lse=True)
    with cpu_isa(isa):
        out_p, lse_p = fa.flash_attn_with_kvcache(q, pool_k, pool_v, block_table=table, **kw)
        out_c, lse_c = fa.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    assert torch.isfinite(out_p).all()  # no key beyond a sequence (the NaN pages) was read
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out_p.float(), out_c.float(), atol=tol, rtol=0)
    torch.testing.assert_close(lse_p, lse_c, atol=2e-6, rtol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4])  # fused P V (one or two rows) and the GEMM paths
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("mods", [{}, {"softcap": 20.0, "window_size": (700, 0)}])
def test_the_cache_layout_leaves_every_bit(isa, dtype, group, num_splits, mods):
    # A (B, S, H, D) cache holds every KV head in each key row: a decoding task takes all heads
    # of a batch row, one block of keys at a time. A head-major cache (the same values through
    # a (B, H, S, D) tensor) takes a task per head. Each head's work, split and block order
    # stay the same, so the outputs and logsumexps must agree to the bit.
    hkv, length = 3, 1300
    q = rand((2, 1, hkv * group, 64), dtype, seed=4)
    k_rows = rand((2, length, hkv, 64), dtype, seed=5)
    v_rows = rand((2, length, hkv, 64), dtype, seed=6)
    k_heads = k_rows.transpose(1, 2).contiguous().transpose(1, 2)
    v_heads = v_rows.transpose(1, 2).contiguous().transpose(1, 2)
    assert k_heads.stride(2) > k_heads.stride(1) and torch.equal(k_heads, k_rows)
    seqlens = torch.tensor([length, 777], dtype=torch.int32)
    kw = dict(cache_seqlens=seqlens, causal=True, num_splits=num_splits, **mods)
    with cpu_isa(isa):
        out_r, lse_r = fa.flash_attn_with_kvcache(q, k_rows, v_rows, return_softmax_lse=True, **kw)
        out_h, lse_h = fa.flash_attn_with_kvcache(
            q, k_heads, v_heads, return_softmax_lse=True, **kw
        )
    assert torch.isfinite(out_r).all()
    assert torch.equal(out_r, out_h)
    assert torch.equal(lse_r, lse_h)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [(1, 1), (2, 1), (3, 1), (4, 1), (2, 2), (1, 5)])  # (group, L)
@pytest.mark.parametrize("d", [64, 40, 128])
def test_bf16_decoding_of_a_few_rows_against_fp64(isa, rows, d):
    # Up to four rows of a GQA group (group x L) take P V straight from the bf16 values, more
    # rows (5) widen them for a product; either way within twice the error of the same attention
    # computed in bf16 by the textbook formula.
    group, lq = rows
    hkv, length = 2, 1100
    q = rand((2, lq, hkv * group, d), torch.bfloat16, seed=7)
    k = rand((2, length, hkv, d), torch.bfloat16, seed=8)
    v = rand((2, length, hkv, d), torch.bfloat16, seed=9)
    with cpu_isa(isa):
        out = fa.flash_attn_with_kvcache(q, k, v, causal=True)
    kw = dict(scale=d**-0.5, causal=True)
    ref, _ = naive_dense(q.double(), k.double(), v.double(), **kw)
    base, _ = naive_dense(q, k, v, **kw)
    # causal with L queries at the end of the cache: row i sees keys up to length - L + i
    result = check_error_rule(out.double(), ref, base.double())
    assert result.ok, result.describe(f"bf16 decode, group {group}, L {lq}, D {d}, {isa}")
