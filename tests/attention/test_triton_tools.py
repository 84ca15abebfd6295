"""Checks of the triton backend that need no GPU: ahead-of-time compilation for sm90 (the
interpreter never runs Triton's compiler) and the GPU benchmark's code paths (dry run)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sdpa_testing import DEVICE, fused_backends

ROOT = Path(__file__).resolve().parents[2]


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


_COMPILE_SCRIPT = """
import json, dataclasses
from aigc_ext.backends.triton import compile_check as cc
rows = [dataclasses.asdict(r) for v in cc.VARIANTS["quick"] for r in cc.compile_variant(v, 90)]
print(json.dumps(rows))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the other tests compile and run the kernels")
@pytest.mark.skipif(not _ptxas_available(), reason="Triton's ptxas is not available")
def test_kernels_compile_for_sm90():
    """The forward, dK/dV and dQ kernels compile for sm90 (in a process without the
    interpreter); bf16/fp16 use wgmma tensor cores with pipelined asynchronous copies, float32
    uses IEEE FMA (no TF32 tensor-core instruction), and shared memory fits an H100/H200."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {(r["variant"], r["kernel"]) for r in rows} == {
        (v, k)
        for v in ("bf16-causal-nomask-d128", "fp16-d72-floatmask-causal", "fp32-keypadding-d64")
        for k in ("fwd", "dkdv", "dq")
    }
    for r in rows:
        assert r["shared_bytes"] <= 227 * 1024, r
        assert r["cp_async"] > 0, f"no pipelined loads: {r}"
        if r["variant"].startswith("fp32"):
            assert r["wgmma"] == 0 and r["mma_sync"] == 0, f"float32 must not use TF32: {r}"
        else:
            assert r["wgmma"] > 0, f"no wgmma on sm90: {r}"


_TRACE_SCRIPT = """
import json
import torch
from torch._library.triton import get_triton_kernels_for_op
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from aigc_ext.backends.triton import kernels, ops

def f(q, k, v, m, g):
    out, lse = ops._forward(q, k, v, m, True, 0.125)
    return (out, lse, *ops._backward(g, q, k, v, out, lse, m, True, 0.125))

with FakeTensorMode():
    q = torch.empty(2, 4, 100, 72, device="cuda", dtype=torch.bfloat16)
    k = torch.empty(2, 2, 130, 72, device="cuda", dtype=torch.bfloat16)
    v = torch.empty(2, 2, 130, 40, device="cuda", dtype=torch.bfloat16)
    m = torch.empty(2, 1, 1, 130, device="cuda", dtype=torch.bool)
    g = torch.empty(2, 4, 100, 40, device="cuda", dtype=torch.bfloat16)
    outs = torch.ops.aigc_ext.triton_attention_forward(q, k, v, m, True, 0.125)
    gm = make_fx(f, tracing_mode="fake")(q, k, v, m, g)
launches = []
for node in gm.graph.nodes:
    if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
        kw = node.kwargs["kwargs"]
        launches.append({k: v for k, v in kw.items() if isinstance(v, (bool, int, float))})
print(json.dumps({
    "interpret": kernels.INTERPRET,
    "kernels": {op: len(get_triton_kernels_for_op(op)) for op in (
        "aigc_ext::triton_attention_forward", "aigc_ext::triton_attention_backward")},
    "fake_out": [[list(t.shape), str(t.dtype), str(t.device)] for t in outs],
    "launches": launches,
}))
"""


def test_triton_op_traces_to_kernel_launches():
    """Without the interpreter the operators are triton_ops: traced with fake CUDA tensors
    (no GPU needed), forward + backward become the four Triton kernel launches that inductor
    compiles, with the arguments the kernels expect (key-padding mask read as a key vector,
    GQA group 2, padded head dims)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["interpret"] is False
    assert info["kernels"] == {
        "aigc_ext::triton_attention_forward": 1,
        "aigc_ext::triton_attention_backward": 3,
    }
    assert info["fake_out"] == [
        [[2, 4, 100, 40], "torch.bfloat16", "cuda:0"],
        [[2, 4, 100], "torch.float32", "cuda:0"],
    ]
    fwd, pre, dkdv, dq = info["launches"]
    for launch in (fwd, dkdv, dq):
        assert launch["MASK_MODE"] == 1 and launch["MASK_BOOL"] is True
        assert launch["IS_CAUSAL"] is True and launch["GROUP"] == 2
        assert (launch["BLOCK_D"], launch["BLOCK_DV"]) == (128, 64)
        assert launch["EVEN_D"] is False and launch["UPCAST"] is False
        assert launch["stride_ml"] == 0 and launch["stride_mh"] == 0
    assert (pre["L"], pre["EV"]) == (100, 40)
    assert dkdv["HKV"] == 2 and dkdv["scale"] == 0.125


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_flops_and_summary():
    bench = _load_bench()
    assert bench.flops(2, 16, 1024, 1024, 128, False, "fwd") == 4 * 2 * 16 * 1024 * 1024 * 128
    assert bench.flops(2, 16, 1024, 1024, 128, True, "fwd") == 2 * 2 * 16 * 1024 * 1024 * 128
    assert bench.flops(1, 1, 8, 8, 8, False, "fwdbwd") == 3.5 * 4 * 8**3
    rows = [
        {"provider": p, "mode": "fwd", "E": 128, "L": 2048, "B": 8, "causal": True, "tflops": t}
        for p, t in (("triton", 300.0), ("flash", 250.0), ("cudnn", 400.0), ("flex", 200.0))
    ]
    rows.append(
        {"provider": "efficient", "mode": "fwd", "E": 128, "L": 2048, "B": 8, "causal": True}
    )
    (g,) = bench.summarize(rows)
    assert g["fastest_torch_sdpa"] == "cudnn"
    assert g["triton_vs_fastest_torch_sdpa"] == pytest.approx(0.75)
    assert g["triton_vs_flex"] == pytest.approx(1.5)
    assert g["cuda_vs_fastest_torch_sdpa"] is None  # not measured: no ratio
    text = bench.table([g])
    assert "0.75x" in text and "cudnn" in text and "1.50x" in text


@pytest.mark.skipif(
    "triton" not in fused_backends("cpu") or DEVICE != "cpu",
    reason="the dry run uses the Triton interpreter on CPU tensors",
)
def test_bench_dry_run(tmp_path, capsys):
    """Every code path of the benchmark on tiny CPU shapes: providers, timing, JSON output."""
    bench = _load_bench()
    assert bench.main(["--dry-run", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "bench_gpu.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    # the matmul rate, then causal x modes x providers
    assert rows[0]["mode"] == "matmul" and rows[0]["tflops"] > 0
    assert len(rows) == 1 + 2 * 2 * len(bench.PROVIDERS)
    ours = [r for r in rows if r["provider"] == "triton"]
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in ours)
    flash_fwd = [r for r in rows if r["provider"] == "flash" and r["mode"] == "fwd"]
    assert all(r["diff_against"] == "triton" and r["max_abs_diff"] < 1e-2 for r in flash_fwd)
    summary = json.loads((tmp_path / "bench_gpu.json").read_text())["summary"]
    assert len(summary) == 4 and all(g["tflops"]["triton"] for g in summary)
    assert "triton/sdpa" in capsys.readouterr().out
    # --report rebuilds the table from the JSON-lines file alone
    assert bench.main(["--report", str(tmp_path / "bench_gpu.jsonl")]) == 0
    assert "triton/sdpa" in capsys.readouterr().out
