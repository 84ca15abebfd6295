"""``aigc_ext.flash_attn_interface``: FlashAttention 2.8's functions, signatures, layouts and
return values, checked against the reference (float64 inputs, so the comparisons are tight)."""

from __future__ import annotations

import inspect
import math
import sys

import pytest
import torch
from flash_testing import cu_seqlens, paged_cache, rand

from aigc_ext import flash_attn_interface as fa
from aigc_ext.flash.checks import FlashArgumentError, FlashTypeError
from aigc_ext.flash.reference import dropout_keep_mask, flash_reference

F64 = torch.float64
TOL = dict(atol=1e-9, rtol=0)

# FlashAttention 2.8.3's signatures: (name, default) in positional order.
COMMON = [
    ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
    ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False),
    ("return_attn_probs", False),
]  # fmt: skip
REQ = inspect.Parameter.empty
SIGNATURES = {
    "flash_attn_qkvpacked_func": [("qkv", REQ), *COMMON],
    "flash_attn_kvpacked_func": [("q", REQ), ("kv", REQ), *COMMON],
    "flash_attn_func": [("q", REQ), ("k", REQ), ("v", REQ), *COMMON],
    "flash_attn_varlen_qkvpacked_func": [
        ("qkv", REQ), ("cu_seqlens", REQ), ("max_seqlen", REQ), *COMMON,
    ],
    "flash_attn_varlen_kvpacked_func": [
        ("q", REQ), ("kv", REQ), ("cu_seqlens_q", REQ), ("cu_seqlens_k", REQ),
        ("max_seqlen_q", REQ), ("max_seqlen_k", REQ), *COMMON,
    ],
    "flash_attn_varlen_func": [
        ("q", REQ), ("k", REQ), ("v", REQ), ("cu_seqlens_q", REQ), ("cu_seqlens_k", REQ),
        ("max_seqlen_q", REQ), ("max_seqlen_k", REQ), *COMMON, ("block_table", None),
    ],
    "flash_attn_with_kvcache": [
        ("q", REQ), ("k_cache", REQ), ("v_cache", REQ), ("k", None), ("v", None),
        ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
        ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
        ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
        ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False),
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", SIGNATURES)
def test_signatures_are_flash_attentions(name):
    params = list(inspect.signature(getattr(fa, name)).parameters.values())
    assert [(p.name, p.default) for p in params] == SIGNATURES[name]
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)


def dense(b=2, lq=7, lk=9, hq=4, hkv=2, d=16, grad=False):
    tensors = (
        rand((b, lq, hq, d), seed=1),
        rand((b, lk, hkv, d), seed=2),
        rand((b, lk, hkv, d), seed=3),
    )
    return [t.requires_grad_(grad) for t in tensors]


def test_flash_attn_func_options_and_return_values():
    q, k, v = dense()
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    out = fa.flash_attn_func(q, k, v, 0.0, None, True, (3, 0), 2.5, slopes)
    ref, _ = flash_reference(
        q, k, v, scale=16**-0.5, causal=True, window_left=3, softcap=2.5, alibi_slopes=slopes
    )
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7, 4, 16)
    torch.testing.assert_close(out, ref, **TOL)
    out2, lse, probs = fa.flash_attn_func(q, k, v, softmax_scale=0.3, return_attn_probs=True)
    ref2, ref_lse2 = flash_reference(q, k, v, scale=0.3)
    torch.testing.assert_close(out2, ref2, **TOL)
    torch.testing.assert_close(lse, ref_lse2, **TOL)
    assert lse.shape == (2, 4, 7) and probs.numel() == 0  # no dropout: no probabilities


def test_lse_of_an_empty_row_is_plus_inf():
    q, k, v = dense(lq=6, lk=3)
    _, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert bool((lse[:, :, :3] == math.inf).all()) and bool(torch.isfinite(lse[:, :, 3:]).all())


def test_attn_probs_with_dropout_encode_the_mask():
    q, k, v = dense(lq=5, lk=6)
    torch.manual_seed(7)
    out, _, probs = fa.flash_attn_func(q, k, v, 0.4, return_attn_probs=True)
    torch.manual_seed(7)
    rng = fa.new_rng_state()
    ref, _ = flash_reference(q, k, v, scale=0.25, dropout_p=0.4, rng_state=rng)
    torch.testing.assert_close(out, ref, **TOL)
    assert probs.shape == (2, 4, 128, 128) and probs.dtype == F64
    p, _ = flash_reference(q, k, torch.eye(6, dtype=F64).view(1, 6, 1, 6).expand(2, 6, 2, 6)
                           .contiguous(), scale=0.25)  # fmt: skip
    p = p.permute(0, 2, 1, 3)  # (B, H, L, S): the probabilities themselves
    keep = torch.stack([dropout_keep_mask(rng, b, range(4), 5, 6, 0.4, 4) for b in range(2)])
    torch.testing.assert_close(probs[:, :, :5, :6], torch.where(keep, p, -p), **TOL)
    assert bool((probs[:, :, 5:] == 0).all()) and bool((probs[:, :, :, 6:] == 0).all())


def test_dropout_is_reproducible_under_manual_seed():
    q, k, v = dense()
    torch.manual_seed(1)
    a = fa.flash_attn_func(q, k, v, dropout_p=0.5)
    b = fa.flash_attn_func(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    assert torch.equal(fa.flash_attn_func(q, k, v, dropout_p=0.5), a)
    assert not torch.equal(a, b)


def test_packed_variants_equal_the_unpacked_with_gradients():
    qkv = rand((2, 8, 3, 4, 16), seed=1).requires_grad_(True)
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True, softcap=3.0)
    q, k, v = (qkv.detach()[:, :, i].clone().requires_grad_(True) for i in range(3))
    ref = fa.flash_attn_func(q, k, v, causal=True, softcap=3.0)
    torch.testing.assert_close(out, ref, **TOL)
    grad = rand(out.shape, seed=5)
    (g_packed,) = torch.autograd.grad(out, [qkv], grad)
    g = torch.autograd.grad(ref, [q, k, v], grad)
    torch.testing.assert_close(g_packed, torch.stack(g, dim=2), **TOL)

    q = rand((2, 5, 4, 16), seed=2).requires_grad_(True)
    kv = rand((2, 8, 2, 2, 16), seed=3).requires_grad_(True)  # GQA: 2 key/value heads
    out = fa.flash_attn_kvpacked_func(q, kv, window_size=(2, 1))
    k, v = (kv.detach()[:, :, i].clone().requires_grad_(True) for i in range(2))
    ref = fa.flash_attn_func(q.detach(), k, v, window_size=(2, 1))
    torch.testing.assert_close(out, ref, **TOL)
    (g_kv,) = torch.autograd.grad(out, [kv], grad[:, :5])
    torch.testing.assert_close(g_kv, torch.stack(torch.autograd.grad(ref, [k, v], grad[:, :5]),
                                                  dim=2), **TOL)  # fmt: skip


def test_varlen_variants():
    lens_q, lens_k = [3, 0, 6], [4, 2, 6]
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = rand((9, 4, 16), seed=1)
    k, v = rand((12, 2, 16), seed=2), rand((12, 2, 16), seed=3)
    out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cq, ck, 6, 6, causal=True,
                                                return_attn_probs=True)  # fmt: skip
    ref, ref_lse = flash_reference(q, k, v, cq, ck, 6, 6, scale=0.25, causal=True)
    torch.testing.assert_close(out, ref, **TOL)
    assert lse.shape == (4, 9) and probs.numel() == 0
    torch.testing.assert_close(lse, torch.where(ref_lse == -math.inf, math.inf, ref_lse), **TOL)

    kv = torch.stack([k, v], dim=1)
    out_kv = fa.flash_attn_varlen_kvpacked_func(q, kv, cq, ck, 6, 6, causal=True)
    torch.testing.assert_close(out_kv, ref, **TOL)

    lens = [5, 1, 4]
    qkv = rand((10, 3, 4, 16), seed=4)
    out_qkv = fa.flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens(lens), 5, softcap=2.0)
    ref_qkv, _ = flash_reference(*qkv.unbind(1), cu_seqlens(lens), cu_seqlens(lens), 5, 5,
                                 scale=0.25, softcap=2.0)  # fmt: skip
    torch.testing.assert_close(out_qkv, ref_qkv, **TOL)


def test_varlen_on_a_paged_cache_equals_the_packed_keys():
    lens_q, lens_k = [2, 0, 3], [5, 3, 7]
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = rand((6, 4, 16), seed=1)  # one row past the last sequence
    cache_k, cache_v = rand((3, 7, 2, 16), seed=2), rand((3, 7, 2, 16), seed=3)
    pool_k, table = paged_cache(cache_k, 3, seed=1)
    pool_v, _ = paged_cache(cache_v, 3, seed=1)
    out, lse, _ = fa.flash_attn_varlen_func(q, pool_k, pool_v, cq, ck, 3, 7, causal=True,
                                            return_attn_probs=True, block_table=table)  # fmt: skip
    packed_k = torch.cat([cache_k[b, :n] for b, n in enumerate(lens_k)])
    packed_v = torch.cat([cache_v[b, :n] for b, n in enumerate(lens_k)])
    ref, ref_lse = fa.flash_attn_varlen_func(q, packed_k, packed_v, cq, ck, 3, 7, causal=True,
                                             return_attn_probs=True)[:2]  # fmt: skip
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    assert bool((out[5] == 0).all()) and bool((lse[:, 5] == math.inf).all())


def rotary_tables(seqlen, rotary_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=F64) / rotary_dim)
    angles = torch.arange(seqlen, dtype=F64)[:, None] * inv[None]
    return angles.cos(), angles.sin()


def rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding written out with complex numbers (the test's own oracle)."""
    rd = cos.shape[1] * 2
    head, tail = x[..., :rd], x[..., rd:]
    if interleaved:
        pairs = torch.complex(head[..., 0::2], head[..., 1::2])
    else:
        pairs = torch.complex(head[..., : rd // 2], head[..., rd // 2 :])
    turn = torch.complex(cos[positions], sin[positions]).unsqueeze(2)
    rotated = pairs * turn
    if interleaved:
        head = torch.stack([rotated.real, rotated.imag], dim=-1).flatten(-2)
    else:
        head = torch.cat([rotated.real, rotated.imag], dim=-1)
    return torch.cat([head, tail], dim=-1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_append_rotary_and_attend(interleaved, causal):
    batch, new, hq, hkv, d = 2, 3, 4, 2, 16
    q = rand((batch, new, hq, d), seed=1)
    k_new, v_new = rand((batch, new, hkv, d), seed=2), rand((batch, new, hkv, d), seed=3)
    k_cache, v_cache = rand((batch, 12, hkv, d), seed=4), rand((batch, 12, hkv, d), seed=5)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor([4, 9], dtype=torch.int32)
    cos, sin = rotary_tables(16, 8)
    out, lse = fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cos, sin, seqlens, causal=causal,
        rotary_interleaved=interleaved, return_softmax_lse=True,
    )  # fmt: skip
    positions = seqlens.long().view(-1, 1) + torch.arange(new)
    k_rot = rotate(k_new, cos, sin, positions, interleaved)
    q_pos = positions if causal else seqlens.long().view(-1, 1).expand(batch, new)
    q_rot = rotate(q, cos, sin, q_pos, interleaved)
    expect_k, expect_v = before_k.clone(), before_v.clone()
    for b in range(batch):
        lo = int(seqlens[b])
        expect_k[b, lo : lo + new] = k_rot[b]
        expect_v[b, lo : lo + new] = v_new[b]
    torch.testing.assert_close(k_cache, expect_k, **TOL)  # written in place, the rest untouched
    torch.testing.assert_close(v_cache, expect_v, **TOL)
    ref, ref_lse = flash_reference(q_rot, expect_k, expect_v, seqused_k=(seqlens + new).int(),
                                   scale=d**-0.5, causal=causal)  # fmt: skip
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)


@pytest.mark.parametrize("page_size", [1, 4, 256])
def test_kvcache_paged_equals_contiguous(page_size):
    q = rand((2, 1, 8, 16), seed=1)
    k_new, v_new = rand((2, 1, 1, 16), seed=2), rand((2, 1, 1, 16), seed=3)  # MQA
    k_cache, v_cache = rand((2, 10, 1, 16), seed=4), rand((2, 10, 1, 16), seed=5)
    pool_k, table = paged_cache(k_cache, page_size, seed=page_size)
    pool_v, _ = paged_cache(v_cache, page_size, seed=page_size)
    seqlens = torch.tensor([9, 3], dtype=torch.int32)
    kw = dict(cache_seqlens=seqlens, causal=True, softcap=4.0, num_splits=2)
    out_paged = fa.flash_attn_with_kvcache(q, pool_k, pool_v, k_new, v_new, block_table=table,
                                           **kw)  # fmt: skip
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)
    torch.testing.assert_close(out_paged, out, **TOL)
    # the pages were written in place: reading them back gives the contiguous cache
    pos = torch.arange(10)
    for b in range(2):
        got = pool_k[table[b].long()[pos // page_size], pos % page_size]
        torch.testing.assert_close(got, k_cache[b], **TOL)


def test_kvcache_batch_index_leftpad_and_int_seqlens():
    q = rand((2, 2, 4, 16), seed=1)
    k_cache, v_cache = rand((3, 8, 2, 16), seed=2), rand((3, 8, 2, 16), seed=3)
    rows = torch.tensor([2, 0], dtype=torch.int32)
    left = torch.tensor([1, 3], dtype=torch.int32)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6,
                                     cache_batch_idx=rows, cache_leftpad=left)  # fmt: skip
    ref, _ = flash_reference(q, k_cache, v_cache, seqused_k=torch.full((2,), 6, dtype=torch.int32),
                             leftpad_k=left, kv_batch_idx=rows, scale=0.25)  # fmt: skip
    torch.testing.assert_close(out, ref, **TOL)
    k_new = rand((2, 1, 2, 16), seed=4)
    fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, k_new, cache_seqlens=6,
                               cache_batch_idx=rows)  # fmt: skip
    torch.testing.assert_close(k_cache[2, 6], k_new[0, 0], **TOL)  # row 2 is batch 0's cache
    torch.testing.assert_close(k_cache[0, 6], k_new[1, 0], **TOL)
    full = fa.flash_attn_with_kvcache(q, k_cache[:2], v_cache[:2])  # no seqlens: all of it
    ref_full, _ = flash_reference(q, k_cache[:2], v_cache[:2], scale=0.25)
    torch.testing.assert_close(full, ref_full, **TOL)


def test_kvcache_bad_input_names_flash_attentions_arguments():
    q = rand((2, 1, 4, 16))
    k_cache = rand((2, 8, 2, 16))
    k_new = rand((2, 2, 2, 16))
    before = k_cache.clone()
    with pytest.raises(FlashArgumentError, match="cache_seqlens"):  # 7 + 2 > 8: nothing written
        fa.flash_attn_with_kvcache(q, k_cache, k_cache, k_new, k_new,
                                   cache_seqlens=torch.tensor([7, 1], dtype=torch.int32))  # fmt: skip
    assert torch.equal(k_cache, before)
    with pytest.raises(FlashTypeError, match="cache_seqlens"):
        fa.flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=torch.tensor([1, 2]))
    with pytest.raises(FlashArgumentError, match="cache_batch_idx"):
        fa.flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=1,
                                   cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32))  # fmt: skip
    pool, table = paged_cache(k_cache, 4)
    with pytest.raises(FlashArgumentError, match="block_table"):
        fa.flash_attn_with_kvcache(q, pool, pool, cache_seqlens=8, block_table=table + 10)
    with pytest.raises(FlashArgumentError, match="k and v"):
        fa.flash_attn_with_kvcache(q, k_cache, k_cache, k_new, cache_seqlens=1)
    cos, sin = rotary_tables(4, 8)
    with pytest.raises(FlashArgumentError, match="rotary"):
        fa.flash_attn_with_kvcache(q, k_cache, k_cache, rotary_cos=cos, rotary_sin=sin)
    with pytest.raises(FlashArgumentError, match="rotary_cos"):  # positions 6, 7 past 4
        fa.flash_attn_with_kvcache(q, k_cache, k_cache, k_new, k_new, cos, sin, cache_seqlens=6)
    assert torch.equal(k_cache, before)


def test_bad_window_and_cu_seqlens():
    q, k, v = dense()
    with pytest.raises(FlashTypeError, match="window_size"):
        fa.flash_attn_func(q, k, v, window_size=3)
    with pytest.raises(FlashArgumentError, match="window_left"):
        fa.flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(FlashArgumentError, match="softcap"):
        fa.flash_attn_func(q, k, v, softcap=-1.0)
    packed = rand((6, 4, 16))
    with pytest.raises(FlashArgumentError, match="cu_seqlens_q"):
        fa.flash_attn_varlen_func(packed, packed, packed, torch.tensor([0, 4, 2], dtype=torch.int32),
                                  cu_seqlens([4, 2]), 4, 4)  # fmt: skip


def test_shim_is_opt_in():
    if "flash_attn" in sys.modules and not getattr(sys.modules["flash_attn"], "__aigc_ext_shim__",
                                                   False):  # fmt: skip
        pytest.skip("a real flash_attn is imported")
    saved = {
        name: sys.modules.pop(name, None)
        for name in ("flash_attn", "flash_attn.flash_attn_interface")
    }
    try:
        fa.install_flash_attn_shim()
        from flash_attn import flash_attn_func
        from flash_attn.flash_attn_interface import flash_attn_with_kvcache

        assert flash_attn_func is fa.flash_attn_func
        assert flash_attn_with_kvcache is fa.flash_attn_with_kvcache
    finally:
        for name, module in saved.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module
