"""The Triton operators of the FlashAttention contract against the float64 reference.

``torch.ops.aigc_ext.triton_flash_forward`` / ``triton_flash_backward`` (``docs/flash-contract.md``)
are checked feature by feature with FlashAttention's error rule: ``max|ours - ref64| <= 2 *
max|reference in the same dtype - ref64| + 1e-5``, for the output, the logsumexp and every
gradient. The dropout mask is read back from the kernel (with one-hot values) and must equal
the reference's bit for bit; a paged cache must give exactly what the same cache laid out
contiguously gives.

Without a CUDA device, conftest turns on Triton's interpreter and the kernels run on CPU
tensors, which is slow: shapes are small (a few dozen tokens, two heads), still spanning
several query and key tiles (64 x 32 there), ragged tails, window edges and pages. float32 and
float16 only under the interpreter (its bfloat16 dot is wrong); with
``AIGC_EXT_TEST_DEVICE=cuda`` bfloat16 runs too.
"""

from __future__ import annotations

import math

import pytest
import torch
from flash_testing import cu_seqlens, rand

pytest.importorskip("triton")

from aigc_ext.backends.triton import backend as triton_backend
from aigc_ext.flash.checks import FlashArgumentError, FlashTypeError
from aigc_ext.flash.philox import dropout_keep_mask
from aigc_ext.flash.reference import flash_reference
from aigc_ext.testing import check_error_rule

INTERPRETED = triton_backend.interpreter_enabled()
DEVICE = "cpu" if INTERPRETED else "cuda"
AVAILABLE = INTERPRETED or torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not AVAILABLE, reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1"
)
if AVAILABLE:
    from aigc_ext.backends.triton import flash_ops  # noqa: F401  (defines the operators)

    FWD = torch.ops.aigc_ext.triton_flash_forward
    BWD = torch.ops.aigc_ext.triton_flash_backward

F16, F32, F64, BF16 = torch.float16, torch.float32, torch.float64, torch.bfloat16
DTYPES = [F32, F16] if INTERPRETED else [F32, F16, BF16]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def with_dtypes(cases, half: tuple[str, ...]) -> list:
    """``(case, dtype)`` parameters: every case in float32, the ``half`` ones in float16 as
    well (the interpreter is slow); on a GPU every case in every dtype."""
    params = []
    for case in cases:
        for dtype in DTYPES:
            if INTERPRETED and dtype != F32 and case not in half:
                continue
            params.append(pytest.param(case, dtype, id=f"{case}-{_dtype_id(dtype)}"))
    return params


def _dev(t):
    return t.to(DEVICE) if isinstance(t, torch.Tensor) else t


def _cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def _as(t, dtype):
    """Floating tensors cast to ``dtype`` (float32 parameters stay float32 below float64)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    if dtype != F64 and t.dtype == F32:
        return t
    return t.to(dtype)


def _run(fn, q, k, v, grad_out, kwargs, *, backward: bool):
    """``fn``'s (out, lse) and, with ``backward``, the gradients of ``(out * grad_out).sum()``
    in q, k, v and sinks (autograd through the operator's registration)."""
    leaves = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    kwargs = dict(kwargs)
    sinks = kwargs.get("sinks")
    if sinks is not None:
        kwargs["sinks"] = sinks.detach().clone().requires_grad_(backward)
        leaves.append(kwargs["sinks"])
    out, lse = fn(*leaves[:3], **kwargs)
    grads = []
    if backward:
        grads = torch.autograd.grad((out * grad_out.to(out.dtype)).sum(), leaves)
    return out.detach(), lse.detach(), [g.detach() for g in grads]


def _ours(q, k, v, grad_out, kwargs, backward):
    args = {key: _dev(value) for key, value in kwargs.items()}
    out, lse, grads = _run(
        FWD, *(_dev(t) for t in (q, k, v)), _dev(grad_out), args, backward=backward
    )
    return out.cpu(), lse.cpu(), [g.cpu() for g in grads]


def _reference(q, k, v, grad_out, kwargs, dtype, backward):
    args = {key: _as(value, dtype) for key, value in kwargs.items()}
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return _run(flash_reference, q, k, v, grad_out, args, backward=backward)


def check_against_reference(q, k, v, kwargs, *, backward=True, seed=11):
    """Runs ours, the float64 reference and the reference in q's dtype; applies the error rule
    to out, lse (finite entries; -inf where the reference has -inf) and the gradients."""
    dtype = q.dtype
    out_shape = flash_reference(q.to(F64), k.to(F64), v.to(F64), **{
        key: _as(value, F64) for key, value in kwargs.items()
    })[0].shape  # fmt: skip
    grad_out = rand(out_shape, F32, seed=seed).to(dtype)
    ours = _ours(q, k, v, grad_out, kwargs, backward)
    ref = _reference(q, k, v, grad_out, kwargs, F64, backward)
    base = _reference(q, k, v, grad_out, kwargs, dtype, backward)
    names = ["out", "lse", *("grad_q", "grad_k", "grad_v", "grad_sinks")[: len(ref[2])]]
    mine = [ours[0], ours[1], *ours[2]]
    refs = [ref[0], ref[1], *ref[2]]
    bases = [base[0], base[1], *base[2]]
    for name, a, r, b in zip(names, mine, refs, bases, strict=True):
        if name == "lse":
            inf = torch.isinf(r)
            assert torch.equal(torch.isinf(a) & (a < 0), inf), (
                "lse is -inf exactly where the reference's is"
            )
            a, r, b = a[~inf], r[~inf], b[~inf]
        res = check_error_rule(a.to(F64), r.to(F64), b.to(F64))
        assert res.ok, res.describe(name)
    return ours, ref


def qkv(batch=1, len_q=37, len_k=45, heads=2, heads_kv=1, dim=24, dim_v=None, dtype=F32, seed=0):
    q = rand((batch, len_q, heads, dim), dtype, seed=seed)
    k = rand((batch, len_k, heads_kv, dim), dtype, seed=seed + 1)
    v = rand((batch, len_k, heads_kv, dim_v or dim), dtype, seed=seed + 2)
    return q, k, v


# -- dense layout: every feature, forward and backward -------------------------------------


DENSE_CASES = {
    "plain": ({}, {}),
    "causal_longer_keys": ({"causal": True}, {}),
    "causal_longer_queries": ({"causal": True}, {"len_q": 50, "len_k": 21}),
    "window": ({"window_left": 9, "window_right": 4}, {}),
    "window_left_only": ({"window_left": 20}, {"len_q": 45, "len_k": 45}),
    "window_wider_than_sequence": ({"window_left": 500, "window_right": 300}, {}),
    "softcap_alibi": ({"softcap": 1.5, "alibi_slopes": torch.tensor([0.3, 0.07])}, {}),
    "alibi_batch_sinks": (
        {"alibi_slopes": torch.tensor([[0.2, 0.05], [0.1, 0.4]]), "sinks": torch.tensor([0.5, -1.0]),
         "causal": True},
        {"batch": 2, "len_q": 20, "len_k": 33},
    ),
    "dropout": ({"dropout_p": 0.25, "rng_state": torch.tensor([-1234567890123, 99])}, {}),
    "key_padding_mask": (
        {"attn_mask": torch.arange(45).view(1, 1, 1, 45) < 40, "softcap": 2.0}, {}
    ),
    "float_mask_tiles": ({"attn_mask": rand((1, 2, 37, 45), F32, seed=5)}, {}),
    "gqa_head_dims": ({"causal": True}, {"heads": 4, "heads_kv": 2, "dim": 40, "dim_v": 20}),
}  # fmt: skip


@pytest.mark.parametrize(
    "case,dtype",
    with_dtypes(DENSE_CASES, ("plain", "causal_longer_queries", "softcap_alibi", "dropout")),
)
def test_dense_features(case, dtype):
    kwargs, shape = DENSE_CASES[case]
    q, k, v = qkv(dtype=dtype, **shape)
    if "attn_mask" in kwargs and kwargs["attn_mask"].is_floating_point():
        kwargs = {**kwargs, "attn_mask": kwargs["attn_mask"].to(dtype)}
    scale = q.shape[-1] ** -0.5
    check_against_reference(q, k, v, {"scale": scale, **kwargs})


def test_rows_without_keys_get_zeros_and_minus_inf():
    """Causal with more queries than keys (bottom-right): the first rows see no key."""
    q, k, v = qkv(len_q=40, len_k=9)
    out, lse = FWD(_dev(q), _dev(k), _dev(v), scale=0.3, causal=True)
    out, lse = out.cpu(), lse.cpu()
    assert torch.equal(out[:, :31], torch.zeros_like(out[:, :31]))
    assert bool(torch.isneginf(lse[:, :, :31]).all())
    assert bool(torch.isfinite(lse[:, :, 31:]).all())
    grads = BWD(
        *(_dev(t) for t in (torch.ones_like(out), q, k, v, out, lse)), scale=0.3, causal=True
    )
    assert all(bool(torch.isfinite(g.cpu()).all()) for g in grads)
    assert torch.equal(grads[0].cpu()[:, :31], torch.zeros_like(q[:, :31]))


def test_window_skips_key_blocks_outside_it():
    """Keys that no query's window reaches are never read: NaN there (keys and values) leaves
    the output, the lse and the gradients finite and equal to the reference on the finite
    keys, and those keys' gradients zero. (A visited block would carry NaN through P V.)"""
    len_q, len_k, left = 8, 200, 10
    q, k, v = qkv(len_q=len_q, len_k=len_k, heads=2, heads_kv=1)
    first_seen = len_k - len_q - left  # the smallest key any query's window reaches
    # up to the start of that key's block for key tiles of up to 128 (32 and 64 under
    # the interpreter): masked keys inside a visited block see NaN in their own values
    poisoned = (first_seen // 128) * 128
    k[:, :poisoned] = float("nan")
    v[:, :poisoned] = float("nan")
    kwargs = {"scale": 0.2, "causal": True, "window_left": left}
    out, lse = FWD(*(_dev(t) for t in (q, k, v)), **kwargs)
    # the reference on the finite keys only (bottom-right alignment keeps the same windows)
    finite = (t[:, poisoned:].double() for t in (k, v))
    ref_out, ref_lse = flash_reference(q.double(), *finite, **kwargs)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-5, rtol=0)
    grads = BWD(*(_dev(t) for t in (torch.ones_like(out), q, k, v, out, lse)), **kwargs)
    dq, dk, dv = (g.cpu() for g in grads)
    assert bool(torch.isfinite(dq).all()) and bool(torch.isfinite(dk).all())
    assert torch.equal(dk[:, :poisoned], torch.zeros_like(dk[:, :poisoned]))
    assert torch.equal(dv[:, :poisoned], torch.zeros_like(dv[:, :poisoned]))


def test_strided_inputs_equal_contiguous():
    """q, k, v as transposed views of (B, H, L, D) tensors: the kernels read them through
    their strides, with the same result as contiguous copies."""
    q = rand((2, 2, 37, 24), F32, seed=1).transpose(1, 2)
    k = rand((2, 1, 45, 24), F32, seed=2).transpose(1, 2)
    v = rand((2, 1, 45, 24), F32, seed=3).transpose(1, 2)
    strided = FWD(*(_dev(t) for t in (q, k, v)), scale=0.2, causal=True)
    dense = FWD(*(_dev(t.contiguous()) for t in (q, k, v)), scale=0.2, causal=True)
    assert torch.equal(strided[0], dense[0]) and torch.equal(strided[1], dense[1])


@pytest.mark.parametrize("dims", [(200, 256), (256, 8)], ids=["d200_dv256", "d256_dv8"])
def test_large_head_dims(dims):
    dim, dim_v = dims
    q, k, v = qkv(len_q=19, len_k=35, dim=dim, dim_v=dim_v)
    check_against_reference(q, k, v, {"scale": dim**-0.5, "window_left": 10})


def test_empty_shapes():
    for shape in ({"len_q": 0}, {"len_k": 0}, {"batch": 0}):
        q, k, v = qkv(**shape)
        out, lse = FWD(_dev(q), _dev(k), _dev(v), scale=0.5)
        ref_out, ref_lse = flash_reference(q, k, v, scale=0.5)
        assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
        assert torch.equal(out.cpu(), ref_out) and torch.equal(lse.cpu(), ref_lse)


# -- variable-length batches ---------------------------------------------------------------


VARLEN_CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window_softcap_dropout": {
        "window_left": 7, "window_right": 2, "softcap": 3.0, "dropout_p": 0.2,
        "rng_state": torch.tensor([2**40 + 17, 5]),
    },
    "alibi_sinks": {"alibi_slopes": torch.tensor([[0.1, 0.3]] * 4), "sinks": torch.tensor([0.2, 0.7])},
}  # fmt: skip


@pytest.mark.parametrize("case,dtype", with_dtypes(VARLEN_CASES, ("causal",)))
def test_varlen(case, dtype):
    """Four sequences, one of them empty, odd lengths; q has rows past ``cu_seqlens_q[-1]``
    (zeros, lse -inf), k has rows past ``cu_seqlens_k[-1]`` (zero gradients)."""
    lens_q, lens_k = (5, 0, 40, 13), (9, 4, 41, 13)
    heads, heads_kv, dim = 2, 1, 24
    q = rand((sum(lens_q) + 3, heads, dim), dtype, seed=1)
    k = rand((sum(lens_k) + 2, heads_kv, dim), dtype, seed=2)
    v = rand((sum(lens_k) + 2, heads_kv, dim), dtype, seed=3)
    layout = {
        "cu_seqlens_q": cu_seqlens(lens_q), "cu_seqlens_k": cu_seqlens(lens_k),
        "max_seqlen_q": max(lens_q), "max_seqlen_k": max(lens_k),
    }  # fmt: skip
    ours, _ = check_against_reference(q, k, v, {"scale": 0.2, **layout, **VARLEN_CASES[case]})
    out, lse, grads = ours
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))
    assert bool(torch.isneginf(lse[:, -3:]).all())
    assert torch.equal(grads[1][-2:], torch.zeros_like(grads[1][-2:]))


# -- the KV cache ---------------------------------------------------------------------------


def _cache_kwargs(batch, capacity, *, leftpad=True, batch_idx=True):
    used = torch.tensor([capacity, 17, 30][:batch], dtype=torch.int32)
    kwargs = {"seqused_k": used}
    if leftpad:
        kwargs["leftpad_k"] = torch.tensor([3, 0, 11][:batch], dtype=torch.int32)
    if batch_idx:
        kwargs["kv_batch_idx"] = torch.tensor([2, 0, 1][:batch], dtype=torch.int32)
    return kwargs


CACHE_CASES = {
    "decode": (1, {}),
    "chunk_causal_softcap": (6, {"causal": True, "softcap": 2.0}),
    "decode_window_sinks": (1, {"window_left": 8, "sinks": torch.tensor([0.5, -0.5, 1.0, 0.0])}),
}


@pytest.mark.parametrize("case,dtype", with_dtypes(CACHE_CASES, ("decode",)))
def test_kv_cache_dense(case, dtype):
    """A dense cache with ``seqused_k``, ``leftpad_k`` and ``kv_batch_idx``; GQA with four
    query heads per key head (a decoding step's tile holds the group)."""
    len_q, extra = CACHE_CASES[case]
    batch, capacity, heads, heads_kv, dim = 3, 40, 4, 1, 32
    q = rand((batch, len_q, heads, dim), dtype, seed=1)
    k = rand((3, capacity, heads_kv, dim), dtype, seed=2)
    v = rand((3, capacity, heads_kv, dim), dtype, seed=3)
    kwargs = {"scale": dim**-0.5, **_cache_kwargs(batch, capacity), **extra}
    check_against_reference(q, k, v, kwargs, backward=False)


def _paged(k, v, page_size, seed=0):
    """The cache ``(B, S, Hkv, D)`` as shuffled pages ``(pages, page_size, Hkv, D)`` plus a
    block table, whose spare last column points at a page that does not exist (entries past
    the positions in use are never read)."""
    batch, capacity = k.shape[:2]
    per_row = math.ceil(capacity / page_size)
    pad = per_row * page_size - capacity
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad))
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad))
    order = torch.randperm(batch * per_row, generator=torch.Generator().manual_seed(seed))
    pages_k = torch.empty((batch * per_row, page_size, *k.shape[2:]), dtype=k.dtype)
    pages_v = torch.empty((batch * per_row, page_size, *v.shape[2:]), dtype=v.dtype)
    table = torch.full((batch, per_row + 1), batch * per_row + 7, dtype=torch.int32)
    for b in range(batch):
        for p in range(per_row):
            page = int(order[b * per_row + p])
            table[b, p] = page
            pages_k[page] = kp[b, p * page_size : (p + 1) * page_size]
            pages_v[page] = vp[b, p * page_size : (p + 1) * page_size]
    return pages_k, pages_v, table


PAGE_CASES = {
    "page32_block_lookup": (32, False),
    "page64_block_lookup": (64, False),
    "page32_leftpad_row_lookup": (32, True),
    "page5_row_lookup": (5, False),
}


@pytest.mark.parametrize("case,dtype", with_dtypes(PAGE_CASES, ("page5_row_lookup",)))
def test_paged_equals_contiguous(case, dtype):
    """The same cache read through a block table gives exactly the contiguous result (pages a
    multiple of the key tile are looked up once per tile, others once per row), and both meet
    the error rule against the reference."""
    page_size, leftpad = PAGE_CASES[case]
    batch, capacity, len_q, heads, heads_kv, dim = 3, 70, 3, 2, 1, 24
    q = rand((batch, len_q, heads, dim), dtype, seed=4)
    k = rand((batch, capacity, heads_kv, dim), dtype, seed=5)
    v = rand((batch, capacity, heads_kv, dim), dtype, seed=6)
    kwargs = {"scale": 0.3, "causal": True, **_cache_kwargs(batch, capacity, leftpad=leftpad,
                                                              batch_idx=False)}  # fmt: skip
    (dense_out, dense_lse, _), _ = check_against_reference(q, k, v, kwargs, backward=False)
    pages_k, pages_v, table = _paged(k, v, page_size)
    paged_out, paged_lse = FWD(
        *(_dev(t) for t in (q, pages_k, pages_v)), block_table=_dev(table),
        **{a: _dev(b) for a, b in kwargs.items()},
    )  # fmt: skip
    assert torch.equal(paged_out.cpu(), dense_out)
    assert torch.equal(paged_lse.cpu(), dense_lse)


# -- dropout --------------------------------------------------------------------------------


def _kept_by_kernel(out: torch.Tensor) -> torch.Tensor:
    """With one-hot values (v = identity), out[i, j] = keep_ij * p_ij / (1 - p): the kernel's
    keep mask is where out is non-zero."""
    return out != 0


@pytest.mark.parametrize(
    "rng,p", [((0x0123456789ABCDEF, 0), 0.5), ((-7, 2**33 + 41), 0.9)],
    ids=["seed_hi_lo", "negative_seed_offset_hi_bits_high_p"],
)  # fmt: skip
def test_dropout_mask_is_the_references_bit_for_bit(rng, p):
    batch, len_q, len_k, heads, heads_kv = 2, 21, 43, 4, 2
    q = rand((batch, len_q, heads, 16), F32, seed=1)
    k = rand((batch, len_k, heads_kv, 16), F32, seed=2)
    eye = torch.eye(len_k).view(1, len_k, 1, len_k).expand(batch, len_k, heads_kv, len_k)
    rng_state = torch.tensor(rng, dtype=torch.int64)
    out, _ = FWD(
        _dev(q), _dev(k), _dev(eye.contiguous()), scale=0.1, dropout_p=p, rng_state=rng_state
    )
    kept = _kept_by_kernel(out.cpu())  # (B, L, H, S)
    for b in range(batch):
        ref = dropout_keep_mask(rng_state, b, range(heads), len_q, len_k, p, heads)  # (H, L, S)
        assert torch.equal(kept[b].permute(1, 0, 2), ref), f"batch {b}"
    keep_rate = float(kept.float().mean())
    assert abs(keep_rate - (1 - p)) < 0.05


def test_dropout_mask_counts_positions_within_sequences():
    """Packed sequences count ``i`` and ``j`` from each sequence's start; a KV cache counts
    ``j`` from ``leftpad_k``."""
    lens_q, lens_k, heads, p = (9, 30), (20, 36), 2, 0.4
    rng_state = torch.tensor([424242, 3])
    q = rand((sum(lens_q), heads, 16), F32, seed=1)
    k = rand((sum(lens_k), heads, 16), F32, seed=2)
    eye = torch.zeros((sum(lens_k), heads, 36))
    start = 0
    for n in lens_k:
        eye[start : start + n, :, :n] = torch.eye(n).unsqueeze(1)
        start += n
    out, _ = FWD(
        _dev(q), _dev(k), _dev(eye), cu_seqlens_q=_dev(cu_seqlens(lens_q)),
        cu_seqlens_k=_dev(cu_seqlens(lens_k)), max_seqlen_q=30, max_seqlen_k=36,
        scale=0.1, dropout_p=p, rng_state=rng_state,
    )  # fmt: skip
    kept = _kept_by_kernel(out.cpu())
    row = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        ref = dropout_keep_mask(rng_state, b, range(heads), lq, lk, p, heads)
        assert torch.equal(kept[row : row + lq, :, :lk].permute(1, 0, 2), ref), f"sequence {b}"
        row += lq

    # the KV cache: keys from leftpad_k, positions counted from there
    left, used, capacity = (
        torch.tensor([5], dtype=torch.int32),
        torch.tensor([33], dtype=torch.int32),
        40,
    )
    qc = rand((1, 4, heads, 16), F32, seed=3)
    kc = rand((1, capacity, heads, 16), F32, seed=4)
    vc = torch.zeros((1, capacity, heads, capacity))
    vc[0, 5:33, :, :28] = torch.eye(28).unsqueeze(1)
    out, _ = FWD(
        _dev(qc), _dev(kc), _dev(vc), seqused_k=_dev(used), leftpad_k=_dev(left), scale=0.1,
        dropout_p=p, rng_state=rng_state,
    )  # fmt: skip
    ref = dropout_keep_mask(rng_state, 0, range(heads), 4, 28, p, heads)
    assert torch.equal(_kept_by_kernel(out.cpu())[0, :, :, :28].permute(1, 0, 2), ref)


def test_dropout_is_reproducible_and_depends_on_the_seed():
    q, k, v = qkv(len_q=20, len_k=30)
    args = [_dev(t) for t in (q, k, v)]
    a = FWD(*args, scale=0.3, dropout_p=0.3, rng_state=torch.tensor([1, 2]))[0]
    b = FWD(*args, scale=0.3, dropout_p=0.3, rng_state=torch.tensor([1, 2]))[0]
    c = FWD(*args, scale=0.3, dropout_p=0.3, rng_state=torch.tensor([1, 3]))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -- arguments ------------------------------------------------------------------------------


def test_bad_input_is_rejected_before_any_kernel():
    q, k, v = qkv()
    with pytest.raises(FlashTypeError, match="float16, bfloat16 and float32"):
        FWD(*(_dev(t.double()) for t in (q, k, v)))
    qp = rand((10, 2, 24), F32, seed=1)
    kp = rand((12, 1, 24), F32, seed=2)
    bad_cu = torch.tensor([0, 6, 4, 10], dtype=torch.int32)
    good_cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    if DEVICE == "cpu":  # index values are read on the host for CPU tensors
        with pytest.raises(FlashArgumentError, match="cu_seqlens_q"):
            FWD(qp, kp, kp, cu_seqlens_q=bad_cu, cu_seqlens_k=good_cu, max_seqlen_q=6,
                max_seqlen_k=4)  # fmt: skip
        pages = rand((4, 16, 1, 24), F32, seed=3)
        table = torch.tensor([[0, 1], [2, 7]], dtype=torch.int32)
        with pytest.raises(FlashArgumentError, match="block_table"):
            FWD(rand((2, 1, 2, 24), F32), pages, pages, block_table=table,
                seqused_k=torch.tensor([20, 30], dtype=torch.int32))  # fmt: skip
    with pytest.raises(FlashArgumentError, match="window_left"):
        FWD(*(_dev(t) for t in (q, k, v)), window_left=-3)
    with pytest.raises(FlashArgumentError, match="softcap"):
        FWD(*(_dev(t) for t in (q, k, v)), softcap=-1.0)


# -- registration: opcheck, the flash_attention entry point, torch.compile ----------------


def _small_packed(grad=False):
    lens_q, lens_k = (3, 6), (7, 4)
    q = rand((sum(lens_q), 2, 16), F32, seed=1)
    k = rand((sum(lens_k), 1, 16), F32, seed=2)
    v = rand((sum(lens_k), 1, 16), F32, seed=3)
    layout = (cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k))
    tensors = [_dev(t).requires_grad_(grad) for t in (q, k, v)]
    return tensors, tuple(_dev(t) for t in layout)


def test_opcheck():
    """Schema, fake kernels, autograd registration and tracing of both operators."""
    (q, k, v), layout = _small_packed(grad=True)
    opts = {"scale": 0.25, "causal": True, "softcap": 5.0}
    torch.library.opcheck(FWD.default, (q, k, v, *layout), opts)
    out, lse = FWD(q, k, v, *layout, **opts)
    grad_out = torch.ones_like(out)
    torch.library.opcheck(
        BWD.default, (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, *layout),
        opts,
    )  # fmt: skip


def test_flash_attention_serves_the_triton_backend():
    from aigc_ext.flash.ops import flash_attention

    (q, k, v), layout = _small_packed()
    ours, lse = flash_attention(q, k, v, *layout, causal=True, backend="triton")
    ref, ref_lse = flash_reference(
        *(t.cpu() for t in (q, k, v)), *(_cpu(t) for t in layout), scale=16**-0.5, causal=True
    )
    torch.testing.assert_close(ours.cpu(), ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-6, rtol=0)


def test_compile_fullgraph_forward_and_backward():
    (q, k, v), layout = _small_packed(grad=True)
    sinks = _dev(torch.tensor([0.3, -0.4])).requires_grad_(True)

    def fn(q, k, v, sinks):
        return FWD(q, k, v, *layout, scale=0.25, window_left=2, sinks=sinks)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v, sinks)
    expected, expected_lse = fn(q, k, v, sinks)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    grads = torch.autograd.grad(out.sum(), [q, k, v, sinks])
    expected_grads = torch.autograd.grad(expected.sum(), [q, k, v, sinks])
    for g, e in zip(grads, expected_grads, strict=True):
        assert torch.equal(g, e)
