"""The ``cuda`` backend's kernels on a GPU: the FlashAttention contract against the reference
(forward and backward, dense and varlen, at full head dims), the declined features' errors,
a deterministic backward, ``torch.compile(fullgraph=True)`` and a compute-sanitizer memcheck.

Every test here needs a CUDA device and a build with ``AIGC_EXT_WITH_CUDA=1``; the SDPA
contract suite runs on ``cuda`` too with ``AIGC_EXT_TEST_DEVICE=cuda`` (tests/conftest.py
parametrises it over every available fused backend).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cuda_testing import dense, max_error, requires_cuda_kernels

import aigc_ext
from aigc_ext.flash import ops

pytestmark = requires_cuda_kernels
ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _run(backend, q, k, v, grad=True, **kwargs):
    """``(out, lse, grads)`` of flash_attention on ``backend``; the reference in float32."""
    if backend == "reference":
        q, k, v = (t.float() for t in (q, k, v))
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out, lse = ops.flash_attention(*leaves, backend=backend, **kwargs)
    grads = None
    if grad:
        gen = torch.Generator().manual_seed(7)
        grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
        grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), lse, grads


def _compare(q, k, v, *, grad=True, **kwargs):
    out, lse, grads = _run("cuda", q, k, v, grad, **kwargs)
    ref_out, ref_lse, ref_grads = _run("reference", q, k, v, grad, **kwargs)
    tol = TOL[q.dtype]
    assert max_error(out, ref_out) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert max_error(lse[finite], ref_lse[finite]) < 1e-2
    if grad:
        for got, want in zip(grads, ref_grads, strict=True):
            scale = max(1.0, want.abs().max().item())
            assert max_error(got, want) < 4 * tol * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_forward_and_backward_match_the_reference(dtype, dim, causal):
    q, k, v = dense(2, 8, 2, 333, 517, dim, dtype)
    _compare(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_head_dims_and_ev_differing_from_e(dtype):
    q, k, v = dense(1, 4, 4, 129, 129, 40, dtype, dim_v=72)
    _compare(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_softcap_and_alibi(dtype):
    q, k, v = dense(2, 4, 4, 200, 260, 64, dtype)
    slopes = torch.linspace(0.1, 0.5, 4, device="cuda", dtype=torch.float32)
    _compare(q, k, v, window_left=64, window_right=16, softcap=30.0, alibi_slopes=slopes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_matches_the_reference(dtype):
    lengths = [1, 130, 257, 64]
    total = sum(lengths)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(total, 4, 128, generator=gen).to(dtype).cuda() for _ in range(3))
    cu = torch.tensor([0, 1, 131, 388, 452], dtype=torch.int32, device="cuda")
    _compare(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=257, max_seqlen_k=257,
             causal=True)  # fmt: skip


def test_declined_features_raise_pointing_at_triton():
    q, k, v = dense(1, 2, 2, 64, 64, 64, torch.float16)
    with pytest.raises(RuntimeError, match="triton"):
        ops.flash_attention(q, k, v, dropout_p=0.1, backend="cuda")
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        ops.flash_attention(q.float(), k.float(), v.float(), backend="cuda")


@pytest.mark.parametrize("causal", [False, True])
def test_backward_is_deterministic(causal):
    q, k, v = dense(2, 8, 2, 1000, 1000, 128, torch.bfloat16, seed=11)
    first = _run("cuda", q, k, v, causal=causal)
    second = _run("cuda", q, k, v, causal=causal)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[2], second[2], strict=True):
        assert torch.equal(a, b)


def test_sdpa_dispatch_to_cuda_is_deterministic_and_differentiable():
    q, k, v = (
        torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    grads = []
    for _ in range(2):
        with aigc_ext.use_backend("cuda"):
            out = aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_compile_fullgraph_matches_eager():
    q, k, v = dense(2, 4, 4, 256, 256, 64, torch.bfloat16)

    def fn(q, k, v):
        out, _ = ops.flash_attention(q, k, v, causal=True, backend="cuda")
        return out

    compiled = torch.compile(fn, fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = compiled(*leaves)
    assert torch.equal(out, fn(q, k, v))
    grads = torch.autograd.grad(out.float().sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


SANITIZED = textwrap.dedent(
    """
    import torch
    from aigc_ext.flash import ops

    torch.manual_seed(0)
    for causal in (False, True):
        q, k, v = (torch.randn(1, 70, 2, 64, device="cuda", dtype=torch.float16,
                               requires_grad=True) for _ in range(3))
        out, _ = ops.flash_attention(q, k, v, causal=causal, backend="cuda")
        out.sum().backward()
    torch.cuda.synchronize()
    print("sanitized run done")
    """
)


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="no compute-sanitizer")
def test_compute_sanitizer_memcheck_is_clean(tmp_path):
    script = tmp_path / "small_case.py"
    script.write_text(SANITIZED)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3",
           sys.executable, str(script)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert "sanitized run done" in proc.stdout and "ERROR SUMMARY: 0 errors" in report, report
