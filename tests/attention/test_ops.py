"""The registered operators: opcheck, gradcheck, torch.compile, and which kernels really run."""

from __future__ import annotations

import pytest
import torch
from sdpa_testing import DEVICE, make_qkv, randn, random_mask, skip_if_declined
from torch.profiler import ProfilerActivity, profile

import aigc_ext

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# opcheck's internals still call torch.jit.script_method, which torch 2.13 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

# ---------------------------------------------------------------------------------------------
# torch.library.opcheck
# ---------------------------------------------------------------------------------------------


def _forward_case(name):
    """(q, k, v, attn_mask, is_causal, scale) for the operator's 4-D contract."""
    if name == "fp32-plain":
        q, k, v = make_qkv(2, 4, 4, 9, 11, 16, 12, dtype=F32, seed=1)
        return q, k, v, None, False, 0.25
    if name == "fp32-gqa-float-mask-causal":
        q, k, v = make_qkv(2, 4, 2, 9, 11, 16, dtype=F32, seed=2)
        return q, k, v, random_mask((9, 11), "float", F32, seed=3), True, 0.3
    if name == "bf16-mqa-bool-mask":
        q, k, v = make_qkv(2, 4, 1, 13, 70, 32, dtype=BF16, seed=4)
        return q, k, v, random_mask((2, 1, 1, 70), "bool", BF16, seed=5), False, 0.2
    if name == "fp64-causal-l>s":
        q, k, v = make_qkv(1, 2, 2, 17, 6, 8, 5, dtype=F64, seed=6)
        return q, k, v, None, True, 0.35
    if name == "fp16-float32-mask":
        q, k, v = make_qkv(1, 2, 2, 10, 12, 24, dtype=F16, seed=7)
        return q, k, v, random_mask((1, 2, 10, 12), "float", F32, seed=8), False, 0.2
    if name == "fp32-transposed":
        q = randn((2, 7, 3, 16), seed=9).transpose(1, 2)
        k = randn((2, 12, 3, 16), seed=10).transpose(1, 2)
        v = randn((2, 12, 3, 16), seed=11).transpose(1, 2)
        return q, k, v, random_mask((12, 7), "bool", F32, seed=12).t(), True, 0.25
    raise ValueError(name)


FORWARD_CASES = [
    "fp32-plain",
    "fp32-gqa-float-mask-causal",
    "bf16-mqa-bool-mask",
    "fp64-causal-l>s",
    "fp16-float32-mask",
    "fp32-transposed",
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_opcheck_forward(case, requires_grad):
    q, k, v, mask, is_causal, scale = _forward_case(case)
    q, k, v = (t.detach().requires_grad_(requires_grad) for t in (q, k, v))
    torch.library.opcheck(
        torch.ops.aigc_ext.attention_forward.default, (q, k, v, mask, is_causal, scale)
    )


@pytest.mark.parametrize(
    "case", ["fp32-plain", "fp32-gqa-float-mask-causal", "bf16-mqa-bool-mask", "fp64-causal-l>s"]
)
def test_opcheck_backward(case):
    q, k, v, mask, is_causal, scale = _forward_case(case)
    out, lse = torch.ops.aigc_ext.attention_forward(q, k, v, mask, is_causal, scale)
    grad_out = randn(out.shape, out.dtype, seed=13)
    torch.library.opcheck(
        torch.ops.aigc_ext.attention_backward.default,
        (grad_out, q, k, v, out, lse, mask, is_causal, scale),
    )


def test_operator_output_metadata():
    q, k, v, mask, is_causal, scale = _forward_case("bf16-mqa-bool-mask")
    out, lse = torch.ops.aigc_ext.attention_forward(q, k, v, mask, is_causal, scale)
    assert out.shape == (2, 4, 13, 32) and out.dtype == BF16 and out.is_contiguous()
    assert lse.shape == (2, 4, 13) and lse.dtype == F32
    grads = torch.ops.aigc_ext.attention_backward(
        torch.ones_like(out), q, k, v, out, lse, mask, is_causal, scale
    )
    for g, t in zip(grads, (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype


# ---------------------------------------------------------------------------------------------
# gradcheck in float64 through the public API
# ---------------------------------------------------------------------------------------------


def _gradcheck_case(name):
    """(q, k, v, kwargs) in float64, tiny."""
    kw = {}
    shapes = ((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 4))
    if name == "gqa":
        shapes = ((1, 4, 5, 4), (1, 2, 6, 4), (1, 2, 6, 4))
        kw = {"enable_gqa": True, "is_causal": True}
    elif name == "ev-differs":
        shapes = ((2, 1, 4, 3), (2, 1, 5, 3), (2, 1, 5, 6))
    elif name == "3d":
        shapes = ((3, 4, 4), (3, 5, 4), (3, 5, 4))
    elif name == "causal-l>s":
        shapes = ((1, 2, 7, 4), (1, 2, 3, 4), (1, 2, 3, 4))
        kw = {"is_causal": True}
    q, k, v = (randn(s, F64, seed=i).requires_grad_() for i, s in enumerate(shapes))
    lq, lkv = q.shape[-2], k.shape[-2]
    if name == "causal":
        kw = {"is_causal": True}
    elif name == "bool-mask":
        kw = {"attn_mask": random_mask((1, 2, lq, lkv), "bool", F64, seed=7, p_keep=0.6)}
    elif name == "float-mask-causal":
        kw = {"attn_mask": random_mask((lq, lkv), "float", F64, seed=8), "is_causal": True}
    elif name == "empty-rows":
        mask = random_mask((lq, lkv), "bool", F64, seed=9)
        mask[1] = False
        kw = {"attn_mask": mask, "scale": 0.7}
    return q, k, v, kw


GRADCHECK_CASES = [
    "plain",
    "causal",
    "causal-l>s",
    "bool-mask",
    "float-mask-causal",
    "gqa",
    "ev-differs",
    "3d",
    "empty-rows",
]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck(backend, case):
    q, k, v, kw = _gradcheck_case(case)
    skip_if_declined(backend, q, k, v, **kw)  # e.g. a GPU backend without float64

    def fn(q, k, v):
        with aigc_ext.use_backend(backend):
            return aigc_ext.scaled_dot_product_attention(q, k, v, **kw)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph(backend):
    q, k, v = make_qkv(2, 4, 2, 33, 47, 32, dtype=F32, seed=3)
    mask = random_mask((2, 1, 33, 47), "bool", F32, seed=4)

    def layer(q, k, v, mask):
        out = aigc_ext.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True
        )
        return (out * 2).sum(dim=-1)

    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for fn in (layer, compiled):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with aigc_ext.use_backend(backend):
            out = fn(*leaves, mask)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append((out, *grads))
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager)
    if backend == "cpu":  # the compiled graph calls the operator, not torch's attention
        with aigc_ext.use_backend(backend):
            names = _profiled_names(lambda: compiled(q, k, v, mask))
        assert "aigc_ext::attention_forward" in names
        assert not names & set(TORCH_SDPA_OPS)


# ---------------------------------------------------------------------------------------------
# which kernels run
# ---------------------------------------------------------------------------------------------

TORCH_SDPA_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
)


def _profiled_names(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU operator")
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_cpu_backend_runs_the_fused_operator(cpu_backend, dtype):
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 40, 70, 32, dtype=dtype, seed=1))
    mask = random_mask((40, 70), "bool", dtype, seed=2)

    def step():
        with aigc_ext.use_backend(cpu_backend):
            out = aigc_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out.sum().backward()

    names = _profiled_names(step)
    assert "aigc_ext::attention_forward" in names
    assert "aigc_ext::attention_backward" in names
    assert not names & set(TORCH_SDPA_OPS), sorted(names & set(TORCH_SDPA_OPS))


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU operator")
def test_cpu_backend_is_the_default_choice(cpu_backend):
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, seed=1)
    names = _profiled_names(lambda: aigc_ext.scaled_dot_product_attention(q, k, v))
    assert "aigc_ext::attention_forward" in names
    assert not names & set(TORCH_SDPA_OPS)
