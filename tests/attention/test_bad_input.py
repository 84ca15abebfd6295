"""Bad input gets an error that names the argument and the shapes; random input never crashes."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from sdpa_testing import (
    DEVICE,
    ERROR_ATOL,
    ERROR_FACTOR,
    max_abs,
    randn,
    run_ours,
    run_reference64,
    run_torch,
)

import aigc_ext

F32 = torch.float32


def t(*shape, dtype=F32, device=None):
    return torch.zeros(shape, dtype=dtype, device=device or DEVICE)


def shape_str(*shape) -> str:
    return re.escape(str(tuple(shape)))


# (id, args, kwargs, exception, regex the message must match)
BAD_CALLS = [
    ("query-1d", (t(8), t(5, 8), t(5, 8)), {}, ValueError, r"query .*2 dims.*" + shape_str(8)),
    ("key-1d", (t(4, 8), t(8), t(5, 8)), {}, ValueError, r"key .*2 dims.*" + shape_str(8)),
    ("value-0d", (t(4, 8), t(5, 8), torch.tensor(1.0)), {}, ValueError, r"value .*2 dims.*\(\)"),
    (
        "rank-mismatch-heads",
        (t(2, 3, 4, 8), t(4, 5, 8), t(4, 5, 8)),
        {},
        ValueError,
        r"head counts.*query \(2, 3, 4, 8\), key \(4, 5, 8\), value \(4, 5, 8\)",
    ),
    (
        "batch-mismatch",
        (t(2, 3, 4, 8), t(3, 3, 5, 8), t(3, 3, 5, 8)),
        {},
        ValueError,
        r"batch dims.*query \(2, 3, 4, 8\), key \(3, 3, 5, 8\)",
    ),
    (
        "batch-mismatch-3d",
        (t(3, 4, 8), t(2, 5, 8), t(2, 5, 8)),
        {},
        ValueError,
        r"query \(3, 4, 8\), key \(2, 5, 8\), value \(2, 5, 8\)",
    ),
    (
        "heads-mismatch",
        (t(2, 4, 4, 8), t(2, 2, 5, 8), t(2, 2, 5, 8)),
        {},
        ValueError,
        r"head counts.*enable_gqa.*query \(2, 4, 4, 8\), key \(2, 2, 5, 8\)",
    ),
    (
        "gqa-not-divisible",
        (t(2, 6, 4, 8), t(2, 4, 5, 8), t(2, 4, 5, 8)),
        {"enable_gqa": True},
        ValueError,
        r"enable_gqa.*multiple.*query \(2, 6, 4, 8\), key \(2, 4, 5, 8\)",
    ),
    (
        "gqa-more-kv-heads",
        (t(2, 2, 4, 8), t(2, 4, 5, 8), t(2, 4, 5, 8)),
        {"enable_gqa": True},
        ValueError,
        r"multiple.*query \(2, 2, 4, 8\), key \(2, 4, 5, 8\)",
    ),
    (
        "head-dim-mismatch",
        (t(2, 3, 4, 8), t(2, 3, 5, 7), t(2, 3, 5, 8)),
        {},
        ValueError,
        r"head dims.*query \(2, 3, 4, 8\), key \(2, 3, 5, 7\)",
    ),
    (
        "key-value-seq-mismatch",
        (t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 6, 8)),
        {},
        ValueError,
        r"key and value.*key \(2, 3, 5, 8\), value \(2, 3, 6, 8\)",
    ),
    (
        "key-value-heads-not-dividing",
        (t(2, 4, 4, 8), t(2, 2, 5, 8), t(2, 3, 5, 8)),
        {"enable_gqa": True},
        ValueError,
        r"enable_gqa.*multiple.*key \(2, 2, 5, 8\), value \(2, 3, 5, 8\)",
    ),
    (
        "dtype-mismatch",
        (t(2, 3, 4, 8), t(2, 3, 5, 8, dtype=torch.float64), t(2, 3, 5, 8)),
        {},
        ValueError,
        r"same dtype.*torch\.float32, torch\.float64, torch\.float32.*"
        r"query \(2, 3, 4, 8\), key \(2, 3, 5, 8\), value \(2, 3, 5, 8\)",
    ),
    (
        "dtype-int",
        (t(2, 3, 4, 8, dtype=torch.int32),) * 3,
        {},
        ValueError,
        r"query, key and value have unsupported dtype torch\.int32.*query \(2, 3, 4, 8\)",
    ),
    (
        "device-mismatch",
        (t(2, 3, 4, 8), t(2, 3, 5, 8, device="meta"), t(2, 3, 5, 8)),
        {},
        ValueError,
        r"same device.*meta.*key \(2, 3, 5, 8\)",
    ),
    (
        "mask-not-broadcastable",
        (t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 5, 8)),
        {"attn_mask": t(4, 6, dtype=torch.bool)},
        ValueError,
        r"attn_mask of shape \(4, 6\).*\(2, 3, 4, 5\).*query \(2, 3, 4, 8\), key \(2, 3, 5, 8\)",
    ),
    (
        "mask-too-many-dims",
        (t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 5, 8)),
        {"attn_mask": t(1, 2, 3, 4, 5, dtype=torch.bool)},
        ValueError,
        r"attn_mask of shape \(1, 2, 3, 4, 5\) does not broadcast",
    ),
    (
        "mask-int-dtype",
        (t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 5, 8)),
        {"attn_mask": t(4, 5, dtype=torch.int64)},
        ValueError,
        r"attn_mask must be bool, float32 or the query dtype.*torch\.int64.*attn_mask \(4, 5\)",
    ),
    (
        "mask-half-for-float32",
        (t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 5, 8)),
        {"attn_mask": t(4, 5, dtype=torch.float16)},
        ValueError,
        r"attn_mask.*torch\.float16.*attn_mask \(4, 5\)",
    ),
    (
        "mask-device",
        (t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 5, 8)),
        {"attn_mask": t(4, 5, dtype=torch.bool, device="meta")},
        ValueError,
        r"attn_mask is on meta.*attn_mask \(4, 5\).*query \(2, 3, 4, 8\)",
    ),
    (
        "mask-not-tensor",
        (t(4, 8), t(5, 8), t(5, 8)),
        {"attn_mask": [[True] * 5] * 4},
        TypeError,
        r"attn_mask",
    ),
    (
        "query-not-tensor",
        ([[0.0] * 8] * 4, t(5, 8), t(5, 8)),
        {},
        TypeError,
        r"query must be a Tensor",
    ),
    (
        "dropout-negative",
        (t(4, 8), t(5, 8), t(5, 8)),
        {"dropout_p": -0.1},
        ValueError,
        r"dropout_p.*-0\.1",
    ),
    (
        "dropout-above-1",
        (t(4, 8), t(5, 8), t(5, 8)),
        {"dropout_p": 1.5},
        ValueError,
        r"dropout_p.*1\.5",
    ),
    ("scale-inf", (t(4, 8), t(5, 8), t(5, 8)), {"scale": math.inf}, ValueError, r"scale.*inf"),
    ("scale-nan", (t(4, 8), t(5, 8), t(5, 8)), {"scale": math.nan}, ValueError, r"scale.*nan"),
]


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "pattern"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_input_raises_with_message(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        aigc_ext.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "pattern"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_input_raises_for_forced_backend(backend, args, kwargs, exc, pattern):
    """Validation happens before any backend is chosen, also when one is forced."""
    with aigc_ext.use_backend(backend), pytest.raises(exc, match=pattern):
        aigc_ext.scaled_dot_product_attention(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# direct operator calls
# ---------------------------------------------------------------------------------------------


def _fwd(q, k, v, mask=None, causal=False, scale=0.5):
    return torch.ops.aigc_ext.attention_forward(q, k, v, mask, causal, scale)


BAD_OP_CALLS = [
    ("3d", lambda: _fwd(t(3, 4, 8), t(3, 5, 8), t(3, 5, 8)), r"4-D.*\[3, 4, 8\]"),
    (
        "batch",
        lambda: _fwd(t(2, 3, 4, 8), t(3, 3, 5, 8), t(3, 3, 5, 8)),
        r"batch.*\[2, 3, 4, 8\].*\[3, 3, 5, 8\]",
    ),
    (
        "heads",
        lambda: _fwd(t(2, 3, 4, 8), t(2, 2, 5, 8), t(2, 2, 5, 8)),
        r"heads.*\[2, 3, 4, 8\].*\[2, 2, 5, 8\]",
    ),
    (
        "kv-heads",
        lambda: _fwd(t(2, 4, 4, 8), t(2, 2, 5, 8), t(2, 4, 5, 8)),
        r"heads.*\[2, 2, 5, 8\].*\[2, 4, 5, 8\]",
    ),
    (
        "zero-kv-heads",
        lambda: _fwd(t(2, 4, 4, 8), t(2, 0, 5, 8), t(2, 0, 5, 8)),
        r"heads.*\[2, 0, 5, 8\]",
    ),
    (
        "kv-seq",
        lambda: _fwd(t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 6, 8)),
        r"sequence lengths.*\[2, 3, 5, 8\].*\[2, 3, 6, 8\]",
    ),
    (
        "head-dim",
        lambda: _fwd(t(2, 3, 4, 8), t(2, 3, 5, 7), t(2, 3, 5, 8)),
        r"head dims.*\[2, 3, 4, 8\].*\[2, 3, 5, 7\]",
    ),
    (
        "dtype",
        lambda: _fwd(t(2, 3, 4, 8), t(2, 3, 5, 8, dtype=torch.float64), t(2, 3, 5, 8)),
        r"same dtype",
    ),
    ("int", lambda: _fwd(*(t(2, 3, 4, 8, dtype=torch.int64),) * 3), r"unsupported dtype"),
    (
        "mask-shape",
        lambda: _fwd(t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 5, 8), t(4, 6, dtype=torch.bool)),
        r"attn_mask \[4, 6\].*\[2, 3, 4, 5\]",
    ),
    (
        "mask-5d",
        lambda: _fwd(
            t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 5, 8), t(1, 2, 3, 4, 5, dtype=torch.bool)
        ),
        r"attn_mask \[1, 2, 3, 4, 5\].*4 dims",
    ),
    (
        "mask-dtype",
        lambda: _fwd(t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 5, 8), t(4, 5, dtype=torch.int32)),
        r"attn_mask must be bool, float32 or the query dtype",
    ),
]


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU operator's own checks")
@pytest.mark.parametrize("call", [c[1] for c in BAD_OP_CALLS], ids=[c[0] for c in BAD_OP_CALLS])
def test_operator_rejects_bad_shapes(call):
    pattern = next(c[2] for c in BAD_OP_CALLS if c[1] is call)
    with pytest.raises(RuntimeError, match=pattern):
        call()


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU operator's own checks")
def test_backward_operator_rejects_bad_shapes():
    q, k, v = randn((2, 3, 4, 8)), randn((2, 3, 5, 8), seed=1), randn((2, 3, 5, 6), seed=2)
    out, lse = _fwd(q, k, v)
    bwd = torch.ops.aigc_ext.attention_backward
    with pytest.raises(
        RuntimeError, match=r"grad_out \[2, 3, 4, 8\].*must have shape \[2, 3, 4, 6\]"
    ):
        bwd(t(2, 3, 4, 8), q, k, v, out, lse, None, False, 0.5)
    with pytest.raises(RuntimeError, match=r"grad_out and out must have the query dtype"):
        bwd(out.double(), q, k, v, out, lse, None, False, 0.5)
    with pytest.raises(RuntimeError, match=r"lse must be Float of shape \[2, 3, 4\]"):
        bwd(out, q, k, v, out, lse.double(), None, False, 0.5)
    with pytest.raises(RuntimeError, match=r"lse must be .*\[2, 3, 4\]"):
        bwd(out, q, k, v, out, lse[..., :3], None, False, 0.5)
    with pytest.raises(RuntimeError, match=r"sequence lengths"):
        bwd(out, q, k, v[:, :, :4], out, lse, None, False, 0.5)


def test_operator_rejects_unknown_isa():
    from aigc_ext import ops

    with pytest.raises(RuntimeError, match="unknown CPU ISA 'avx9000'"):
        ops.cpu_kernel_config(isa="avx9000")


# ---------------------------------------------------------------------------------------------
# fuzz: random shapes, layouts, masks
# ---------------------------------------------------------------------------------------------


@st.composite
def attention_calls(draw):
    """One random call, drawn from a seed that hypothesis picks (so examples spread evenly over
    the space instead of clustering); about one in ten is invalid on purpose."""
    rnd = random.Random(draw(st.integers(0, 2**32 - 1), label="seed"))

    def length():  # 0 about one time in eight
        return 0 if rnd.random() < 0.125 else rnd.randint(1, 70)

    b = 0 if rnd.random() < 0.1 else rnd.randint(1, 3)
    hkv = rnd.randint(1, 3)
    gqa = rnd.random() < 0.5
    hq = hkv * rnd.randint(1, 3) if gqa else hkv
    lq, lkv = length(), length()
    # A broadcast mask shape: each of (B, Hq, L, S) kept or 1, leading dims maybe dropped.
    mask_shape = tuple(n if rnd.random() < 0.5 else 1 for n in (b, hq, lq, lkv))
    mask_shape = mask_shape[rnd.randint(0, 4) :]
    call = {
        "b": b, "hq": hq, "hkv": hkv, "lq": lq, "lkv": lkv,
        "e": rnd.randint(1, 80), "ev": rnd.randint(1, 80),
        "dtype": rnd.choice([torch.float32, torch.bfloat16]),
        "layout": rnd.choice(["contiguous", "transposed", "strided", "expanded", "expanded-heads"]),
        "is_causal": rnd.random() < 0.5,
        "mask_kind": rnd.choice(["none", "bool", "float"]),
        "mask_shape": mask_shape,
        "scale": rnd.choice([None, None, 0.3, 1.7]),
        "gqa": gqa,
        "seed": rnd.randint(0, 2**16),
    }  # fmt: skip
    invalid = rnd.random()
    if invalid < 0.05:
        call["hq"] = hkv * 2 + 1  # not a multiple of the key/value heads
    elif invalid < 0.1:
        call["mask_kind"], call["mask_shape"] = "bool", (lq + 2, lkv)  # does not broadcast
    return call


def _make(shape, dtype, layout, seed):
    """A tensor of ``shape`` whose memory layout is ``layout``."""
    b, h, n, d = shape
    if layout == "transposed":  # (B, N, H, D) viewed as (B, H, N, D)
        return randn((b, n, h, d), dtype, seed=seed).transpose(1, 2)
    if layout == "strided":  # every other row and a column slice of a larger tensor
        return randn((b, h, 2 * n, d + 3), dtype, seed=seed)[:, :, ::2, 1 : d + 1]
    if layout == "expanded":  # stride 0 on the batch dim
        return randn((1, h, n, d), dtype, seed=seed).expand(b, h, n, d)
    if layout == "expanded-heads":  # stride 0 on the head dim
        return randn((b, 1, n, d), dtype, seed=seed).expand(b, h, n, d)
    return randn(shape, dtype, seed=seed)


def _assert_rule(name, ours, ref, base, dtype, c):
    """The error rule. The absolute slack for bfloat16 is one rounding of the largest value (the
    scale of torch's own error); for float32 gradients, which grow large with a large scale,
    1e-5 relative to the largest value."""
    err = max_abs(ours.double() - ref)
    base_err = max_abs(base.double() - ref)
    if dtype == torch.bfloat16:
        atol = 2.0**-8 * max(1.0, max_abs(ref))
    else:
        atol = ERROR_ATOL * (1.0 if name == "out" else max(1.0, max_abs(ref)))
    assert torch.isfinite(ours).all(), name
    assert err <= ERROR_FACTOR * base_err + atol, (name, err, base_err, atol, c)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(call=attention_calls())
def test_fuzz_against_reference(backend, call):
    c = call
    note(repr(c))
    q = _make((c["b"], c["hq"], c["lq"], c["e"]), c["dtype"], c["layout"], c["seed"])
    k = _make((c["b"], c["hkv"], c["lkv"], c["e"]), c["dtype"], c["layout"], c["seed"] + 1)
    v = _make((c["b"], c["hkv"], c["lkv"], c["ev"]), c["dtype"], c["layout"], c["seed"] + 2)
    mask = None
    if c["mask_kind"] == "bool":
        keep = torch.rand(c["mask_shape"], generator=torch.Generator().manual_seed(c["seed"]))
        mask = (keep < 0.75).to(DEVICE)
    elif c["mask_kind"] == "float":
        mask = randn(c["mask_shape"], c["dtype"], seed=c["seed"] + 3)
    kwargs = {
        "attn_mask": mask,
        "is_causal": c["is_causal"],
        "scale": c["scale"],
        "enable_gqa": c["gqa"],
    }
    grad_out = randn((c["b"], c["hq"], c["lq"], c["ev"]), c["dtype"], seed=c["seed"] + 4)
    try:
        ours = run_ours(backend, q, k, v, grad_out=grad_out, **kwargs)
    except (ValueError, RuntimeError) as exc:
        assert str(exc), "an error without a message"
        assert not isinstance(exc, aigc_ext.BackendError), exc
        return
    if c["lq"] == 0 or v.numel() == 0:  # torch's zeros, whatever the other shapes (even invalid)
        assert ours.out.shape == (*q.shape[:-1], v.shape[-1]) and not ours.out.any()
        assert not any(g.any() for g in ours.grads)
        return
    ref = run_reference64(q, k, v, grad_out=grad_out, **kwargs)
    base = run_torch(q, k, v, grad_out=grad_out, **kwargs)
    assert ours.out.shape == ref.out.shape and ours.out.dtype == q.dtype
    for name, a, r, b in zip(
        ("out", "dq", "dk", "dv"),
        (ours.out, *ours.grads),
        (ref.out, *ref.grads),
        (base.out, *base.grads),
        strict=True,
    ):
        _assert_rule(name, a, r, b, c["dtype"], c)
