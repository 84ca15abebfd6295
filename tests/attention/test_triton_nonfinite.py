"""Non-finite inputs and huge scores on the ``triton`` backend, against torch's math backend.

The yardstick is ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` on the same inputs in the
same dtype: a score that is NaN (NaN in q, k or a float mask; ``inf * 0`` or ``inf - inf`` from
+-inf in q or k) makes its row NaN, and masks are *added* to the scores, so a NaN score under a
hidden position (bool False, float -inf) still makes the row NaN. NaN in v reaches every row
through ``P V`` (``0 * NaN = NaN``). Without causal masking the kernels read every (query, key)
pair and must give exactly torch's NaN pattern in out, dq, dk and dv. With causal masking they
never read the key blocks above the diagonal (torch's math adds -inf there and still sees the
NaN): ours must be NaN wherever torch's math restricted to the visible keys is, and only where
torch's causal math is (see :func:`test_causal_nonfinite_between_visible_keys_and_torch`).

Fully masked rows stay zeros with zero gradients (-inf from masking is not NaN), and huge
finite scores (``scale`` up to 1e12) never overflow the online softmax.

Under the Triton interpreter (no GPU) the shapes are tiny and bfloat16 is left out (its dot is
wrong there); on a GPU (``AIGC_EXT_TEST_DEVICE=cuda``) bfloat16 runs too. The last test
compiles the forward kernel for sm90 and checks that the exponent of the softmax is not an FMA
of the scale multiply, which the interpreter cannot show.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sdpa_testing import DEVICE, Result, fused_backends, make_qkv, randn, run_ours
from torch.nn.attention import SDPBackend, sdpa_kernel

from aigc_ext.backends.reference.ops import sdpa_reference
from aigc_ext.backends.triton import backend as triton_backend

TRITON = "triton"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAN, INF = float("nan"), float("inf")
ON_GPU = DEVICE == "cuda" and not triton_backend.interpreter_enabled()
DTYPES = [F32, F16, *([BF16] if ON_GPU else [])]
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    TRITON not in fused_backends(DEVICE), reason=f"the triton backend does not run on {DEVICE!r}"
)

# Query rows span two dK/dV query blocks of the interpreter (32 rows) with a ragged tail; keys
# span three forward key blocks (32) with a ragged tail. Row 4 is fully masked and key 66 is
# hidden from every row by the masks below.
B, H, L, S, E = 1, 2, 37, 70, 16
MASKED_ROW, HIDDEN_KEY = 4, 66


def _ids(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def _tol(dtype: torch.dtype) -> float:
    """Absolute tolerance, relative to the largest reference value, of ours vs torch's math."""
    return 2e-4 if dtype == F32 else 3e-2


def _math(q, k, v, grad_out, **kwargs) -> Result:
    """torch's math backend in the input dtype: out and the grads of q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*leaves, **kwargs)
    return Result(out.detach(), torch.autograd.grad(out, leaves, grad_out))


def _math_visible_keys(q, k, v, grad_out) -> Result:
    """Causal attention through torch's math with each query row given only the keys it sees
    (``j <= i``): what a non-finite value reaches when hidden keys are not part of a row."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    qq, kk, vv = leaves
    rows = []
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(q.shape[-2]):
            n = min(i + 1, k.shape[-2])
            rows.append(
                F.scaled_dot_product_attention(
                    qq[..., i : i + 1, :], kk[..., :n, :], vv[..., :n, :]
                )
            )
    out = torch.cat(rows, dim=-2)
    return Result(out.detach(), torch.autograd.grad(out, leaves, grad_out))


def _pairs(ours: Result, ref: Result):
    names = ("out", "dq", "dk", "dv")
    return zip(names, (ours.out, *ours.grads), (ref.out, *ref.grads), strict=True)


def _assert_close_where_not_nan(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Values agree wherever ``ours`` is not NaN (infinities must match exactly)."""
    keep = ~torch.isnan(ours)
    a, r = ours[keep].double(), ref[keep].double()
    assert not torch.isnan(r).any(), f"{name}: ours is a number where the reference is NaN"
    finite = torch.isfinite(r)
    assert torch.equal(a[~finite], r[~finite]), f"{name}: infinities differ"
    scale = max(1.0, r[finite].abs().max().item()) if finite.any() else 1.0
    tol = _tol(ours.dtype) * scale
    torch.testing.assert_close(
        a[finite], r[finite], rtol=0.0, atol=tol, msg=lambda m: f"{name}: {m}"
    )


def _assert_same_nan(ours: Result, ref: Result) -> None:
    for name, a, r in _pairs(ours, ref):
        nan_a, nan_r = torch.isnan(a), torch.isnan(r)
        assert torch.equal(nan_a, nan_r), (
            f"{name}: NaN at {int(nan_a.sum())} entries, torch's math at {int(nan_r.sum())}; "
            f"first differing index {tuple((nan_a != nan_r).nonzero()[0].tolist())}"
        )
        _assert_close_where_not_nan(name, a, r)


def _masks(kind: str, dtype: torch.dtype):
    """None, or a bool / float (L, S) mask with row ``MASKED_ROW`` and key ``HIDDEN_KEY``
    hidden everywhere."""
    if kind == "none":
        return None
    keep = torch.rand(L, S, generator=torch.Generator().manual_seed(7)) < 0.75
    keep[MASKED_ROW] = False
    keep[:, HIDDEN_KEY] = False
    keep = keep.to(DEVICE)
    if kind == "bool":
        return keep
    bias = randn((L, S), F32, seed=8).masked_fill(~keep, -INF)
    return bias.to(dtype)


def _inject(case: str, q, k, v, mask):
    """Puts the non-finite value of ``case`` into head 0 at a hidden place (the fully masked
    row, the key hidden from every row, both in ragged tail blocks of some kernel) and into
    head 1 at a visible one. For +-inf in k, head 1's query column makes key 3's score -inf in
    every row: no NaN in torch's math, and none may come from the padded query rows of the
    dK/dV kernel (whose q is zero: ``inf * 0``). For +-inf in q, head 1's key column makes
    every score of row 10 -inf: torch's math gives that row zeros, not NaN."""
    q, k, v = q.clone(), k.clone(), v.clone()
    what, value = case.split(":")
    x = {"nan": NAN, "+inf": INF, "-inf": -INF}[value]
    if what == "q":
        q[0, 0, MASKED_ROW, 3] = x
        q[0, 1, L - 1, 7] = x
        if value != "nan":  # row 10 of head 1: every score -inf (zeros, as a masked row)
            k[0, 1, :, 5] = -k[0, 1, :, 5].abs() * (1 if x > 0 else -1)
            q[0, 1, 10, 5] = x
    elif what == "k":
        k[0, 0, HIDDEN_KEY, 3] = x
        k[0, 1, 3, 7] = x
        if value != "nan":
            q[0, 1, :, 7] = -q[0, 1, :, 7].abs() * (1 if x > 0 else -1)
    elif what == "v":
        v[0, 0, HIDDEN_KEY, 3] = x
        v[0, 1, 3, 7] = x
    elif what == "mask":
        mask = mask.clone()
        mask[5, 20] = x
        mask[L - 1, S - 1] = x
        mask[MASKED_ROW, 10] = x
    return q, k, v, mask


# The NaN logic does not depend on the dtype (the scores are float32 in every one), and the
# interpreter is slow: float32 runs both signs of +-inf, the other dtypes one sign each.
CASES = ["q:nan", "k:nan", "v:nan", "q:+inf", "k:-inf"]
MIRRORED = ["q:-inf", "k:+inf"]
MASK_KINDS = ("none", "bool", "float")


def _with_dtypes(params, f32_only=()):
    """``(dtype, *param)`` for every dtype, and for float32 also ``f32_only``."""
    return [(dtype, *p) for dtype in DTYPES for p in (*params, *(f32_only if dtype == F32 else ()))]


@pytest.mark.parametrize(
    ("dtype", "case", "mask_kind"),
    _with_dtypes(
        [*((c, m) for c in CASES for m in MASK_KINDS), ("mask:nan", "float")],
        [(c, m) for c in MIRRORED for m in MASK_KINDS],
    ),
    ids=lambda x: _ids(x) or x,
)
def test_nonfinite_matches_torch_math(dtype, case, mask_kind):
    """Same NaN entries as torch's math backend in out, dq, dk, dv; the rest close to it."""
    q, k, v = make_qkv(B, H, H, L, S, E, dtype=dtype, seed=11)
    q, k, v, mask = _inject(case, q, k, v, _masks(mask_kind, dtype))
    grad_out = randn((B, H, L, E), dtype, seed=12)
    ours = run_ours(TRITON, q, k, v, grad_out=grad_out, attn_mask=mask)
    _assert_same_nan(ours, _math(q, k, v, grad_out, attn_mask=mask))
    assert torch.isnan(ours.out).any()  # the injected value did reach the output


@pytest.mark.parametrize(
    ("dtype", "case"),
    _with_dtypes([("k:nan",), ("k:-inf",)], [("q:nan",), ("v:nan",), ("q:+inf",)]),
    ids=lambda x: _ids(x) or x,
)
def test_causal_nonfinite_between_visible_keys_and_torch(dtype, case):
    """Causal: NaN wherever torch's math over each row's visible keys gives NaN, and only
    where torch's causal math gives NaN; numbers close to the visible-keys result.

    Head 0 gets the value at row / key 20 (seen by rows 20..), head 1 at the last row or at
    key 60, which no query row sees (L < S). Between the two bounds lie the NaN that reach a
    hidden pair inside a block the kernels read (``0 * NaN`` in ``P V`` and in ``dS``)."""
    lq, lkv = 45, 70
    q, k, v = make_qkv(1, 2, 2, lq, lkv, E, dtype=dtype, seed=21)
    x = {"nan": NAN, "+inf": INF, "-inf": -INF}[case.split(":")[1]]
    t = {"q": q, "k": k, "v": v}[case[0]]
    t[0, 0, 20, 3] = x
    t[0, 1, lq - 1 if case[0] == "q" else 60, 7] = x
    if case == "k:-inf":  # -inf scores in every row: no NaN may come from padded query rows
        q[..., 3], q[..., 7] = q[..., 3].abs(), q[..., 7].abs()
    grad_out = randn((1, 2, lq, E), dtype, seed=22)
    ours = run_ours(TRITON, q, k, v, grad_out=grad_out, is_causal=True)
    visible = _math_visible_keys(q, k, v, grad_out)
    full = _math(q, k, v, grad_out, is_causal=True)
    for (name, a, r), f in zip(_pairs(ours, visible), (full.out, *full.grads), strict=True):
        nan_a = torch.isnan(a)
        missing = torch.isnan(r) & ~nan_a
        assert not missing.any(), f"{name}: {int(missing.sum())} NaN of the visible keys lost"
        extra = nan_a & ~torch.isnan(f)
        assert not extra.any(), f"{name}: {int(extra.sum())} NaN where torch's math has none"
        _assert_close_where_not_nan(name, a, r)
    assert any(torch.isnan(t).any() for t in (visible.out, *visible.grads))


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_fully_masked_rows_stay_zero_next_to_nan(kind):
    """Rows that see no key give zeros and zero grads, never NaN, also when another head of
    the same call holds NaN; causal with L > S has no such row and stays finite."""
    lq, lkv = (50, 20) if kind == "causal" else (L, S)
    q, k, v = make_qkv(1, 2, 2, lq, lkv, E, dtype=F32, seed=31)
    q[0, 0, 7, 2] = NAN  # head 0 only
    mask = None if kind == "causal" else _masks(kind, F32)
    grad_out = randn((1, 2, lq, E), F32, seed=32)
    ours = run_ours(TRITON, q, k, v, grad_out=grad_out, attn_mask=mask, is_causal=kind == "causal")
    _assert_same_nan(ours, _math(q, k, v, grad_out, attn_mask=mask, is_causal=kind == "causal"))
    for t in (ours.out, *ours.grads):
        assert torch.isfinite(t[0, 1]).all()
    if kind != "causal":
        out, (dq, dk, dv) = ours.out[0, 1], (g[0, 1] for g in ours.grads)
        assert (out[MASKED_ROW] == 0).all() and (dq[MASKED_ROW] == 0).all()
        assert (dk[HIDDEN_KEY] == 0).all() and (dv[HIDDEN_KEY] == 0).all()


@pytest.mark.parametrize(
    ("dtype", "scale", "is_causal"),
    _with_dtypes([(1e8, False), (1e12, True)], [(1e8, True), (1e12, False)]),
    ids=lambda x: _ids(x) or (("causal" if x else "full") if isinstance(x, bool) else None),
)
def test_huge_scale_stays_finite(dtype, scale, is_causal):
    """Scores near 1e9..1e13: the softmax is one-hot and out is the value row of the top
    score, equal to the float64 reference rounded to the dtype. The gradients are finite
    wherever the reference is finite, but not accurate: the backward recomputes probabilities
    from a float32 logsumexp whose rounding exceeds 1 at such scores, and its float32 rounding
    noise in dS is multiplied by the scale, which at 1e12 overflows float16's range (there dQ
    and dK may be +-inf, never NaN)."""
    q = randn((1, 2, 8, 64), dtype, seed=41)
    k = randn((1, 2, 300, 64), dtype, seed=42)
    v = randn((1, 2, 300, 64), dtype, seed=43)
    grad_out = randn((1, 2, 8, 64), dtype, seed=44)
    ours = run_ours(TRITON, q, k, v, grad_out=grad_out, scale=scale, is_causal=is_causal)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = sdpa_reference(*leaves, scale=scale, is_causal=is_causal)
    grads64 = torch.autograd.grad(out64, leaves, grad_out.double())
    assert torch.isfinite(ours.out).all()
    torch.testing.assert_close(ours.out, out64.to(dtype))
    wide = torch.finfo(dtype).max > 1e30  # float32, bfloat16
    for name, a, r in zip(("dq", "dk", "dv"), ours.grads, grads64, strict=True):
        assert not torch.isnan(a).any(), f"{name}: NaN"
        if wide or scale <= 1e8 or name == "dv":
            bad = torch.isfinite(r) & ~torch.isfinite(a)
            assert not bad.any(), (
                f"{name}: {int(bad.sum())} non-finite where the reference is finite"
            )


_PTX_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from aigc_ext.backends.triton import compile_check as cc, kernels as K
consts = {"BLOCK_D": 64, "BLOCK_DV": 64, "EVEN_D": True, "EVEN_DV": True, "IS_CAUSAL": False,
          "MASK_MODE": 0, "MASK_BOOL": False, "PRECISE": False, "UPCAST": False,
          "BLOCK_M": 128, "BLOCK_N": 64}
ptrs = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "M": "*fp32", "LSE": "*fp32", "Out": "*fp16"}
src = cc._source(K.attn_fwd.fn, ptrs, consts, ("qk_scale",))
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": 8, "num_stages": 3}).asm["ptx"]
print(ptx)
"""


def _defining_ops(ptx: str) -> dict[str, str]:
    """Register -> opcode of the PTX instruction that writes it."""
    defs = {}
    for m in re.finditer(r"^\s*([a-z][\w.]*)\s+(%\w+),", ptx, re.MULTILINE):
        defs[m.group(2)] = m.group(1)
    return defs


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


@pytest.mark.skipif(DEVICE == "cuda", reason="compiled and run by the tests above on a GPU")
@pytest.mark.skipif(not _ptxas_available(), reason="Triton's ptxas is not available")
def test_forward_exponent_is_not_fused_with_the_scale():
    """sm90 code of the forward kernel, FP fusion on (Triton's default before 3.10): an
    ``fma(dot, scale, -max)`` exponent gives the top score ``2**rounding-error`` instead of
    1, which at scale 1e12 is inf or 0 (NaN or a zero row). Every ``ex2`` must read an
    exactly rounded difference of scores, not an FMA."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = proc.stdout
    defs = _defining_ops(ptx)
    sources = re.findall(r"^\s*ex2\.approx[\w.]*\s+%\w+,\s*(%\w+);", ptx, re.MULTILINE)
    assert len(sources) >= 64  # one per score of a thread's tile, and the rescaling
    fused = [s for s in sources if defs.get(s, "").startswith("fma")]
    assert not fused, f"{len(fused)} of {len(sources)} exp2 arguments are FMAs"
