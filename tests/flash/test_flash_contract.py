"""The FlashAttention operator contract, on every fused backend, against the float64 reference.

Each case runs ``flash_attention(..., backend=B)`` in a low-precision dtype and checks output,
logsumexp and gradients with FlashAttention's error rule (``aigc_ext.testing``)::

    max|ours - ref_fp64| <= 2 * max|reference_same_dtype - ref_fp64| + 1e-5

where ``ref_fp64`` is :func:`aigc_ext.flash.reference.flash_reference` on float64 copies of the
same (rounded) inputs and ``reference_same_dtype`` the same function computing in the dtype
under test (the plain PyTorch computation in that dtype, as torch's own SDPA is for the SDPA
contract). Backends: ``reference`` (the operators wrapping the reference: always), ``cpu`` (the
C++ operators, when this build has them) and ``triton`` (when Triton and its operators load;
on CPU tensors under ``TRITON_INTERPRET=1``, fp32/fp16 and small shapes only).
"""

from __future__ import annotations

import math

import pytest
import torch
from flash_testing import cpu_ready, cu_seqlens, paged_cache, rand, triton_ready

from aigc_ext.flash import ops
from aigc_ext.flash.reference import dropout_keep_mask, flash_reference
from aigc_ext.testing import check_error_rule

F64 = torch.float64
CUDA = torch.cuda.is_available()


BACKENDS = [
    pytest.param("reference"),
    pytest.param("cpu", marks=pytest.mark.skipif(not cpu_ready(), reason="no C++ flash op")),
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not triton_ready(), reason="Triton flash operators not loaded"),
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            "cuda" not in ops.available_flash_backends(), reason="no CUDA C++ flash kernels here"
        ),
    ),
]
INTERPRETED = not CUDA  # triton on CPU tensors: the interpreter (slow; no bf16 tl.dot)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and CUDA) else "cpu"


def dtypes_for(backend: str, *, bf16: bool = False, interpreted_fp16: bool = False):
    """The dtypes a case runs in: fp32 and fp16 (bf16 where asked) on compiled kernels; on
    the interpreter, fp32 (fp16 too where asked: it is slow); the reference, fp32."""
    if backend == "reference":  # the oracle itself: the plumbing is what is tested here
        return [torch.float32]
    if backend == "triton" and INTERPRETED:
        return [torch.float32] + ([torch.float16] if interpreted_fp16 else [])
    if backend == "cuda":  # the CUDA C++ kernels: float16 and bfloat16 only
        return [torch.float16] + ([torch.bfloat16] if bf16 else [])
    return [torch.float32, torch.float16] + ([torch.bfloat16] if bf16 else [])


def small(backend: str) -> bool:
    """Whether the backend wants the smallest shapes (the Triton interpreter)."""
    return backend == "triton" and INTERPRETED


def not_interpreted(backend: str, why: str) -> None:
    """Skips a variant the interpreter need not run (its neighbours cover the same code)."""
    if small(backend):
        pytest.skip(f"interpreted Triton runs a subset: {why}")


def declined_by_cuda(backend: str, what: str) -> None:
    """Skips a feature the CUDA C++ kernels decline (csrc/cuda/flash_launch.h: dropout, sinks,
    the KV-cache arguments)."""
    if backend == "cuda":
        pytest.skip(f"the cuda backend declines {what}")


def _to(x, device, dtype=None):
    if isinstance(x, torch.Tensor):
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device)
    return x


def assert_rule(name, ours, ref64, base):
    result = check_error_rule(ours.detach().cpu(), ref64.detach(), base.detach())
    assert result.ok, result.describe(name)


def assert_lse(ours, ref64, base):
    ours = ours.detach().cpu()
    empty = ref64 == -math.inf
    assert torch.equal(ours == -math.inf, empty), "lse: -inf where a row attends to nothing"
    assert_rule("lse", ours[~empty], ref64[~empty], base[~empty])


def check(backend, dtype, q, k, v, *, grad=True, sinks=None, **kw):
    """Runs one call on ``backend`` in ``dtype`` and checks it against the reference."""
    device = device_of(backend)
    kw.setdefault("scale", q.shape[-1] ** -0.5)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, k, v)]
    s = sinks.to(device).requires_grad_(grad) if sinks is not None else None
    dev_kw = {name: _to(x, device) for name, x in kw.items()}
    out, lse = ops.flash_attention(*leaves, sinks=s, backend=backend, **dev_kw)
    assert out.dtype == dtype and out.device.type == device
    rounded = [t.detach().cpu() for t in leaves]
    ref_in = [t.double().requires_grad_(grad) for t in rounded]
    base_in = [t.clone().requires_grad_(grad) for t in rounded]
    ref_s = sinks.double().requires_grad_(grad) if sinks is not None else None
    base_s = sinks.clone().requires_grad_(grad) if sinks is not None else None
    ref_out, ref_lse = flash_reference(*ref_in, sinks=ref_s, **kw)
    base_out, base_lse = flash_reference(*base_in, sinks=base_s, **kw)
    assert_rule("out", out, ref_out, base_out)
    assert_lse(lse, ref_lse, base_lse)
    if not grad:
        return out, lse
    grad_out = rand(out.shape, seed=99)
    wrt = [*leaves, *([s] if s is not None else [])]
    ours = torch.autograd.grad(out, wrt, grad_out.to(device=device, dtype=dtype))
    ref = torch.autograd.grad(
        ref_out, [*ref_in, *([ref_s] if ref_s is not None else [])], grad_out.double()
    )
    base = torch.autograd.grad(
        base_out, [*base_in, *([base_s] if base_s is not None else [])], grad_out.to(dtype)
    )
    for name, o, r, b in zip(["dq", "dk", "dv", "dsinks"], ours, ref, base, strict=False):
        assert_rule(name, o, r, b)
    return out, lse


def dense_inputs(b, lq, lk, hq, hkv, d, dv=None, seed=0):
    q = rand((b, lq, hq, d), seed=seed)
    k = rand((b, lk, hkv, d), seed=seed + 1)
    v = rand((b, lk, hkv, dv or d), seed=seed + 2)
    return q, k, v


# -- dense layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths_and_gqa(backend, causal):
    for dtype in dtypes_for(backend, bf16=True, interpreted_fp16=True):
        q, k, v = dense_inputs(2, 13, 17, 4, 2, 24, dv=20)
        check(backend, dtype, q, k, v, causal=causal, grad=dtype != torch.bfloat16)


@pytest.mark.parametrize("head_dim", [8, 96, 256])
def test_head_dims(backend, head_dim):
    if head_dim == 96:
        not_interpreted(backend, "head dims 8 and 256 pad to powers of two too")
    lq = 5 if small(backend) else 9
    q, k, v = dense_inputs(1, lq, lq + 2, 2, 1, head_dim)
    for dtype in dtypes_for(backend):
        check(backend, dtype, q, k, v, causal=True)


def test_fully_masked_rows(backend):
    q, k, v = dense_inputs(2, 9, 4, 2, 2, 16)  # causal, bottom-right: rows 0..4 see no key
    for dtype in dtypes_for(backend):
        out, lse = check(backend, dtype, q, k, v, causal=True)
        assert bool((out[:, :5] == 0).all()) and bool((lse[:, :, :5] == -math.inf).all())


@pytest.mark.parametrize(
    "window", [(3, 2), (0, 0), (4, -1), (-1, 1), (50, 50)], ids=lambda w: f"{w[0]}_{w[1]}"
)
def test_sliding_windows(backend, window):
    if window in ((0, 0), (-1, 1)):
        not_interpreted(backend, "(3, 2), (4, -1) and (50, 50) cover both bounds")
    q, k, v = dense_inputs(2, 11, 14, 4, 2, 16)
    for dtype in dtypes_for(backend):
        check(backend, dtype, q, k, v, window_left=window[0], window_right=window[1])


def test_window_wider_than_the_sequence_equals_no_window(backend):
    q, k, v = dense_inputs(1, 7, 7, 2, 2, 16)
    dev = device_of(backend)
    q, k, v = (t.to(dev, dtypes_for(backend)[0]) for t in (q, k, v))
    wide, _ = ops.flash_attention(q, k, v, window_left=100, window_right=0, backend=backend)
    causal, _ = ops.flash_attention(q, k, v, causal=True, backend=backend)
    atol = 1e-6 if q.dtype == torch.float32 else 1e-3
    torch.testing.assert_close(wide, causal, atol=atol, rtol=0)


def test_softcap(backend):
    q, k, v = dense_inputs(2, 10, 12, 4, 2, 32)
    for dtype in dtypes_for(backend, bf16=True):
        check(backend, dtype, q * 3, k * 3, v, scale=1.0, softcap=5.0, causal=True,
              grad=dtype != torch.bfloat16)  # fmt: skip


@pytest.mark.parametrize("shape", ["h", "bh"])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi(backend, shape, causal):
    if shape == "h" and causal:
        not_interpreted(backend, "(H,) runs non-causal, (B, H) both")
    q, k, v = dense_inputs(2, 9, 12, 4, 2, 16)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    if shape == "bh":
        slopes = torch.stack([slopes, slopes.flip(0) * 2])
    for dtype in dtypes_for(backend):
        check(backend, dtype, q, k, v, alibi_slopes=slopes, causal=causal)


def test_sinks(backend):
    declined_by_cuda(backend, "attention sinks")
    q, k, v = dense_inputs(2, 9, 11, 4, 2, 16)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    for dtype in dtypes_for(backend):
        check(backend, dtype, q, k, v, sinks=sinks, causal=True, window_left=4)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask(backend, kind):
    q, k, v = dense_inputs(2, 7, 9, 4, 2, 16)
    gen = torch.Generator().manual_seed(5)
    if kind == "bool":
        mask = torch.rand((2, 1, 7, 9), generator=gen) > 0.3
        mask[:, :, 2] = False  # a fully masked row
    else:
        mask = torch.randn((7, 9), generator=gen)
    for dtype in dtypes_for(backend):
        try:
            check(backend, dtype, q, k, v, attn_mask=mask, softcap=3.0)
        except (NotImplementedError, RuntimeError) as exc:  # optional in the contract
            if "attn_mask" not in str(exc):
                raise
            pytest.skip(f"{backend} does not implement attn_mask: {exc}")


# -- variable length ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_with_empty_sequences(backend, causal):
    lens_q, lens_k = [5, 0, 9, 1, 3], [7, 3, 0, 11, 3]
    q = rand((sum(lens_q) + 2, 4, 16), seed=1)  # two rows past the last sequence
    k, v = rand((sum(lens_k), 2, 16), seed=2), rand((sum(lens_k), 2, 16), seed=3)
    layout = dict(
        cu_seqlens_q=cu_seqlens(lens_q), cu_seqlens_k=cu_seqlens(lens_k),
        max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
    )  # fmt: skip
    for dtype in dtypes_for(backend, interpreted_fp16=causal):
        out, lse = check(backend, dtype, q, k, v, causal=causal, **layout)
        assert bool((out[-2:] == 0).all()) and bool((lse[:, -2:] == -math.inf).all())


def test_varlen_with_every_score_feature(backend):
    lens_q, lens_k = [6, 2, 4], [6, 9, 1]
    q = rand((12, 4, 32), seed=1)
    k, v = rand((16, 1, 32), seed=2), rand((16, 1, 32), seed=3)
    kw = dict(
        cu_seqlens_q=cu_seqlens(lens_q), cu_seqlens_k=cu_seqlens(lens_k), max_seqlen_q=6,
        max_seqlen_k=9, causal=True, window_left=3, softcap=4.0,
        alibi_slopes=torch.rand((3, 4), generator=torch.Generator().manual_seed(1)),
    )  # fmt: skip
    for dtype in dtypes_for(backend):
        check(backend, dtype, q, k, v, sinks=torch.tensor([0.0, 1.0, -1.0, 0.5]), **kw)


# -- dropout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("varlen", [False, True])
def test_dropout_forward_and_backward_match_the_reference_mask(backend, varlen):
    declined_by_cuda(backend, "dropout")
    rng = torch.tensor([20240601, 17], dtype=torch.int64)
    if varlen:
        lens = [5, 0, 8]
        q = rand((13, 4, 16), seed=1)
        k, v = rand((13, 2, 16), seed=2), rand((13, 2, 16), seed=3)
        cu = cu_seqlens(lens)
        layout = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=8, max_seqlen_k=8)
    else:
        q, k, v = dense_inputs(2, 9, 12, 4, 2, 16)
        layout = {}
    for dtype in dtypes_for(backend, interpreted_fp16=not varlen):
        check(backend, dtype, q, k, v, dropout_p=0.3, rng_state=rng, causal=True, **layout)


def _kernel_keep_mask(backend, p, rng, batch, heads, length):
    """The keep mask a backend applied, read back through one-hot values: with q = k = 0 every
    probability is 1 / S, so ``out[b, i, h, j] = keep[b, h, i, j] / (S (1 - p))``."""
    dev = device_of(backend)
    q = torch.zeros((batch, length, heads, 16), device=dev)
    eye = torch.eye(length, device=dev)
    v = eye.view(1, length, 1, length).expand(batch, length, heads, length).contiguous()
    out, _ = ops.flash_attention(q, q, v, dropout_p=p, rng_state=rng, backend=backend)
    return (out * length * (1 - p)).permute(0, 2, 1, 3).cpu() > 0.5  # (B, H, L, S)


def test_dropout_keep_fraction_and_mask(backend):
    declined_by_cuda(backend, "dropout")
    p = 0.17
    rng = torch.tensor([123456789, 3], dtype=torch.int64)
    batch, heads, length = (1, 2, 64) if small(backend) else (4, 8, 128)
    keep = _kernel_keep_mask(backend, p, rng, batch, heads, length)
    fraction = keep.double().mean().item()
    assert abs(fraction - (1 - p)) < 0.01 * (1 - p), fraction
    expected = torch.stack(
        [dropout_keep_mask(rng, b, range(heads), length, length, p, heads) for b in range(batch)]
    )
    assert torch.equal(keep, expected)


def test_same_seed_same_result_on_one_and_two_threads(backend):
    declined_by_cuda(backend, "dropout")
    if backend == "triton":
        pytest.skip("thread counts apply to the CPU backends")
    q, k, v = dense_inputs(2, 33, 40, 4, 2, 32)
    rng = torch.tensor([99, 1], dtype=torch.int64)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
            out, lse = ops.flash_attention(*leaves, dropout_p=0.25, rng_state=rng, causal=True,
                                           backend=backend)  # fmt: skip
            grads = torch.autograd.grad(out.sum(), leaves)
            results.append((out, lse, *grads))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# -- KV cache (forward only) -------------------------------------------------------------------


def test_kv_cache_seqused_leftpad_batch_index(backend):
    declined_by_cuda(backend, "the KV-cache arguments")
    q = rand((3, 2, 4, 16), seed=1)
    cache_k, cache_v = rand((4, 20, 2, 16), seed=2), rand((4, 20, 2, 16), seed=3)
    kw = dict(
        seqused_k=torch.tensor([9, 20, 4], dtype=torch.int32),
        leftpad_k=torch.tensor([2, 0, 4], dtype=torch.int32),  # batch 2: no key at all
        kv_batch_idx=torch.tensor([3, 0, 1], dtype=torch.int32),
        causal=True,
    )
    for dtype in dtypes_for(backend):
        out, _ = check(backend, dtype, q, cache_k, cache_v, grad=False, **kw)
        assert bool((out[2] == 0).all())


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_paged_cache_equals_contiguous(backend, page_size):
    declined_by_cuda(backend, "the KV-cache arguments")
    if page_size == 16:
        not_interpreted(backend, "page sizes 1 and 3 are the per-row lookups")
    lq = 1 if small(backend) else 3
    q = rand((2, lq, 4, 16), seed=1)
    cache_k, cache_v = rand((2, 19, 2, 16), seed=2), rand((2, 19, 2, 16), seed=3)
    pool_k, table = paged_cache(cache_k, page_size, seed=page_size, spare=3)
    pool_v, _ = paged_cache(cache_v, page_size, seed=page_size, spare=3)
    kw = dict(
        seqused_k=torch.tensor([19, 7], dtype=torch.int32),
        leftpad_k=torch.tensor([1, 0], dtype=torch.int32), causal=True, softcap=8.0,
    )  # fmt: skip
    for dtype in dtypes_for(backend):
        paged, _ = check(backend, dtype, q, pool_k, pool_v, block_table=table, grad=False, **kw)
        contiguous, _ = check(backend, dtype, q, cache_k, cache_v, grad=False, **kw)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(paged, contiguous, atol=tol, rtol=0)


@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_decode_with_splits(backend, num_splits):
    declined_by_cuda(backend, "the KV-cache arguments")
    if num_splits == 1:
        not_interpreted(backend, "0 and 3 splits cover it")
    q = rand((2, 1, 8, 32), seed=1)
    cache_k, cache_v = rand((2, 64, 2, 32), seed=2), rand((2, 64, 2, 32), seed=3)
    kw = dict(seqused_k=torch.tensor([64, 37], dtype=torch.int32), num_splits=num_splits)
    for dtype in dtypes_for(backend):
        check(backend, dtype, q, cache_k, cache_v, grad=False, **kw)
