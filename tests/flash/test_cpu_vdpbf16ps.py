"""The CPU kernel's bf16 GEMMs on its own vdpbf16ps micro-kernel (AVX-512 build, CPUs with
AVX512_BF16): the path bf16 takes where torch's brgemm cannot pack bf16 (no AMX, as on AMD Zen 4)
or is switched off.

Every case runs twice: on that path (``use_brgemm=False, use_amx=False``) and with the
micro-kernel switched off (``use_avx512_bf16=False``: bf16 widened to fp32, the path it
replaces), each against a float64 oracle. The micro-kernel must be as accurate as the fp32 path
within the 2x rule, on ragged shapes (odd head dims, M and N not multiples of the 6 x 64 tile,
windows whose first key block is not a multiple of 64), forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from flash_testing import naive_dense, rand
from sdpa_testing import cpu_kernel, make_qkv

import aigc_ext
from aigc_ext import flash_attn_interface as fa
from aigc_ext.backends.reference.ops import sdpa_reference
from aigc_ext.bench.roofline import cpu_features

BF16 = torch.bfloat16


def _vdpbf16ps_available() -> bool:
    config = aigc_ext.ops.cpu_kernel_config()
    return (
        torch.backends.cpu.get_cpu_capability() == "AVX512"
        and "avx512" in config.split("compiled=")[1]
    )


pytestmark = pytest.mark.skipif(
    not _vdpbf16ps_available(), reason="needs the AVX-512 build and a CPU with AVX512_BF16"
)

# the micro-kernel's path, and the fp32 path it replaces
CONFIGS = {
    "vdpbf16ps": dict(isa="avx512", use_brgemm=False, use_amx=False, use_avx512_bf16=True),
    "fp32": dict(isa="avx512", use_brgemm=False, use_amx=False, use_avx512_bf16=False),
}


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item()


def _run_both(fn):
    """``fn()`` (a tuple of tensors) under each configuration, with the config strings."""
    out = {}
    for name, cfg in CONFIGS.items():
        with cpu_kernel(**cfg) as config:
            assert "brgemm=0" in config and "amx=0" in config
            assert f"vdpbf16ps={int(cfg['use_avx512_bf16'])}" in config
            out[name] = fn()
    return out


def _check(results: dict, refs: tuple[torch.Tensor, ...]) -> None:
    for i, ref in enumerate(refs):
        mine = _err(results["vdpbf16ps"][i], ref)
        base = _err(results["fp32"][i], ref)
        assert mine <= 2 * base + 1e-5, f"tensor {i}: vdpbf16ps error {mine:.3g}, fp32 {base:.3g}"


SDPA_CASES = [
    # (B, Hq, Hkv, L, S, E, Ev, causal)
    (1, 2, 2, 257, 333, 64, 64, False),
    (2, 4, 2, 150, 301, 59, 40, True),  # odd head dim, GQA
    (1, 2, 1, 130, 130, 128, 128, True),
    (1, 1, 1, 47, 1000, 256, 200, False),  # key blocks beyond one, a ragged 16-column edge
    (1, 2, 2, 600, 530, 80, 80, True),
]


@pytest.mark.parametrize(
    "case", SDPA_CASES, ids=lambda c: "x".join(map(str, c[:7])) + f"c{int(c[7])}"
)
def test_sdpa_forward_backward(case):
    b, hq, hkv, lq, lk, e, ev, causal = case
    q, k, v = make_qkv(b, hq, hkv, lq, lk, e, ev, dtype=BF16, seed=lq)
    g = rand((b, hq, lq, ev), BF16, seed=1)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sdpa_reference(qd, kd, vd, is_causal=causal, enable_gqa=hq != hkv)
    ref.backward(g.double())

    def call():
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        with aigc_ext.use_backend("cpu"):
            out = aigc_ext.scaled_dot_product_attention(
                qq, kk, vv, is_causal=causal, enable_gqa=hq != hkv
            )
        out.backward(g)
        return out, qq.grad, kk.grad, vv.grad

    _check(_run_both(call), (ref, qd.grad, kd.grad, vd.grad))


FLASH_CASES = [
    # (L, S, D, causal, window, softcap, alibi)
    (200, 390, 64, True, (-1, -1), 0.0, False),
    (513, 513, 128, True, (100, 0), 0.0, False),  # window: key blocks start mid-panel
    (300, 700, 96, False, (150, 37), 0.0, False),
    (256, 256, 64, True, (-1, -1), 30.0, False),
    (190, 260, 64, False, (-1, -1), 0.0, True),
]


@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
def test_flash_features_forward_backward(case):
    lq, lk, d, causal, window, softcap, alibi = case
    h, hkv = 4, 2
    q = rand((1, lq, h, d), BF16, seed=2)
    k = rand((1, lk, hkv, d), BF16, seed=3)
    v = rand((1, lk, hkv, d), BF16, seed=4)
    g = rand((1, lq, h, d), BF16, seed=5)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if alibi else None
    scale = d**-0.5
    opts = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = naive_dense(
        qd, kd, vd, scale=scale, causal=causal, window=window, softcap=softcap, alibi=slopes
    )
    ref.backward(g.double())

    def call():
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fa.flash_attn_func(qq, kk, vv, softmax_scale=scale, **opts)
        out.backward(g)
        return out, qq.grad, kk.grad, vv.grad

    _check(_run_both(call), (ref, qd.grad, kd.grad, vd.grad))


def test_switch_is_reported_and_restored():
    with cpu_kernel(isa="avx512", use_avx512_bf16=False) as config:
        assert "avx512_bf16=off" in config and "vdpbf16ps=0" in config
    with cpu_kernel(isa="avx512", use_avx512_bf16=True) as config:
        assert "avx512_bf16=on" in config and "vdpbf16ps=1" in config
    with cpu_kernel(isa="avx2", use_avx512_bf16=True) as config:
        assert "vdpbf16ps=0" in config  # the AVX2 kernels have no vdpbf16ps
    config = aigc_ext.ops.cpu_kernel_config()
    assert "avx512_bf16=auto" in config
    # auto: on where the CPU has no AMX tiles
    assert f"vdpbf16ps={int(not cpu_features()['amx_bf16'])}" in config
    with pytest.raises(RuntimeError, match="use_avx512_bf16 must be"):
        aigc_ext.ops.cpu_kernel_config(use_avx512_bf16="sometimes")
