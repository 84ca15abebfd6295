"""The ``cuda`` backend's registration: availability and its reasons, what it declines (so that
dispatch falls back), its priority, and the flash entry point's ``backend="cuda"``.

The registration tests run everywhere; the ones that call the kernels need a CUDA device and a
build with ``AIGC_EXT_WITH_CUDA=1`` and skip with the reason otherwise.
"""

from __future__ import annotations

import pytest
import torch
from cuda_testing import READY, SKIP_REASON, requires_cuda_kernels

import aigc_ext
from aigc_ext.backends.cpu import op_checks
from aigc_ext.backends.cuda import backend as cuda_backend
from aigc_ext.backends.triton import backend as triton_backend
from aigc_ext.flash import ops as flash_ops
from aigc_ext.flash.checks import FlashArgumentError
from aigc_ext.validation import validate_sdpa_args


def _call(dtype=torch.float16, dim=64, dim_v=None, *, dropout_p=0.0, mask_grad=False):
    q = torch.zeros(1, 2, 4, dim, dtype=dtype)
    v = torch.zeros(1, 2, 4, dim if dim_v is None else dim_v, dtype=dtype)
    mask = torch.zeros(4, 4, dtype=dtype, requires_grad=mask_grad) if mask_grad else None
    return validate_sdpa_args(q, q, v, mask, dropout_p, False, None, False)


def _row(name):
    return next(r for r in aigc_ext.backends() if r.name == name)


def test_cuda_backend_is_listed_for_cuda_tensors_below_triton():
    row = _row("cuda")
    assert row.devices == ("cuda",) and row.source == "aigc_ext" and row.description
    assert row.priority == cuda_backend.PRIORITY
    assert _row("cpu").priority < row.priority < triton_backend.PRIORITY_CUDA
    assert row.available == READY and row.reason == SKIP_REASON


def test_unavailable_reason_names_the_missing_piece(monkeypatch):
    if not cuda_backend.has_cuda_kernels():
        reason = cuda_backend.unavailable_reason()
        assert "without CUDA kernels" in reason and "AIGC_EXT_WITH_CUDA=1" in reason
    monkeypatch.setattr(cuda_backend, "has_cuda_kernels", lambda op=None: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in cuda_backend.unavailable_reason()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    assert "8.0 or newer" in cuda_backend.unavailable_reason()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    assert cuda_backend.unavailable_reason() is None


def test_has_cuda_kernels_matches_the_dispatcher():
    want = torch._C._dispatch_has_kernel_for_dispatch_key("aigc_ext::attention_forward", "CUDA")
    assert cuda_backend.has_cuda_kernels() == want
    assert cuda_backend.has_cuda_kernels("aigc_ext::no_such_operator") is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 64, 200, 256])
def test_serves_what_the_kernels_implement(dtype, dim):
    assert cuda_backend.unsupported_reason(_call(dtype, dim)) is None


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"dtype": torch.float32}, "float32"),
        ({"dtype": torch.float64}, "float64"),
        ({"dim": 320}, "above 256"),
        ({"dim_v": 512}, "above 256"),
        ({"dropout_p": 0.1}, "dropout_p"),
        ({"mask_grad": True}, "requires grad"),
    ],
)
def test_declines_what_sm80_unsupported_declines(kwargs, words):
    reason = cuda_backend.unsupported_reason(_call(**kwargs))
    assert reason is not None and words in reason


def test_flash_backend_cuda_is_known_and_explains_a_build_without_kernels():
    assert flash_ops.BACKEND_OPERATORS["cuda"] == ("flash_forward", "flash_backward")
    has = flash_ops._has_cuda_kernels()
    assert ("cuda" in flash_ops.available_flash_backends()) == has
    if not has:
        q = torch.zeros(1, 4, 2, 8)
        with pytest.raises(FlashArgumentError, match="AIGC_EXT_WITH_CUDA=1"):
            flash_ops.flash_attention(q, q, q, backend="cuda")


def test_fake_kernel_checks_accept_cuda_only_with_cuda_kernels(monkeypatch):
    monkeypatch.setattr(op_checks, "_cuda_kernels", False)
    assert op_checks._device_served("cpu") and op_checks._device_served("meta")
    assert not op_checks._device_served("cuda") and not op_checks._device_served("xpu")
    monkeypatch.setattr(op_checks, "_cuda_kernels", True)
    assert op_checks._device_served("cuda") and not op_checks._device_served("xpu")


@requires_cuda_kernels
def test_forced_cuda_serves_and_matches_the_reference():
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with aigc_ext.use_backend("cuda"):
        out = aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True
    )
    assert (out.float() - want).abs().max().item() < 2e-2


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dispatch_falls_back_from_cuda_for_declined_dtypes(dtype):
    q = torch.randn(1, 2, 16, 32, device="cuda", dtype=dtype)
    call = validate_sdpa_args(q, q, q, None, 0.0, False, None, False)
    chosen = aigc_ext.dispatch.select_backend(call)
    assert chosen.name != "cuda"
    out = aigc_ext.scaled_dot_product_attention(q, q, q)
    want = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
