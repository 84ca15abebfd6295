"""NaN, inf and huge scores in the C++ CPU kernel, against torch's math backend.

The rule is that of torch's math backend (``sdpa_kernel(SDPBackend.MATH)``): a row whose scores
contain NaN, or +inf (its softmax then computes inf - inf), is NaN in every column; a NaN value
makes its column NaN. Masks are added to the scores, a bool mask as 0 / -inf, so a NaN score at
a key hidden by a bool or float mask still makes its row NaN, as in torch's math backend and
its fused CPU kernel. Keys hidden by causal masking take no part in a row, as in torch's flash
kernel (``SDPBackend.FLASH_ATTENTION``), which does not read them either; torch's math backend
adds -inf there and so carries their NaN: those cases are checked against torch's flash kernel
and torch's math over each row's visible keys. Rows with no visible key (and no NaN among the
hidden ones) are zeros, with zero gradients. Finite scores of any size give finite results
wherever the float64 reference is finite. The ``reference`` backend follows the same rules.

Every case runs on each compiled instruction set of the kernel (and the bf16/fp16 GEMMs with and
without torch's brgemm), on the decode path (L <= 16) and the tiled forward, with one or several
key blocks (``AIGC_EXT_CPU_BLOCK_KV``) and key splits (S > 512 on the decode path).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from sdpa_testing import cpu_isa, fused_backends, generator
from torch.nn.attention import SDPBackend, sdpa_kernel

import aigc_ext
from aigc_ext.backends.reference.ops import attention_forward_reference, sdpa_reference

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [F32, F64, BF16, F16]
# Largest |ours - reference| allowed on finite outputs of unit-variance inputs, per dtype.
TOL = {F64: 1e-10, F32: 2e-5, BF16: 3e-2, F16: 4e-3}
NAN, INF = float("nan"), float("inf")

# (L, S, key block size or None): decode path with one, two or many query rows per task (fused
# and GEMM paths), tiled forward, several key blocks, several decode key splits.
SHAPES = [
    (1, 300, None),
    (2, 33, None),
    (5, 8, None),
    (16, 33, None),
    (20, 300, None),
    (70, 8, None),
    (70, 300, 64),
    (2, 1100, None),
]

# (isa, use_brgemm); use_brgemm only changes the bf16/fp16 GEMMs.
KERNELS = [("default", True), ("avx2", True), ("avx512", True), ("avx512", False)]


def _ids(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value)
    return None


@pytest.fixture(params=KERNELS, ids=[f"{i}-brgemm{int(b)}" for i, b in KERNELS])
def kernel(request) -> Iterator[tuple[str, bool]]:
    """Runs the test with one CPU kernel configuration; restores the automatic one after."""
    if "cpu" not in fused_backends("cpu"):
        pytest.skip("the cpu backend (C++ kernel) is not available")
    isa, use_brgemm = request.param
    with cpu_isa(isa, use_brgemm=use_brgemm) as config:
        assert f"brgemm={int(use_brgemm)}" in config
        yield request.param


def _skip_same_kernel(kernel, dtype):
    if not kernel[1] and dtype not in (BF16, F16):
        pytest.skip("use_brgemm only changes the bf16/fp16 GEMMs")


def _randn(shape, dtype, seed):
    return torch.randn(shape, generator=generator(seed)).to(dtype)


def _qkv(lq, lkv, dtype, *, e=16, hq=2, hkv=2, seed=0):
    return (
        _randn((1, hq, lq, e), dtype, seed),
        _randn((1, hkv, lkv, e), dtype, seed + 1),
        _randn((1, hkv, lkv, e), dtype, seed + 2),
    )


def _call(fn, q, k, v, grad_out, kwargs):
    """fn(q, k, v, **kwargs) and, when grad_out is given, the gradients of q, k and v."""
    leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    if grad_out is None:
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def ours(q, k, v, grad_out=None, **kwargs):
    with aigc_ext.use_backend("cpu"):
        return _call(aigc_ext.scaled_dot_product_attention, q, k, v, grad_out, kwargs)


def torch_math(q, k, v, grad_out=None, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return _call(F.scaled_dot_product_attention, q, k, v, grad_out, kwargs)


def reference64(q, k, v, grad_out=None, attn_mask=None, **kwargs):
    """Our float64 reference on the same inputs (masks added, causally hidden keys no part)."""
    q, k, v = (t.double() for t in (q, k, v))
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.double()
    if grad_out is not None:
        grad_out = grad_out.double()
    return _call(sdpa_reference, q, k, v, grad_out, {"attn_mask": attn_mask, **kwargs})


def assert_same_nonfinite(name, got, want, ref64, tol):
    """NaN where ``want`` is NaN and nowhere else, the same infinities, and the finite values
    within ``tol`` of ``ref64`` (relative to its magnitude)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w, r = got.double(), want.double(), ref64.double()
    nan_g, nan_w = g.isnan(), w.isnan()
    if not torch.equal(nan_g, nan_w):
        extra = (nan_g & ~nan_w).nonzero().tolist()[:4]
        missing = (nan_w & ~nan_g).nonzero().tolist()[:4]
        raise AssertionError(
            f"{name}: {int(nan_g.sum())} NaN, expected {int(nan_w.sum())}; "
            f"NaN not expected at {extra}, missing at {missing}"
        )
    assert torch.equal(g.isposinf(), w.isposinf()) and torch.equal(g.isneginf(), w.isneginf()), (
        f"{name}: infinities at different places"
    )
    finite = torch.isfinite(w)
    assert torch.equal(finite, torch.isfinite(r)), f"{name}: the reference disagrees on finiteness"
    if finite.any():
        err = (g[finite] - r[finite]).abs().max().item()
        bound = tol * max(1.0, r[finite].abs().max().item())
        assert err <= bound, f"{name}: max|ours - ref_fp64| = {err:.3e} > {bound:.3e}"


def _poison(where, q, k, v, mask):
    """Puts a NaN or inf into query row 3 (or the last row), key S*2/3 or the float mask entry
    joining them: in a later key block or split where there are several."""
    lq, lkv = q.shape[-2], k.shape[-2]
    i, j = min(3, lq - 1), (2 * lkv) // 3
    if where == "q_nan":
        q[0, 0, i, 5] = NAN
    elif where == "q_inf":
        q[0, 0, i, 5] = INF
    elif where == "k_nan":
        k[0, 1, j, 7] = NAN
    elif where == "k_inf":
        k[0, 1, j, 7] = INF  # +inf scores for queries with q[..., 7] > 0, -inf for the others
    elif where == "v_nan":
        v[0, 0, j, 2] = NAN
    elif where == "mask_nan":
        mask[i, j] = NAN
    elif where == "mask_inf":
        mask[i, j] = INF
    elif where == "mask_nan_alone":
        mask[i] = -INF  # the NaN is the row's only visible score
        mask[i, j] = NAN
    else:
        raise ValueError(where)


# ---------------------------------------------------------------------------------------------
# Forward: NaN and inf in q, k, v and the mask
# ---------------------------------------------------------------------------------------------

WHERE = ["q_nan", "q_inf", "k_nan", "k_inf", "v_nan", "mask_nan", "mask_inf", "mask_nan_alone"]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_nonfinite_forward(kernel, monkeypatch, dtype, where):
    _skip_same_kernel(kernel, dtype)
    for seed, (lq, lkv, block_kv) in enumerate(SHAPES):
        q, k, v = _qkv(lq, lkv, dtype, seed=seed)
        kwargs = {}
        if where.startswith("mask"):
            # Finite biases with some -inf (hidden keys): -inf must stay apart from NaN.
            mask = _randn((lq, lkv), dtype, seed + 50)
            mask[:, 1::5] = -INF
            _poison(where, q, k, v, mask)
            kwargs["attn_mask"] = mask
        else:
            _poison(where, q, k, v, None)
        with monkeypatch.context() as mp:
            if block_kv is not None:
                mp.setenv("AIGC_EXT_CPU_BLOCK_KV", str(block_kv))
            (got,) = ours(q, k, v, **kwargs)
        (want,) = torch_math(q, k, v, **kwargs)
        (ref,) = reference64(q, k, v, **kwargs)
        assert want.isnan().any(), "the case should poison some output"
        assert_same_nonfinite(f"L={lq} S={lkv} out", got, want, ref, TOL[dtype])


# ---------------------------------------------------------------------------------------------
# Non-finite scores at hidden keys: masks are added (they reach the row), causal keys are not read
# ---------------------------------------------------------------------------------------------

# (L, S, key block size or None): decode rows, tiled forward with one and several key blocks,
# several decode key splits.
HIDDEN_SHAPES = [(8, 8, None), (20, 33, None), (70, 300, None), (70, 300, 64), (2, 1100, None)]


def _hidden_key_mask(kind, lq, lkv, j, dtype):
    """A bool or float (lq, lkv) mask hiding key j from every row and every key from row 2,
    with row 5 seeing key j only where the mask is bool (a float mask keeps -inf there too)."""
    keep = torch.rand(lq, lkv, generator=generator(lkv)) < 0.8
    keep[:, j] = False
    keep[min(2, lq - 1)] = False
    if kind == "bool":
        return keep
    return _randn((lq, lkv), dtype, lkv + 1).masked_fill(~keep, -INF)


def _poison_hidden_key(what, q, k, j):
    """NaN in head 0's key j (a NaN score in every row), or +inf, whose scores are +inf in the
    rows where q[..., 7] > 0 (every third row) and -inf in the others: after adding the mask's
    -inf those rows are NaN (+inf - inf), while -inf + -inf stays -inf and takes no part."""
    if what == "nan":
        k[0, 0, j, 3] = NAN
    else:
        k[0, 0, j, 7] = INF
        sign = torch.where(torch.arange(q.shape[-2]) % 3 == 0, 1.0, -1.0).to(q.dtype)
        q[0, 0, :, 7] = q[0, 0, :, 7].abs().clamp_min(1e-2) * sign


@pytest.mark.parametrize("what", ["nan", "inf"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_masked_nan_keys_reach_the_row(kernel, monkeypatch, dtype, mask_kind, what):
    """A NaN score at a key hidden by a bool (False) or float (-inf) mask makes its row NaN,
    as in torch's math backend and torch's fused CPU kernel: masks are added to the scores.
    Rows with no visible key that no NaN reaches stay zeros (head 1, and the rows of +inf)."""
    _skip_same_kernel(kernel, dtype)
    for seed, (lq, lkv, block_kv) in enumerate(HIDDEN_SHAPES):
        q, k, v = _qkv(lq, lkv, dtype, seed=seed)
        j = (2 * lkv) // 3
        _poison_hidden_key(what, q, k, j)
        mask = _hidden_key_mask(mask_kind, lq, lkv, j, dtype)
        with monkeypatch.context() as mp:
            if block_kv is not None:
                mp.setenv("AIGC_EXT_CPU_BLOCK_KV", str(block_kv))
            (got,) = ours(q, k, v, attn_mask=mask)
        (want,) = torch_math(q, k, v, attn_mask=mask)
        (ref,) = reference64(q, k, v, attn_mask=mask)
        name = f"L={lq} S={lkv} {mask_kind} {what}"
        assert_same_nonfinite(name, got, want, ref, TOL[dtype])
        nan_rows = got[0, 0].isnan().any(-1)
        if what == "nan":
            assert nan_rows.all(), f"{name}: the hidden NaN key must reach every row"
        else:
            assert nan_rows.tolist() == (q[0, 0, :, 7] > 0).tolist(), name
        r2 = min(2, lq - 1)
        for h in (0, 1) if what == "inf" else (1,):  # head 0's row 2: a -inf score only
            assert torch.equal(got[0, h, r2], torch.zeros_like(got[0, h, r2])), f"{name}: row 2"
        assert not got[0, 1].isnan().any(), f"{name}: head 1 has no NaN key"


@pytest.mark.parametrize("what", ["nan", "inf"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_masked_nan_keys_backward(kernel, dtype, mask_kind, what):
    """out, dq, dk and dv have NaN where torch's math backward has with a NaN score under a
    bool or float mask, and agree with its float64 results elsewhere; masked rows that no NaN
    reaches have zero dq."""
    _skip_same_kernel(kernel, dtype)
    tol = {F64: 1e-9, F32: 1e-4, BF16: 6e-2, F16: 1e-2}[dtype]
    for seed, (lq, lkv) in enumerate([(8, 8), (20, 33), (40, 300)]):
        q, k, v = _qkv(lq, lkv, dtype, seed=seed)
        j = (2 * lkv) // 3
        _poison_hidden_key(what, q, k, j)
        mask = _hidden_key_mask(mask_kind, lq, lkv, j, dtype)
        grad_out = _randn((1, 2, lq, 16), dtype, seed + 70)
        got = ours(q, k, v, grad_out, attn_mask=mask)
        want = torch_math(q, k, v, grad_out, attn_mask=mask)
        mask64 = mask if mask.dtype == torch.bool else mask.double()
        ref = torch_math(q.double(), k.double(), v.double(), grad_out.double(), attn_mask=mask64)
        for name, g, w, r in zip(("out", "dq", "dk", "dv"), got, want, ref, strict=True):
            assert_same_nonfinite(f"L={lq} S={lkv} {mask_kind} {what} {name}", g, w, r, tol)
        assert got[1][0, 0].isnan().any(), "the hidden key's NaN must reach dq"
        r2 = min(2, lq - 1)
        assert torch.equal(got[1][0, 1, r2], torch.zeros_like(got[1][0, 1, r2]))


def _math_visible_keys(q, k, v, grad_out=None):
    """Causal attention through torch's math with each query row given only the keys it sees
    (``j <= i``): a NaN score of a causally hidden key takes no part there."""
    leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v)]
    qq, kk, vv = leaves
    with sdpa_kernel(SDPBackend.MATH):
        rows = [
            F.scaled_dot_product_attention(
                qq[..., i : i + 1, :], kk[..., : i + 1, :], vv[..., : i + 1, :]
            )
            for i in range(q.shape[-2])
        ]
    out = torch.cat(rows, dim=-2)
    if grad_out is None:
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def torch_flash(q, k, v, grad_out=None, **kwargs):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return _call(F.scaled_dot_product_attention, q, k, v, grad_out, kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_causally_hidden_nan_keys_take_no_part(kernel, monkeypatch, dtype):
    """A NaN score of a key that causal masking hides stays out of the rows before it, as in
    torch's flash kernel (which, like ours, does not read those keys) and unlike torch's math
    backend (which adds -inf to them): the output has NaN exactly in rows i >= j, as torch's
    flash kernel and torch's math over each row's visible keys. With a mask as well, a NaN
    mask entry at a causally hidden key takes no part either (the float64 reference decides;
    torch does not take both)."""
    _skip_same_kernel(kernel, dtype)
    for seed, (lq, lkv, block_kv) in enumerate(HIDDEN_SHAPES[:4]):
        q, k, v = _qkv(lq, lkv, dtype, seed=seed)
        j = min(lkv // 2, lq - 3)
        k[0, 0, j, 3] = NAN
        name = f"L={lq} S={lkv}"
        with monkeypatch.context() as mp:
            if block_kv is not None:
                mp.setenv("AIGC_EXT_CPU_BLOCK_KV", str(block_kv))
            (got,) = ours(q, k, v, is_causal=True)
            mask = _randn((lq, lkv), dtype, seed + 50)
            mask[1, 4] = NAN  # causally hidden from row 1
            mask[lq - 1, lkv - 1] = NAN  # hidden from the last row unless S <= L
            (got_masked,) = ours(q, k, v, is_causal=True, attn_mask=mask)
        (want,) = torch_flash(q, k, v, is_causal=True)
        (visible,) = _math_visible_keys(q, k, v)
        (ref,) = reference64(q, k, v, is_causal=True)
        assert torch.equal(visible.isnan(), want.isnan()), "torch's flash kernel changed"
        assert_same_nonfinite(name, got, want, ref, TOL[dtype])
        assert got[0, 0].isnan().any(-1).tolist() == [i >= j for i in range(lq)], name
        assert not got[0, 1].isnan().any(), f"{name}: head 1 has no NaN key"
        (ref,) = reference64(q, k, v, is_causal=True, attn_mask=mask)
        assert_same_nonfinite(f"{name} with a mask", got_masked, ref, ref, TOL[dtype])
        want_rows = [i == lq - 1 and lkv <= lq for i in range(lq)]  # row 1's NaN is hidden
        assert got_masked[0, 1].isnan().any(-1).tolist() == want_rows, f"{name} with a mask"


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=_ids)
def test_causally_hidden_nan_keys_backward(kernel, dtype):
    """Causal backward with a NaN key: NaN wherever torch's math over each row's visible keys
    has NaN, and only where torch's causal math has; the rest close to the visible-keys result.
    Between the two lie the ``0 * NaN`` of the key blocks that the kernels read whole (dS K in
    dq, dS of NaN rows at hidden keys in dk), block for block as in torch's flash kernel."""
    _skip_same_kernel(kernel, dtype)
    tol = {F64: 1e-9, F32: 1e-4, BF16: 6e-2}[dtype]
    for seed, (lq, lkv) in enumerate([(8, 8), (20, 33), (70, 300)]):
        q, k, v = _qkv(lq, lkv, dtype, seed=seed)
        j = min(lkv // 2, lq - 3)
        k[0, 0, j, 3] = NAN
        grad_out = _randn((1, 2, lq, 16), dtype, seed + 70)
        got = ours(q, k, v, grad_out, is_causal=True)
        visible = _math_visible_keys(q.double(), k.double(), v.double(), grad_out.double())
        full = torch_math(q, k, v, grad_out, is_causal=True)
        for name, g, r, f in zip(("out", "dq", "dk", "dv"), got, visible, full, strict=True):
            name = f"L={lq} S={lkv} {name}"
            missing = r.isnan() & ~g.isnan()
            assert not missing.any(), f"{name}: {int(missing.sum())} NaN of the visible keys lost"
            extra = g.isnan() & ~f.isnan()
            assert not extra.any(), f"{name}: {int(extra.sum())} NaN where torch's math has none"
            keep = ~g.isnan()
            err = (g[keep].double() - r[keep]).abs().max().item()
            bound = tol * max(1.0, r[keep].abs().max().item())
            assert err <= bound, f"{name}: max|ours - visible keys| = {err:.3e} > {bound:.3e}"
        assert not got[0][0, 0, :j].isnan().any(), "rows before the NaN key are finite"
        assert got[1][0, 0, :j, :3].isfinite().all() and got[1][0, 0, :j, 4:].isfinite().all()


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=_ids)
def test_reference_backend_hidden_nan_keys(dtype):
    """The ``reference`` backend follows the same rules: a NaN score under a bool or float mask
    makes its row NaN (out and grads with torch's math NaN pattern), a causally hidden one takes
    no part (torch's math over each row's visible keys), also when a mask is given as well."""
    lq, lkv = 20, 33
    j = 16
    q, k, v = _qkv(lq, lkv, dtype, seed=3)
    grad_out = _randn((1, 2, lq, 16), dtype, 73)

    def reference(q, k, v, grad_out=None, **kwargs):
        with aigc_ext.use_backend("reference"):
            return _call(aigc_ext.scaled_dot_product_attention, q, k, v, grad_out, kwargs)

    for what in ("nan", "inf"):
        qq, kk = q.clone(), k.clone()
        _poison_hidden_key(what, qq, kk, j)
        for mask_kind in ("bool", "float"):
            mask = _hidden_key_mask(mask_kind, lq, lkv, j, dtype)
            got = reference(qq, kk, v, grad_out, attn_mask=mask)
            want = torch_math(qq, kk, v, grad_out, attn_mask=mask)
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
                assert torch.equal(g.isnan(), w.isnan()), f"{mask_kind} {what} {name}: NaN pattern"
            assert got[0][0, 0].isnan().any(-1).tolist() == (
                [True] * lq if what == "nan" else (qq[0, 0, :, 7] > 0).tolist()
            )
            assert torch.equal(got[0][0, 1, 2], torch.zeros_like(got[0][0, 1, 2]))
    kk = k.clone()
    kk[0, 0, j, 3] = NAN
    got = reference(q, kk, v, grad_out, is_causal=True)
    visible = _math_visible_keys(q, kk, v, grad_out)
    full = torch_math(q, kk, v, grad_out, is_causal=True)
    for name, g, w, f in zip(("out", "dq", "dk", "dv"), got, visible, full, strict=True):
        missing = w.isnan() & ~g.isnan()
        assert not missing.any(), f"causal {name}: {int(missing.sum())} NaN lost"
        assert not (g.isnan() & ~f.isnan()).any(), f"causal {name}: NaN beyond torch's math"
    assert got[0][0, 0].isnan().any(-1).tolist() == [i >= j for i in range(lq)]
    mask = _randn((lq, lkv), dtype, 51)
    mask[1, 4] = NAN  # causally hidden from row 1: no part
    (got,) = reference(q, k, v, is_causal=True, attn_mask=mask)
    assert torch.isfinite(got).all()


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["k_nan", "q_nan", "mask_nan"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=_ids)
def test_nonfinite_backward(kernel, dtype, where):
    """out, dq, dk, dv have NaN where torch's math backward has, and agree elsewhere."""
    _skip_same_kernel(kernel, dtype)
    for seed, (lq, lkv) in enumerate([(8, 8), (2, 33), (40, 300)]):
        q, k, v = _qkv(lq, lkv, dtype, seed=seed)
        kwargs = {}
        mask = None
        if where == "mask_nan":
            mask = _randn((lq, lkv), dtype, seed + 50)
            kwargs["attn_mask"] = mask
        _poison(where, q, k, v, mask)
        grad_out = _randn((1, 2, lq, 16), dtype, seed + 70)
        got = ours(q, k, v, grad_out, **kwargs)
        want = torch_math(q, k, v, grad_out, **kwargs)
        # Finite values from torch's math backend in float64 (our reference's backward goes
        # through torch.where, which differs in which gradients it makes NaN).
        ref = torch_math(q.double(), k.double(), v.double(), grad_out.double(), **kwargs)
        for name, g, w, r in zip(("out", "dq", "dk", "dv"), got, want, ref, strict=True):
            assert_same_nonfinite(f"L={lq} S={lkv} {name}", g, w, r, 1e-4 if dtype == F32 else 1e-9)
        assert got[0].isnan().any()


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=_ids)
def test_fully_masked_rows_stay_zero(kernel, dtype):
    """Rows with no visible key: zero output and zero dq, also when another row is NaN; with
    every key hidden from every row, all zeros."""
    _skip_same_kernel(kernel, dtype)
    for lq, lkv in [(2, 33), (40, 300)]:
        q, k, v = _qkv(lq, lkv, dtype)
        grad_out = _randn((1, 2, lq, 16), dtype, 70)
        hidden = torch.zeros(lq, lkv, dtype=torch.bool)
        got = ours(q, k, v, grad_out, attn_mask=hidden)
        for name, g in zip(("out", "dq", "dk", "dv"), got, strict=True):
            assert torch.equal(g, torch.zeros_like(g)), f"L={lq} S={lkv} all hidden: {name}"
    for seed, (lq, lkv) in enumerate([(8, 8), (40, 300)]):
        q, k, v = _qkv(lq, lkv, dtype, seed=seed)
        q[0, 0, 5, 1] = NAN
        mask = torch.rand(lq, lkv, generator=generator(seed)) < 0.7
        mask[2] = False
        grad_out = _randn((1, 2, lq, 16), dtype, seed + 70)
        got = ours(q, k, v, grad_out, attn_mask=mask)
        want = torch_math(q, k, v, grad_out, attn_mask=mask)
        out, dq = got[0], got[1]
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
        assert torch.equal(dq[:, :, 2], torch.zeros_like(dq[:, :, 2]))
        assert out[0, 0, 5].isnan().all() and not out[0, 0, :5].isnan().any()
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert torch.equal(g.isnan(), w.isnan()), f"L={lq} S={lkv} {name}: NaN pattern"


# ---------------------------------------------------------------------------------------------
# Huge finite scores
# ---------------------------------------------------------------------------------------------


def _forward_op(q, k, v, scale, attn_mask=None):
    """(out, lse) of the operator under the cpu backend's kernel."""
    return torch.ops.aigc_ext.attention_forward(q, k, v, attn_mask, False, scale)


def _assert_close_to_reference(name, q, k, v, scale, attn_mask=None, lse_rtol=2e-6):
    """Finite out and lse, out within TOL and lse within lse_rtol (relative) of the reference."""
    out, lse = _forward_op(q, k, v, scale, attn_mask)
    mask64 = attn_mask.double() if attn_mask is not None else None
    ref_out, ref_lse = attention_forward_reference(
        q.double(), k.double(), v.double(), mask64, False, scale
    )
    assert torch.isfinite(ref_out).all() and torch.isfinite(ref_lse).all()
    bad = int((~torch.isfinite(out)).sum())
    assert bad == 0, f"{name}: {bad} of {out.numel()} outputs not finite"
    err = (out.double() - ref_out).abs().max().item()
    assert err <= TOL[q.dtype] * max(1.0, ref_out.abs().max().item()), (
        f"{name}: out error {err:.3e}"
    )
    assert torch.isfinite(lse).all(), f"{name}: lse not finite"
    lse_err = ((lse.double() - ref_lse).abs() / ref_lse.abs().clamp_min(1.0)).max().item()
    assert lse_err <= lse_rtol, f"{name}: lse error {lse_err:.3e}"


@pytest.mark.parametrize("scale", [1e4, 1e8, 1e12])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_large_scale_stays_finite(kernel, dtype, scale):
    """scale * q.k up to ~1e13: finite and close to the float64 reference (decode and tiled)."""
    _skip_same_kernel(kernel, dtype)
    for lq in (8, 70):
        q, k, v = _qkv(lq, 300, dtype, e=64, seed=lq)
        _assert_close_to_reference(f"L={lq} scale={scale:g}", q, k, v, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_huge_common_offset_exact(kernel, monkeypatch, dtype):
    """Scores 2^22 plus multiples of 1/2 (exact in every dtype's accumulation): a spread-out
    softmax around a huge maximum, as accurate as around zero; and one key with a huge score in
    a later key block after ordinary ones (the lazy rescaling's switch to exact shifts)."""
    _skip_same_kernel(kernel, dtype)
    monkeypatch.setenv("AIGC_EXT_CPU_BLOCK_KV", "64")
    for seed, lq in enumerate((4, 40)):
        gen = generator(seed)
        q = torch.randint(-2, 3, (1, 2, lq, 16), generator=gen).float()
        k = torch.randint(-2, 3, (1, 2, 200, 16), generator=gen).float()
        q[..., 0], k[..., 0] = 4096.0, 2048.0
        v = _randn((1, 2, 200, 16), F32, seed)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        _assert_close_to_reference(f"L={lq} offset", q, k, v, 0.5)

        q, k, v = _qkv(lq, 200, dtype, seed=seed + 10)
        k[0, :, 150] *= 1000.0  # scores ~ +-4e5 at scale 100: the row's maximum or nothing
        # lse: fp32 dot products of such keys are good to ~1e-6 of the sum of |q_e k_e|.
        _assert_close_to_reference(f"L={lq} huge key", q, k, v, 100.0, lse_rtol=3e-5)


@pytest.mark.parametrize("dtype", [F32, F64], ids=_ids)
def test_large_scale_backward_finite(kernel, dtype):
    """Gradients at scale 1e8 stay finite (the probabilities are recomputed from a huge lse)
    and dv, a sum of probabilities times dout, matches the float64 reference."""
    _skip_same_kernel(kernel, dtype)
    for lq in (8, 70):
        q, k, v = _qkv(lq, 300, dtype, e=64, seed=lq)
        grad_out = _randn((1, 2, lq, 64), dtype, 90)
        got = ours(q, k, v, grad_out, scale=1e8)
        ref = reference64(q, k, v, grad_out, scale=1e8)
        for name, g in zip(("out", "dq", "dk", "dv"), got, strict=True):
            assert torch.isfinite(g).all(), f"L={lq} {name}: not finite"
        err = (got[3].double() - ref[3]).abs().max().item()
        assert err <= 1e-4 * max(1.0, ref[3].abs().max().item()), f"L={lq} dv error {err:.3e}"
