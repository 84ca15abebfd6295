"""The CPU kernel's register-blocked fp32 micro-kernels against float64: the AVX2 build's 6 x 16
tiles (csrc/cpu/microkernel_avx2.h) and the AVX-512 build's 6 x 64 tiles
(csrc/cpu/microkernel_avx512.h), on the same packed panels.

In both builds every fp32 product of the tiled forward and of the backward runs on them, over
B packed into panels of 16 columns, with bf16/fp16 widened to fp32 while packing (the AVX-512
build sends bf16/fp16 there where torch's brgemm and vdpbf16ps are off or unavailable, as
selected here). The tests give them shapes whose rows (M), columns (N) and inner dimension (K)
are no multiples of the tiles nor of the vectors: query blocks of 1 to 5 rows, row tails of 7
and 8 rows (run as 4 + 3 and 4 + 4), column groups of 1 to 3 panels and panels with 1 to 15
real columns, head dims from 3 to 256, and transposed operands (P^T, dS^T in the backward; K^T
packed from K's rows). Results are held to FlashAttention's error rule against the float64
reference, gradients included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sdpa_testing import check_sdpa, cpu_isa, cpu_isa_supported, make_qkv, randn

from aigc_ext.flash import ops as flash_ops
from aigc_ext.flash.reference import flash_reference
from aigc_ext.testing import check_error_rule

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

ISAS = ["avx2", "avx512"]


def _ids(x):
    return {F32: "fp32", BF16: "bf16", F16: "fp16"}.get(x, str(x))


@pytest.fixture(params=ISAS)
def avx2(request, cpu_backend):
    """The cpu backend with the AVX2 or the AVX-512 build selected for the test; on AVX-512,
    bf16/fp16 GEMMs off torch's brgemm and vdpbf16ps, so that they take the micro-kernels."""
    isa = request.param
    extra = {"use_brgemm": False, "use_avx512_bf16": False} if isa == "avx512" else {}
    with cpu_isa(isa, **extra):
        yield cpu_backend


# (B, Hq, Hkv, L, S, E, Ev): none of L, S, E, Ev a multiple of 6 or 16, but the 256 head dim.
RAGGED = [
    (1, 2, 1, 37, 53, 24, 24),  # one query block with a 7-row tail (6 * 5 + 7)
    (1, 2, 2, 131, 250, 200, 72),  # a query block of 128 rows (8-row tail) plus 3 rows
    (1, 1, 1, 97, 161, 256, 256),  # the widest head dim; K = 256 in S = Q K^T
    (2, 2, 2, 29, 45, 3, 5),  # K = 3 and a first panel with 5 real columns
]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=_ids)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", RAGGED, ids=lambda s: "x".join(map(str, s)))
def test_ragged_shapes_match_float64(avx2, shape, is_causal, dtype):
    b, hq, hkv, lq, lkv, e, ev = shape
    q, k, v = make_qkv(b, hq, hkv, lq, lkv, e, ev, dtype=dtype, seed=lq + e)
    check_sdpa(avx2, q, k, v, is_causal=is_causal, enable_gqa=hq != hkv)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
@pytest.mark.parametrize(
    ("block_q", "block_kv"), [(7, 32), (16, 96), (5, 64)], ids=["7x32", "16x96", "5x64"]
)
def test_small_ragged_tiles(avx2, monkeypatch, dtype, block_q, block_kv):
    """Forward tiles of 5, 7 and 16 query rows (row tails of 1 to 5 rows and of 7 rows) and key
    blocks whose last panel is partly padding; causal, so that products stop inside a block."""
    monkeypatch.setenv("AIGC_EXT_CPU_BLOCK_Q", str(block_q))
    monkeypatch.setenv("AIGC_EXT_CPU_BLOCK_KV", str(block_kv))
    q, k, v = make_qkv(1, 2, 2, 49, 171, 40, 19, dtype=dtype, seed=11)
    check_sdpa(avx2, q, k, v, is_causal=True)
    q, k, v = make_qkv(1, 1, 1, 83, 83, 130, dtype=dtype, seed=12)
    check_sdpa(avx2, q, k, v)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=_ids)
def test_strided_inputs(avx2, dtype):
    """(B, L, H, E) storage seen as (B, H, L, E): A and B operands with row strides of H * E."""
    q = randn((1, 45, 3, 72), dtype, seed=21).transpose(1, 2)
    k = randn((1, 70, 3, 72), dtype, seed=22).transpose(1, 2)
    v = randn((1, 70, 3, 72), dtype, seed=23).transpose(1, 2)
    check_sdpa(avx2, q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_masked_and_scaled(avx2, dtype):
    """A float mask with -inf entries and a custom scale on top of the micro-kernel products."""
    q, k, v = make_qkv(1, 2, 2, 61, 77, 48, dtype=dtype, seed=31)
    mask = torch.randn(61, 77).masked_fill(torch.rand(61, 77) < 0.3, float("-inf")).to(dtype)
    check_sdpa(avx2, q, k, v, attn_mask=mask, scale=0.3)


def _check_flash_against_float64(backend, dtype, lengths, dim, backward=True, **kw):
    """flash_attention on backend against the float64 flash reference, the same reference in
    dtype as the yardstick (the flash contract's error rule): lse, out and, with backward, the
    gradients."""
    q, k, v = (randn((1, n, 2, dim), F32, seed=41 + j) for j, n in enumerate(lengths))
    leaves = [t.to(dtype).requires_grad_(backward) for t in (q, k, v)]
    out, lse = flash_ops.flash_attention(*leaves, backend=backend, **kw)
    rounded = [t.detach() for t in leaves]
    ref_in = [t.double().requires_grad_(backward) for t in rounded]
    base_in = [t.clone().requires_grad_(backward) for t in rounded]
    ref_out, ref_lse = flash_reference(*ref_in, **kw)
    base_out, base_lse = flash_reference(*base_in, **kw)
    # Rows that see no key: lse -inf (and zeros out) exactly where the reference has them.
    seen = ~torch.isneginf(ref_lse.detach())
    assert torch.equal(~torch.isneginf(lse.detach()), seen)
    result = check_error_rule(lse[seen], ref_lse.detach()[seen], base_lse.detach()[seen])
    assert result.ok, result.describe("lse")
    result = check_error_rule(out.detach(), ref_out.detach(), base_out.detach())
    assert result.ok, result.describe("out")
    if not backward:
        return
    grad_out = randn(tuple(out.shape), F32, seed=49)
    ours = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    ref = torch.autograd.grad(ref_out, ref_in, grad_out.double())
    base = torch.autograd.grad(base_out, base_in, grad_out.to(dtype))
    for name, o, r, b in zip(("dq", "dk", "dv"), ours, ref, base, strict=True):
        result = check_error_rule(o.detach(), r.detach(), b.detach())
        assert result.ok, result.describe(name)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
@pytest.mark.parametrize("window", [(40, 0), (70, 25)], ids=lambda w: f"{w[0]}_{w[1]}")
def test_sliding_window_offsets(avx2, dtype, window):
    """Windows start the products past a block's first keys (column and row offsets of 32,
    64, 96 into the packed panels); softcap on top."""
    kw = {"window_left": window[0], "window_right": window[1], "softcap": 20.0, "scale": 0.2}
    _check_flash_against_float64(avx2, dtype, (300, 300, 300), 56, **kw)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
@pytest.mark.parametrize(
    "window", [(0, 0), (3, 0), (2, 9), (130, 0), (-1, 0)], ids=lambda w: f"{w[0]}_{w[1]}"
)
@pytest.mark.parametrize("block_q", [48, 13])
def test_banded_row_tiles(avx2, monkeypatch, dtype, window, block_q):
    """Causal and windowed blocks on the micro-kernels: each tile of rows computes its rows'
    keys only (csrc/cpu/row_band.h), leaving the block's other scores unwritten and skipping the
    other terms of P V. Windows narrower than a panel (a tile's rows see a few keys each, some
    tiles a single panel), a window across key blocks of 64, plain causal, and query blocks of
    13 rows (tiles of 6, 4 and 3 rows) are held to the float64 reference; L > S puts the causal
    diagonal past the block's start and leaves the first rows without keys."""
    monkeypatch.setenv("AIGC_EXT_CPU_BLOCK_Q", str(block_q))
    monkeypatch.setenv("AIGC_EXT_CPU_BLOCK_KV", "64")
    kw = {"window_left": window[0], "window_right": window[1], "scale": 0.3}
    _check_flash_against_float64(avx2, dtype, (211, 211, 211), 40, backward=False, **kw)
    _check_flash_against_float64(avx2, dtype, (170, 150, 150), 24, backward=False, **kw)


_SUBPROCESS = textwrap.dedent(
    """
    import json, sys, torch
    import aigc_ext
    from aigc_ext import ops
    ops.cpu_kernel_config(isa=sys.argv[1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 256, generator=g) for n in (300, 600, 600))
    with aigc_ext.use_backend("cpu"):
        out = aigc_ext.scaled_dot_product_attention(q, k, v)
    json.dump(out.flatten().tolist(), sys.stdout)
    """
)


def _run_with_microkernel(isa: str, enabled: bool) -> torch.Tensor:
    env = dict(os.environ)
    env["AIGC_EXT_CPU_MICROKERNEL"] = "1" if enabled else "0"
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, isa],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return torch.tensor(json.loads(done.stdout), dtype=torch.float64)


@pytest.mark.parametrize("isa", ISAS)
def test_microkernel_is_the_path_taken(isa):
    """AIGC_EXT_CPU_MICROKERNEL=0 sends fp32 back to BLAS: both agree to fp32 rounding, and
    they are not bitwise equal (BLAS splits these long inner dimensions, the micro-kernels
    accumulate them in one chain), so the micro-kernels did run."""
    if not cpu_isa_supported(isa):
        pytest.skip(f"the {isa} build is not compiled in or not supported here")
    micro, blas = _run_with_microkernel(isa, True), _run_with_microkernel(isa, False)
    torch.testing.assert_close(micro, blas, rtol=0, atol=1e-5)
    assert not torch.equal(micro, blas)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [3, 8], ids=["3rows", "8rows"])
def test_decoding_forward_and_backward_share_scores(cpu_backend, isa, rows):
    """The decoding forward (a few query rows, more than two per KV head) computes its fp32
    scores on the micro-kernels, as the backward recomputes them: with large scores (up to ~60,
    where a few ulps of difference would leave the probabilities unnormalised) the gradients
    meet the error rule against float64."""
    with cpu_isa(isa):
        for seed in range(10):
            q, k, v = make_qkv(4, 2, 2, rows, 2 * rows, 8, dtype=F32, seed=50 + seed)
            q, k = q * 6.0, k * 6.0
            check_sdpa(cpu_backend, q, k, v, is_causal=True)
