"""The CPU forward's fused softcap: ``softcap * tanh(s / softcap)`` computed inside the
exponential pass of the tiled forward (query blocks past the decoding path), not in a pass of
its own.

That pass starts at each row's first visible key (the window's left edge, where the capped
value of the -inf before it would be -softcap, not -inf), takes the row maximum as the cap of
the raw maximum (the softcap is increasing), redoes rows whose later key blocks raise the
maximum, and falls back to the exact update for caps beyond the lazy bound. Every instruction
set this build carries and both bf16 GEMM engines are run against the float64 oracle with
FlashAttention's 2x error rule, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from flash_testing import cpu_ready, naive_dense, rand
from sdpa_testing import cpu_isa, cpu_isa_supported, cpu_kernel

from aigc_ext import flash_attn_interface as fa
from aigc_ext.testing import check_error_rule

pytestmark = pytest.mark.skipif(not cpu_ready(), reason="no C++ flash op")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (L, S, D, causal, window, softcap, scale of q and k, gradients)
CASES = [
    (
        130,
        390,
        64,
        True,
        (-1, -1),
        30.0,
        (3.0, 1.0),
        True,
    ),  # causal, bottom-right, several key blocks
    (200, 333, 80, False, (70, 40), 5.0, (2.0, 1.0), True),  # window: rows start mid-block (lo > 0)
    (
        96,
        700,
        64,
        False,
        (-1, -1),
        2.0,
        (6.0, 1.0),
        True,
    ),  # scores far past the cap: tanh saturates
    # A cap far above the scores: tanh of small arguments, where 1 - 2 / (e^2x + 1) would lose
    # its relative accuracy (absolute error ~1e-7 times the cap in every score).
    (100, 260, 64, True, (-1, -1), 1.0e4, (20.0, 1.0), True),
    # Scores past the lazy rescaling bound (2^17) under a larger cap: the exact update. Such
    # peaked rows leave the gradients to fp32 rounding: the forward is checked.
    (64, 300, 32, True, (-1, -1), 1.0e6, (600.0, 600.0), False),
]


def _reference(q, k, v, g, *, dtype, causal, window, softcap):
    """float64 oracle and the same computation in ``dtype``: output and input gradients."""
    results = []
    for dt in (torch.float64, dtype):
        qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        out, _ = naive_dense(
            qq,
            kk,
            vv,
            scale=q.shape[-1] ** -0.5,
            causal=causal,
            window=window,
            softcap=softcap,
            alibi=None,
        )
        out.backward(g.to(dt))
        results.append((out, qq.grad, kk.grad, vv.grad))
    return results


def _run(case, dtype):
    lq, lk, d, causal, window, softcap, amp, grad = case
    q = (rand((1, lq, 4, d), seed=2) * amp[0]).to(dtype)
    k = (rand((1, lk, 2, d), seed=3) * amp[1]).to(dtype)
    v = rand((1, lk, 2, d), seed=4).to(dtype)
    g = rand((1, lq, 4, d), seed=5).to(dtype)
    ref, base = _reference(q, k, v, g, dtype=dtype, causal=causal, window=window, softcap=softcap)
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fa.flash_attn_func(
        qq, kk, vv, softmax_scale=d**-0.5, causal=causal, window_size=window, softcap=softcap
    )
    ours = [out]
    if grad:
        out.backward(g)
        ours += [qq.grad, kk.grad, vv.grad]
    for name, o, r, b in zip(["out", "dq", "dk", "dv"], ours, ref, base, strict=False):
        result = check_error_rule(o.detach().double(), r.detach(), b.detach().double())
        assert result.ok, result.describe(f"{name} ({dtype}, L={lq} S={lk} D={d})")


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-cap{c[5]:g}")
def test_fused_softcap_every_isa(case, isa, dtype):
    with cpu_isa(isa):
        _run(case, dtype)


@pytest.mark.parametrize("use_amx", [True, False], ids=["amx", "no-amx"])
def test_fused_softcap_bf16_engines(use_amx):
    with cpu_kernel(use_amx=use_amx):
        for case in CASES[:3]:
            _run(case, BF16)


def test_softcap_never_reaches_keys_before_the_window():
    """Keys left of the window take no part, whatever their scores: a key whose value is huge
    changes nothing for the rows that cannot see it."""
    q = rand((1, 160, 2, 64), seed=6).to(F32)
    k = rand((1, 160, 2, 64), seed=7).to(F32)
    v = rand((1, 160, 2, 64), seed=8).to(F32)
    out = fa.flash_attn_func(q, k, v, causal=True, window_size=(16, 0), softcap=4.0)
    v2 = v.clone()
    v2[:, :80] = 1.0e6  # hidden from every row >= 97 (its window starts at row - 16 > 80)
    out2 = fa.flash_attn_func(q, k, v2, causal=True, window_size=(16, 0), softcap=4.0)
    torch.testing.assert_close(out2[:, 97:], out[:, 97:], rtol=0, atol=0)


def _tier_problem(cap: float, span: float, order: str, *, lq: int = 96, lk: int = 1600):
    """Scores ``s = q_i k_j`` laid out exactly: the scaled score of key j is ``y_j * cap * row
    factor`` with ``y_j`` spread over ``[-span, span]`` (head dim 8, one nonzero component,
    scale 1). ``order`` places the keys: ``up`` (each key block's maximum above the last by
    more than the lazy bound: the rows are redone), ``down`` and ``shuffled``."""
    y = torch.linspace(-span, span, lk, dtype=torch.float64)
    if order == "down":
        y = y.flip(0)
    elif order == "shuffled":
        y = y[torch.randperm(lk, generator=torch.Generator().manual_seed(9))]
    k = torch.zeros(1, lk, 2, 8, dtype=torch.float64)
    k[..., 0] = (y * cap)[None, :, None]
    q = torch.zeros(1, lq, 4, 8, dtype=torch.float64)
    q[..., 0] = 0.75 + 0.25 * torch.rand(1, lq, 4, generator=torch.Generator().manual_seed(10))
    v = rand((1, lk, 2, 8), seed=11).double()
    return q, k, v


# (dtype, kernel settings, log-sum-exp tolerance): the tiers' claims (bf16: 2^-12 ln 2 in the
# exponent; fp32: tanh's fit to under 1 ulp) with room for the fp32 row sums.
TIER_RUNS = {
    "bf16-amx": (BF16, {"use_amx": True}, 2.0**-11),
    "bf16-no-amx": (BF16, {"use_amx": False}, 2.0**-11),
    "fp32-avx512": (F32, {"isa": "avx512"}, 2.0**-16),
    "fp32-avx2": (F32, {"isa": "avx2"}, 2.0**-16),
}


@pytest.mark.parametrize("run", list(TIER_RUNS))
@pytest.mark.parametrize("order", ["up", "down", "shuffled"])
@pytest.mark.parametrize(
    "cap,span", [(30.0, 0.26), (3.0, 0.34), (300.0, 0.19), (30.0, 0.49), (30.0, 0.6)]
)
def test_fused_softcap_tiers(cap, span, order, run):
    """The fused softcap's polynomial tiers (tanh's Taylor polynomial for bf16 probabilities,
    the small-argument fit for fp32, taken where every score of a row's key block is small
    against the cap) at the edges of their ranges and past them (span 0.6: the full tanh),
    with key blocks whose maxima climb past the lazy bound. The output against the float64
    oracle with the 2x error rule; the log-sum-exp, which the fp32 row sums carry and a tier's
    exponent error shifts directly, within the tier's tolerance of it."""
    dtype, settings, lse_tol = TIER_RUNS[run]
    if "isa" in settings and not cpu_isa_supported(settings["isa"]):
        pytest.skip(f"CPU ISA {settings['isa']} not compiled in or not supported here")
    q16, k16, v16 = (t.to(dtype) for t in _tier_problem(cap, span, order))
    kw = {"scale": 1.0, "causal": False, "window": (-1, -1), "softcap": cap, "alibi": None}
    ref, ref_lse = naive_dense(q16.double(), k16.double(), v16.double(), **kw)
    base, _ = naive_dense(q16, k16, v16, **kw)
    with cpu_kernel(**settings):
        out, lse, _ = fa.flash_attn_func(
            q16, k16, v16, softmax_scale=1.0, softcap=cap, return_attn_probs=True
        )
    what = f"{run}, cap {cap}, span {span}, keys {order}"
    result = check_error_rule(out.double(), ref, base.double())
    assert result.ok, result.describe(f"out ({what})")
    lse_err = (lse.double() - ref_lse).abs().max().item()
    assert lse_err <= lse_tol, f"softmax_lse off by {lse_err:.3g} ({what})"
