"""The pure-PyTorch reference of the FlashAttention contract (``aigc_ext.flash.reference``).

It is the oracle of every fused backend, so it is checked against independent computations:
torch's SDPA, the naive dense oracle of ``flash_testing`` (for every scoring feature), and, for
the other layouts, dense calls on each sequence. Its explicit backward is checked against
autograd through its forward, and that against finite differences.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from flash_testing import cu_seqlens, naive_dense, paged_cache, rand

from aigc_ext.flash.reference import (
    dropout_keep_mask,
    flash_reference,
    flash_reference_backward,
)

F64 = torch.float64


def qkv(b=2, lq=5, lk=7, hq=4, hkv=2, d=8, dv=None, dtype=F64, seed=0):
    q = rand((b, lq, hq, d), dtype, seed=seed)
    k = rand((b, lk, hkv, d), dtype, seed=seed + 1)
    v = rand((b, lk, hkv, dv or d), dtype, seed=seed + 2)
    return q, k, v


def dense_keep(rng, batch, heads, lq, lk, p):
    return torch.stack(
        [dropout_keep_mask(rng, b, range(heads), lq, lk, p, heads) for b in range(batch)]
    )


def test_plain_and_causal_equal_torch_sdpa():
    q, k, v = qkv(lq=6, lk=6, hq=2, hkv=2, d=5, dv=3)
    for causal in (False, True):
        out, lse = flash_reference(q, k, v, scale=0.3, causal=causal)
        ref = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=0.3
        ).transpose(1, 2)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        assert lse.shape == (2, 2, 6) and lse.dtype == F64


def test_causal_is_bottom_right_when_lengths_differ():
    q, k, v = qkv(lq=3, lk=7, hq=2, hkv=2)
    out, _ = flash_reference(q, k, v, causal=True)
    mask = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)  # query i sees keys <= i + 4
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=1.0
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (2, 1)},
    "window_left_only": {"window": (1, -1)},
    "wider_than_sequence": {"window": (50, 50)},
    "softcap": {"softcap": 1.5},
    "alibi_h": {"alibi": "h"},
    "alibi_bh": {"alibi": "bh"},
    "sinks": {"sinks": True},
    "everything": {"causal": True, "window": (3, -1), "softcap": 2.0, "alibi": "bh", "sinks": 1},
}


@pytest.mark.parametrize("lq, lk", [(5, 7), (7, 5), (1, 9)])
@pytest.mark.parametrize("feature", FEATURES)
def test_dense_features_equal_the_naive_oracle(feature, lq, lk):
    opts = dict(FEATURES[feature])
    q, k, v = qkv(lq=lq, lk=lk, hq=4, hkv=2, d=6, dv=5, seed=3)
    alibi = opts.pop("alibi", None)
    if alibi is not None:
        alibi = rand((4,) if alibi == "h" else (2, 4), torch.float32, seed=9).abs()
    sinks = rand((4,), torch.float32, seed=10) if opts.pop("sinks", None) else None
    window = opts.pop("window", (-1, -1))
    out, lse = flash_reference(
        q,
        k,
        v,
        scale=0.4,
        window_left=window[0],
        window_right=window[1],
        alibi_slopes=alibi,
        sinks=sinks,
        **opts,
    )
    ref_out, ref_lse = naive_dense(
        q, k, v, scale=0.4, window=window, alibi=alibi, sinks=sinks, **opts
    )
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)


def test_fully_masked_rows_give_zeros_and_minus_inf():
    q, k, v = qkv(lq=6, lk=3, hq=2, hkv=1)
    q.requires_grad_(True)
    out, lse = flash_reference(q, k, v, causal=True)  # rows 0..2 see no key (bottom-right)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert bool((lse[:, :, :3] == -math.inf).all()) and bool(torch.isfinite(lse[:, :, 3:]).all())
    out.sum().backward()
    assert bool(torch.isfinite(q.grad).all()) and bool((q.grad[:, :3] == 0).all())


def test_dropout_equals_the_oracle_with_the_same_mask():
    q, k, v = qkv(lq=9, lk=11, hq=4, hkv=2)
    rng = torch.tensor([1234, 5], dtype=torch.int64)
    out, lse = flash_reference(q, k, v, causal=True, dropout_p=0.3, rng_state=rng)
    keep = dense_keep(rng, 2, 4, 9, 11, 0.3)
    ref_out, ref_lse = naive_dense(q, k, v, causal=True, keep=keep, dropout_p=0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)  # dropout leaves lse alone
    plain, _ = flash_reference(q, k, v, causal=True)
    assert not torch.allclose(out, plain)


def test_varlen_equals_dense_per_sequence():
    lens_q, lens_k = [3, 0, 5, 1], [4, 2, 0, 6]  # an empty query and an empty key sequence
    hq, hkv = 4, 2
    q = rand((sum(lens_q) + 2, hq, 8), seed=1)  # two rows past the last sequence
    k = rand((sum(lens_k), hkv, 8), seed=2)
    v = rand((sum(lens_k), hkv, 6), seed=3)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    alibi = rand((4, hq), torch.float32, seed=4).abs()
    out, lse = flash_reference(
        q, k, v, cq, ck, max(lens_q), max(lens_k), causal=True, softcap=3.0, alibi_slopes=alibi
    )
    assert out.shape == (q.shape[0], hq, 6) and lse.shape == (hq, q.shape[0])
    for b in range(4):
        rows_q = slice(int(cq[b]), int(cq[b + 1]))
        rows_k = slice(int(ck[b]), int(ck[b + 1]))
        ref_out, ref_lse = naive_dense(
            q[None, rows_q],
            k[None, rows_k],
            v[None, rows_k],
            causal=True,
            softcap=3.0,
            alibi=alibi[b : b + 1],
        )
        torch.testing.assert_close(out[rows_q], ref_out[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(lse[:, rows_q], ref_lse[0], atol=1e-12, rtol=0)
    assert bool((out[-2:] == 0).all()) and bool((lse[:, -2:] == -math.inf).all())


def test_varlen_dropout_counts_positions_within_each_sequence():
    lens = [4, 6]
    q = rand((10, 2, 4), seed=1)
    k = rand((10, 2, 4), seed=2)
    v = rand((10, 2, 4), seed=3)
    rng = torch.tensor([77, 1], dtype=torch.int64)
    cq = cu_seqlens(lens)
    out, _ = flash_reference(q, k, v, cq, cq, 6, 6, dropout_p=0.5, rng_state=rng)
    for b, (lo, hi) in enumerate([(0, 4), (4, 10)]):
        keep = dropout_keep_mask(rng, b, range(2), hi - lo, hi - lo, 0.5, 2)[None]
        ref, _ = naive_dense(
            q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], keep=keep, dropout_p=0.5
        )
        torch.testing.assert_close(out[lo:hi], ref[0], atol=1e-12, rtol=0)


def test_kv_cache_seqused_leftpad_and_batch_index():
    q = rand((3, 2, 4, 8), seed=1)
    cache_k = rand((5, 12, 2, 8), seed=2)
    cache_v = rand((5, 12, 2, 8), seed=3)
    used = torch.tensor([7, 12, 3], dtype=torch.int32)
    left = torch.tensor([2, 0, 3], dtype=torch.int32)  # batch 2 attends to nothing
    rows = torch.tensor([4, 0, 2], dtype=torch.int32)
    rng = torch.tensor([5, 6], dtype=torch.int64)
    out, lse = flash_reference(
        q,
        cache_k,
        cache_v,
        seqused_k=used,
        leftpad_k=left,
        kv_batch_idx=rows,
        causal=True,
        dropout_p=0.2,
        rng_state=rng,
    )
    for b in range(3):
        lo, hi, r = int(left[b]), int(used[b]), int(rows[b])
        keep = dropout_keep_mask(rng, b, range(4), 2, hi - lo, 0.2, 4)[None]
        ref_out, ref_lse = naive_dense(
            q[b : b + 1],
            cache_k[r : r + 1, lo:hi],
            cache_v[r : r + 1, lo:hi],
            causal=True,
            keep=keep,
            dropout_p=0.2,
        )
        torch.testing.assert_close(out[b], ref_out[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(lse[b], ref_lse[0], atol=1e-12, rtol=0)
    assert bool((out[2] == 0).all())


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_paged_cache_equals_contiguous(page_size):
    q = rand((2, 3, 4, 8), seed=1)
    cache_k, cache_v = rand((2, 10, 2, 8), seed=2), rand((2, 10, 2, 8), seed=3)
    used = torch.tensor([10, 6], dtype=torch.int32)
    left = torch.tensor([1, 0], dtype=torch.int32)
    pool_k, table = paged_cache(cache_k, page_size, seed=page_size)
    pool_v, _ = paged_cache(cache_v, page_size, seed=page_size)
    kw = dict(seqused_k=used, leftpad_k=left, causal=True, softcap=5.0)
    out, lse = flash_reference(q, pool_k, pool_v, block_table=table, **kw)
    ref_out, ref_lse = flash_reference(q, cache_k, cache_v, **kw)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["bool", "float", "float_minus_inf", "same_dtype"])
@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (5, 7), (2, 1, 1, 7)])
def test_attn_mask_equals_the_oracle(kind, shape):
    q, k, v = qkv(lq=5, lk=7, hq=4, hkv=2)
    gen = torch.Generator().manual_seed(len(shape))
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.4
        mask[..., -1, :] = False  # a fully masked row where the shape has rows
    else:
        mask = torch.randn(shape, generator=gen)
        if kind == "float_minus_inf":
            mask = mask.masked_fill(torch.rand(shape, generator=gen) > 0.6, -math.inf)
            mask[..., 0, :] = -math.inf
        mask = mask.to(F64 if kind == "same_dtype" else torch.float32)
    kw = dict(causal=True, softcap=2.0)
    out, lse = flash_reference(q, k, v, scale=0.5, attn_mask=mask, **kw)
    ref_out, ref_lse = naive_dense(q, k, v, scale=0.5, attn_mask=mask, **kw)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    assert bool(torch.isfinite(out).all())


def test_low_precision_inputs_compute_in_their_dtype():
    q, k, v = qkv(dtype=torch.float16)
    out, lse = flash_reference(q, k, v, causal=True)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    ref, _ = flash_reference(q.double(), k.double(), v.double(), causal=True)
    err = (out.double() - ref).abs().max().item()
    assert 0 < err < 1e-2  # rounded like an fp16 computation, not an fp64 one


BACKWARD_CASES = {
    "plain": {},
    "causal_gqa": {"causal": True},
    "window_softcap": {"window_left": 2, "window_right": 1, "softcap": 1.0},
    "alibi_dropout": {"alibi": True, "dropout_p": 0.4, "causal": True},
    "sinks": {"sinks": True, "causal": True},
    "bool_mask": {"mask": "bool", "softcap": 2.0},
    "float_mask": {"mask": "float", "dropout_p": 0.2},
}


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_explicit_backward_equals_autograd(case, varlen):
    opts = dict(BACKWARD_CASES[case])
    hq, hkv = 4, 2
    if opts.pop("alibi", None):
        opts["alibi_slopes"] = rand((hq,), torch.float32, seed=5).abs()
    sinks = rand((hq,), F64, seed=6).requires_grad_(True) if opts.pop("sinks", None) else None
    mask_kind = opts.pop("mask", None)
    if mask_kind and varlen:
        pytest.skip("attn_mask goes with the dense layout only")
    if mask_kind == "bool":
        opts["attn_mask"] = (
            torch.rand((2, 1, 5, 6), generator=torch.Generator().manual_seed(0)) > 0.3
        )
    elif mask_kind == "float":
        opts["attn_mask"] = rand((5, 6), torch.float32, seed=7)
    if opts.get("dropout_p"):
        opts["rng_state"] = torch.tensor([31, 4], dtype=torch.int64)
    if varlen:
        lens_q, lens_k = [4, 0, 3], [5, 3, 0]
        q = rand((7, hq, 6), seed=1)
        k, v = rand((8, hkv, 6), seed=2), rand((8, hkv, 5), seed=3)
        layout = (cu_seqlens(lens_q), cu_seqlens(lens_k), 4, 5)
    else:
        q, k, v = qkv(lq=5, lk=6, hq=hq, hkv=hkv, d=6, dv=5)
        layout = (None, None, 0, 0)
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = flash_reference(q, k, v, *layout, scale=0.5, sinks=sinks, **opts)
    grad_out = rand(out.shape, seed=8)
    expected = torch.autograd.grad(out, [q, k, v], grad_out, retain_graph=sinks is not None)
    got = flash_reference_backward(
        grad_out,
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse,
        *layout,
        scale=0.5,
        **opts,
    )
    for name, g, e in zip("qkv", got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0, msg=f"grad_{name}")
    if sinks is not None:  # the contract's formula for the sinks' gradient
        (d_sinks,) = torch.autograd.grad(out, [sinks], grad_out)
        delta = (grad_out * out).sum(-1).detach()  # (B, L, H) or (T, H)
        delta = delta.transpose(-1, -2) if not varlen else delta.t()
        shape = (1, -1, 1) if not varlen else (-1, 1)
        formula = -(torch.exp(sinks.detach().view(shape) - lse) * delta)
        formula = formula.sum(dim=(0, 2) if not varlen else 1)
        torch.testing.assert_close(d_sinks, formula, atol=1e-12, rtol=0)


def test_gradcheck_every_feature_at_once():
    q, k, v = qkv(b=1, lq=3, lk=4, hq=2, hkv=1, d=3)
    sinks = rand((2,), F64, seed=4)
    alibi = torch.tensor([0.3, 0.1], dtype=torch.float32)
    rng = torch.tensor([3, 9], dtype=torch.int64)

    def fn(q, k, v, sinks):
        out, _ = flash_reference(
            q,
            k,
            v,
            scale=0.7,
            causal=True,
            window_left=2,
            softcap=2.0,
            alibi_slopes=alibi,
            dropout_p=0.25,
            rng_state=rng,
            sinks=sinks,
        )
        return out

    inputs = [t.requires_grad_(True) for t in (q, k, v, sinks)]
    assert torch.autograd.gradcheck(fn, inputs)
