"""``torch.library.opcheck`` of the Triton operators, and their fake kernels' argument checks.

``torch.ops.aigc_ext.triton_attention_forward`` / ``_backward`` get the same opcheck as the C++
operators (``tests/attention/test_ops.py``), on small fp32 and fp16 inputs: schema, autograd registration,
fake tensors and AOT dispatch with dynamic shapes, i.e. every test opcheck runs by default.
Under Triton's interpreter (no GPU; ``tests/conftest.py`` sets ``TRITON_INTERPRET=1``) the
operators are opaque ``torch.library.custom_op`` operators with explicit fake kernels, because
tracing Triton kernels with fake tensors fails there; opcheck then checks those fake kernels
against the interpreted kernels, and all of its tests pass. On a GPU (``AIGC_EXT_TEST_DEVICE=
cuda``) they are ``torch.library.triton_op`` operators and the same tests trace into the kernels.
"""

from __future__ import annotations

import pytest
import torch
from sdpa_testing import DEVICE, fused_backends, make_qkv, randn, random_mask
from torch._subclasses.fake_tensor import FakeTensorMode

F32, F16 = torch.float32, torch.float16

pytestmark = [
    pytest.mark.skipif(
        "triton" not in fused_backends(DEVICE),
        reason=f"the triton backend does not run on {DEVICE!r} here (no GPU, no interpreter)",
    ),
    # opcheck's internals still call torch.jit.script_method, which torch 2.13 deprecates.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
]


@pytest.fixture(scope="module", autouse=True)
def _triton_operators():
    """Registers the operators: the backend imports its operator module only on first use."""
    from aigc_ext.backends.triton import ops  # noqa: F401


def _forward_case(name):
    """(q, k, v, attn_mask, is_causal, scale) for the operators' 4-D contract."""
    if name == "fp32-plain-ev<e":
        q, k, v = make_qkv(2, 2, 2, 9, 11, 16, 12, dtype=F32, seed=1)
        return q, k, v, None, False, 0.25
    if name == "fp32-gqa-float-mask-causal":
        q, k, v = make_qkv(2, 4, 2, 9, 11, 16, dtype=F32, seed=2)
        return q, k, v, random_mask((9, 11), "float", F32, seed=3), True, 0.3
    if name == "fp16-mqa-key-padding":
        q, k, v = make_qkv(2, 4, 1, 13, 70, 32, dtype=F16, seed=4)
        return q, k, v, random_mask((2, 1, 1, 70), "bool", F16, seed=5), False, 0.2
    if name == "fp32-causal-l>s-e40":
        q, k, v = make_qkv(1, 2, 2, 17, 6, 40, 24, dtype=F32, seed=6)
        return q, k, v, None, True, 0.35
    if name == "fp16-float32-mask-empty-rows":
        q, k, v = make_qkv(1, 2, 2, 10, 12, 24, dtype=F16, seed=7)
        mask = random_mask((1, 2, 10, 12), "float", F32, seed=8)
        mask[:, :, ::4] = float("-inf")  # rows that see no key: zeros, lse -inf
        return q, k, v, mask, False, 0.2
    if name == "fp32-transposed":
        q = randn((2, 7, 3, 16), seed=9).transpose(1, 2)
        k = randn((2, 12, 3, 16), seed=10).transpose(1, 2)
        v = randn((2, 12, 3, 16), seed=11).transpose(1, 2)
        return q, k, v, random_mask((12, 7), "bool", F32, seed=12).t(), True, 0.25
    raise ValueError(name)


FORWARD_CASES = [
    "fp32-plain-ev<e",
    "fp32-gqa-float-mask-causal",
    "fp16-mqa-key-padding",
    "fp32-causal-l>s-e40",
    "fp16-float32-mask-empty-rows",
    "fp32-transposed",
]
BACKWARD_CASES = [
    "fp32-plain-ev<e",
    "fp32-gqa-float-mask-causal",
    "fp16-mqa-key-padding",
    "fp32-causal-l>s-e40",
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_opcheck_forward(case, requires_grad):
    q, k, v, mask, is_causal, scale = _forward_case(case)
    q, k, v = (t.detach().requires_grad_(requires_grad) for t in (q, k, v))
    torch.library.opcheck(
        torch.ops.aigc_ext.triton_attention_forward.default, (q, k, v, mask, is_causal, scale)
    )


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_opcheck_backward(case):
    q, k, v, mask, is_causal, scale = _forward_case(case)
    out, lse = torch.ops.aigc_ext.triton_attention_forward(q, k, v, mask, is_causal, scale)
    grad_out = randn(out.shape, out.dtype, seed=13)
    torch.library.opcheck(
        torch.ops.aigc_ext.triton_attention_backward.default,
        (grad_out, q, k, v, out, lse, mask, is_causal, scale),
    )


# ---------------------------------------------------------------------------------------------
# the fake kernels refuse what the kernels refuse, with the same message
# ---------------------------------------------------------------------------------------------


def _backward_args(bad: str):
    """Backward arguments of one small problem with ``bad`` (an argument) of the wrong shape."""
    q, k, v = make_qkv(1, 4, 2, 8, 6, 16, 8, dtype=F32, seed=14)
    out, lse = torch.ops.aigc_ext.triton_attention_forward(q, k, v, None, False, 0.25)
    grad_out = randn(out.shape, F32, seed=15)
    args = {"grad_out": grad_out, "out": out, "lse": lse}
    args[bad] = {
        "grad_out": randn((1, 4, 8, 16), F32, seed=16),  # E instead of Ev
        "out": randn((1, 4, 7, 8), F32, seed=17),  # one query row short
        "lse": lse[..., :1],
    }[bad]
    return (args["grad_out"], q, k, v, args["out"], args["lse"], None, False, 0.25)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("grad_out", r"grad_out has shape \(1, 4, 8, 16\) but must have shape \(1, 4, 8, 8\)"),
        ("out", r"out has shape \(1, 4, 7, 8\) but must have shape \(1, 4, 8, 8\)"),
        ("lse", r"lse has shape \(1, 4, 1\) but must have shape \(1, 4, 8\)"),
    ],
)
def test_backward_shape_errors_in_kernel_and_fake_kernel(bad, message):
    op = torch.ops.aigc_ext.triton_attention_backward
    args = _backward_args(bad)
    with pytest.raises(ValueError, match=message):
        op(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=message):
            op(*fake)


def test_forward_shape_error_in_kernel_and_fake_kernel():
    op = torch.ops.aigc_ext.triton_attention_forward
    q, k, v = make_qkv(1, 4, 2, 8, 6, 16, 8, dtype=F32, seed=18)
    args = (q, k[..., :8], v, None, False, 0.25)  # key head dim 8, query's 16
    message = r"key \(B, Hkv, S, E\).*query \(1, 4, 8, 16\), key \(1, 2, 6, 8\)"
    with pytest.raises(ValueError, match=message):
        op(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=message):
            op(*fake)
