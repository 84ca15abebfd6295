"""Checks of the Triton flash operators that need no GPU and no interpreter: the operators as
``triton_op`` traced with fake CUDA tensors (what ``torch.compile`` sees), and ahead-of-time
compilation of the flash kernels for sm90 with Triton's real compiler."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
ON_GPU = os.environ.get("AIGC_EXT_TEST_DEVICE", "cpu") == "cuda"


def _without_interpreter(script: str, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_TRACE_SCRIPT = """
import json
import torch
from torch._library.triton import get_triton_kernels_for_op
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from aigc_ext.backends.triton import flash_kernels, flash_ops

OPTS = dict(scale=0.125, causal=True, window_left=64, softcap=30.0, dropout_p=0.1)

def f(q, k, v, cu, slopes, rng, g):
    args = (q, k, v, cu, cu, 100, 130)
    out, lse = flash_ops._forward(*args, None, None, None, None, OPTS["scale"], True, 64, -1,
                                  30.0, slopes, 0.1, rng, None, 0, None)
    grads = flash_ops._backward(g, q, k, v, out, lse, cu, cu, 100, 130, 0.125, True, 64, -1,
                                30.0, slopes, 0.1, rng, None)
    return (out, lse, *grads)

def paged(q, pages, table, used):
    return flash_ops._forward(q, pages, pages, None, None, 0, 0, used, None, None, table, 0.1,
                              True, -1, -1, 0.0, None, 0.0, None, None, 0, None)

with FakeTensorMode():
    dev = "cuda"
    q = torch.empty(250, 8, 72, device=dev, dtype=torch.bfloat16)
    k = torch.empty(300, 2, 72, device=dev, dtype=torch.bfloat16)
    v = torch.empty(300, 2, 72, device=dev, dtype=torch.bfloat16)
    cu = torch.empty(4, device=dev, dtype=torch.int32)
    slopes = torch.empty(8, device=dev, dtype=torch.float32)
    rng = torch.empty(2, dtype=torch.int64)
    g = torch.empty(250, 8, 72, device=dev, dtype=torch.bfloat16)
    outs = torch.ops.aigc_ext.triton_flash_forward(q, k, v, cu, cu, 100, 130, **OPTS,
                                                   rng_state=rng)
    gm = make_fx(f, tracing_mode="fake")(q, k, v, cu, slopes, rng, g)
    qd = torch.empty(4, 1, 8, 128, device=dev, dtype=torch.float16)
    pages = torch.empty(64, 16, 2, 128, device=dev, dtype=torch.float16)
    table = torch.empty(4, 16, device=dev, dtype=torch.int32)
    used = torch.empty(4, device=dev, dtype=torch.int32)
    gp = make_fx(paged, tracing_mode="fake")(qd, pages, table, used)
launches = []
for graph in (gm, gp):
    for node in graph.graph.nodes:
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
            kw = node.kwargs["kwargs"]
            launches.append({k: v for k, v in kw.items() if isinstance(v, (bool, int, float))})
print(json.dumps({
    "interpret": flash_kernels.INTERPRET,
    "kernels": {op: len(get_triton_kernels_for_op(op)) for op in (
        "aigc_ext::triton_flash_forward", "aigc_ext::triton_flash_backward")},
    "fake_out": [[list(t.shape), str(t.dtype), str(t.device)] for t in outs],
    "launches": launches,
}))
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests run the kernels")
def test_triton_op_traces_to_kernel_launches():
    """Without the interpreter the operators are ``triton_op``: traced with fake CUDA tensors
    (no GPU needed), a packed forward + backward becomes the four Triton kernel launches that
    inductor compiles, with the features as constexprs (grouped heads in the tiles, padded
    head dims, causal with a left window, softcap, ALiBi, dropout); a paged decoding step is
    one launch that looks pages up once per key tile."""
    info = _without_interpreter(_TRACE_SCRIPT, 300)
    assert info["interpret"] is False
    assert info["kernels"] == {
        "aigc_ext::triton_flash_forward": 1,
        "aigc_ext::triton_flash_backward": 3,
    }
    assert info["fake_out"] == [
        [[250, 8, 72], "torch.bfloat16", "cuda:0"],
        [[8, 250], "torch.float32", "cuda:0"],
    ]
    fwd, pre, dkdv, dq, decode = info["launches"]
    for launch in (fwd, dkdv, dq):
        assert launch["GROUP"] == 4 and launch["E"] == 72 and launch["BLOCK_D"] == 128
        assert launch["VARLEN"] is True and launch["WINDOW_LEFT"] is True
        assert launch["WINDOW_RIGHT"] is True and launch["window_right"] == 0
        assert launch["SOFTCAP"] is True and launch["ALIBI"] is True and launch["DROPOUT"] is True
        assert launch["threshold"] == int(0.1 * 2**24)
        assert launch["L"] == 100 and launch["S_CAP"] == 130
    assert pre["BLOCK_DV"] == 128 and pre["L"] == 250
    assert decode["PAGED"] is True and decode["PAGE_SIZE"] == 16 and decode["GROUP"] == 4
    assert decode["HAS_SEQUSED"] is True and decode["S_CAP"] == 16 * 16
    assert decode["DROPOUT"] is False and decode["SOFTCAP"] is False


def _ptxas_available() -> bool:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


_COMPILE_SCRIPT = """
import json, dataclasses
from aigc_ext.backends.triton import compile_check as cc
names = ("flash-fp16-varlen-all-d72", "flash-bf16-paged64-decode")
rows = [dataclasses.asdict(r) for v in cc.FLASH_VARIANTS["quick"] if v.name in names
        for r in cc.compile_flash_variant(v, 90)]
print(json.dumps(rows))
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run the kernels")
@pytest.mark.skipif(not _ptxas_available(), reason="Triton's ptxas is not available")
def test_flash_kernels_compile_for_sm90():
    """The flash forward, dK/dV and dQ kernels with every feature on (packed layout, windows,
    softcap, ALiBi, dropout, padded head dim 72) and the paged decoding forward compile for
    sm90; the key/value streams are pipelined (asynchronous copies), the 64-row tiles use
    wgmma, the 16-row decoding tile mma.sync, and shared memory fits an H100/H200."""
    rows = _without_interpreter(_COMPILE_SCRIPT, 900)
    assert [(r["variant"], r["kernel"]) for r in rows] == [
        ("flash-fp16-varlen-all-d72", "fwd"),
        ("flash-fp16-varlen-all-d72", "dkdv"),
        ("flash-fp16-varlen-all-d72", "dq"),
        ("flash-bf16-paged64-decode", "fwd"),
    ]
    for r in rows:
        assert r["shared_bytes"] <= 227 * 1024, r
        assert r["cp_async"] > 0, f"no pipelined loads: {r}"
        if r["variant"].endswith("decode"):  # 16 query rows: below wgmma's 64
            assert r["mma_sync"] > 0, f"no tensor-core instruction: {r}"
        else:
            assert r["wgmma"] > 0, f"no wgmma on sm90: {r}"
