"""The FlashAttention operators' registration (``aigc_ext.flash.ops``): fake kernels, autograd,
the reference operators, backend selection and ``torch.compile``."""

from __future__ import annotations

import warnings

import pytest
import torch
from flash_testing import cu_seqlens, rand

from aigc_ext.flash import ops
from aigc_ext.flash.checks import FlashArgumentError
from aigc_ext.flash.reference import flash_reference

F64 = torch.float64
REF = torch.ops.aigc_ext.flash_reference_forward


def dense(lq=5, lk=6, hq=4, hkv=2, d=8, dtype=F64, grad=False):
    q, k, v = (
        rand((2, lq, hq, d), dtype, seed=1),
        rand((2, lk, hkv, d), dtype, seed=2),
        rand((2, lk, hkv, d), dtype, seed=3),
    )
    return [t.requires_grad_(grad) for t in (q, k, v)]


def packed(lens_q=(3, 0, 4), lens_k=(5, 2, 0), grad=False):
    q = rand((sum(lens_q), 4, 8), seed=1)
    k, v = rand((sum(lens_k), 2, 8), seed=2), rand((sum(lens_k), 2, 8), seed=3)
    layout = (cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k))
    return [t.requires_grad_(grad) for t in (q, k, v)], layout


@pytest.mark.parametrize(
    "kwargs",
    [
        {"causal": True},
        {"window_left": 2, "window_right": 0, "softcap": 3.0},
        {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])},
        {"sinks": torch.tensor([0.1, -0.2, 0.3, 0.0])},
        {"dropout_p": 0.2, "rng_state": torch.tensor([7, 3])},
    ],
    ids=["causal", "window_softcap", "alibi", "sinks", "dropout"],
)
def test_opcheck_reference_operator(kwargs):
    q, k, v = dense(grad=True)
    if "sinks" in kwargs:
        kwargs = {**kwargs, "sinks": kwargs["sinks"].clone().requires_grad_(True)}
    torch.library.opcheck(REF, (q, k, v), kwargs)


def test_opcheck_varlen_and_kv_cache():
    (q, k, v), layout = packed(grad=True)
    torch.library.opcheck(REF, (q, k, v, *layout), {"causal": True})
    q = rand((2, 1, 4, 8))
    cache = rand((3, 9, 2, 8))
    kwargs = {
        "seqused_k": torch.tensor([4, 9], dtype=torch.int32),
        "kv_batch_idx": torch.tensor([2, 0], dtype=torch.int32),
    }
    torch.library.opcheck(
        REF, (q, cache, cache), kwargs, test_utils=("test_schema", "test_faketensor")
    )


def test_autograd_through_the_operator_equals_autograd_through_the_reference():
    q, k, v = dense(grad=True)
    sinks = torch.tensor([0.3, -1.0, 0.0, 2.0], requires_grad=True)
    alibi = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    rng = torch.tensor([11, 2])
    kw = dict(causal=True, softcap=4.0, alibi_slopes=alibi, dropout_p=0.3, rng_state=rng)
    out, lse = ops.flash_attention(q, k, v, scale=0.3, sinks=sinks, backend="reference", **kw)
    grad_out = rand(out.shape, seed=9)
    got = torch.autograd.grad(out, [q, k, v, sinks], grad_out)
    sinks64 = sinks.detach().double().requires_grad_(True)
    ref_out, ref_lse = flash_reference(q, k, v, scale=0.3, sinks=sinks64, **kw)
    expected = torch.autograd.grad(ref_out, [q, k, v, sinks64], grad_out)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, atol=1e-6, rtol=1e-6)  # sinks: float32


def test_varlen_gradients_and_sinks():
    (q, k, v), layout = packed(grad=True)
    sinks = torch.tensor([0.3, -1.0, 0.0, 2.0], dtype=torch.float32, requires_grad=True)
    out, _ = ops.flash_attention(q, k, v, *layout, sinks=sinks, causal=True, backend="reference")
    out.sum().backward()
    sinks64 = sinks.detach().double().requires_grad_(True)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref, _ = flash_reference(q2, k2, v2, *layout, scale=8**-0.5, sinks=sinks64, causal=True)
    ref.sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(sinks.grad.double(), sinks64.grad, atol=1e-6, rtol=1e-6)


def test_kv_cache_forms_have_no_backward():
    q = rand((2, 1, 4, 8)).requires_grad_(True)
    cache = rand((2, 9, 2, 8))
    out, _ = ops.flash_attention(
        q, cache, cache, seqused_k=torch.tensor([3, 9], dtype=torch.int32), backend="reference"
    )
    with pytest.raises(FlashArgumentError, match="seqused_k"):
        out.sum().backward()


def test_lse_is_not_differentiable():
    q, k, v = dense(grad=True)
    out, lse = ops.flash_attention(q, k, v, backend="reference")
    assert out.requires_grad and not lse.requires_grad


def test_registering_a_new_operator_pair_is_one_call():
    """A backend defines the two operators; one call gives them fake kernels and autograd."""
    forward, backward = "flash_testonly_forward", "flash_testonly_backward"
    if not hasattr(torch.ops.aigc_ext, forward):
        torch.library.custom_op(
            f"aigc_ext::{forward}",
            lambda *a: tuple(t.contiguous() for t in flash_reference(*a)),
            mutates_args=(),
            schema=ops.FORWARD_SCHEMA,
        )
        torch.library.custom_op(
            f"aigc_ext::{backward}",
            lambda *a: tuple(
                t.contiguous() for t in torch.ops.aigc_ext.flash_reference_backward(*a)
            ),
            mutates_args=(),
            schema=ops.BACKWARD_SCHEMA,
        )
    ops.register_flash_operator(forward, backward)
    ops.register_flash_operator(forward, backward)  # again: nothing happens
    q, k, v = dense(grad=True)
    torch.library.opcheck(getattr(torch.ops.aigc_ext, forward), (q, k, v), {"causal": True})


def test_cpu_tensors_go_to_the_cpu_operator_or_the_reference(monkeypatch):
    q, k, v = dense()
    monkeypatch.setattr(ops, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = ops.flash_attention(q, k, v, causal=True)
    ref, _ = flash_reference(q, k, v, scale=8**-0.5, causal=True)
    if "cpu" in ops.available_flash_backends():
        assert not [w for w in caught if "reference" in str(w.message)]
    else:
        assert any("reference serves the call" in str(w.message) for w in caught)
        with pytest.raises(FlashArgumentError, match="backend 'cpu'"):
            ops.flash_attention(q, k, v, backend="cpu")
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_unknown_backend():
    q, k, v = dense()
    with pytest.raises(FlashArgumentError, match="unknown backend 'rocm'"):
        ops.flash_attention(q, k, v, backend="rocm")


def test_default_scale_and_fresh_rng_state_per_call():
    q, k, v = dense()
    out, _ = ops.flash_attention(q, k, v, backend="reference")
    ref, _ = flash_reference(q, k, v, scale=8**-0.5)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.manual_seed(3)
    a, _ = ops.flash_attention(q, k, v, dropout_p=0.5, backend="reference")
    b, _ = ops.flash_attention(q, k, v, dropout_p=0.5, backend="reference")
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    again, _ = ops.flash_attention(q, k, v, dropout_p=0.5, backend="reference")
    assert torch.equal(a, again)


def test_compile_fullgraph_forward_and_backward():
    (q, k, v), layout = packed(grad=True)

    def fn(q, k, v):
        out, lse = ops.flash_attention(
            q, k, v, *layout, causal=True, softcap=2.0, backend="reference"
        )
        return out, lse

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v)
    expected, expected_lse = fn(q, k, v)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=0, rtol=0)
    (g,) = torch.autograd.grad(out.sum(), [q])
    (e,) = torch.autograd.grad(expected.sum(), [q])
    torch.testing.assert_close(g, e, atol=0, rtol=0)
