#!/usr/bin/env python
"""GPU attention benchmark: the triton and cuda backends against torch's SDPA and FlexAttention.

Providers: ``triton`` (the Triton operators of ``aigc_ext.backends.triton``), ``cuda`` (the CUDA
C++ kernels of ``torch.ops.aigc_ext.attention_forward``, builds with ``AIGC_EXT_WITH_CUDA=1``),
torch's
``scaled_dot_product_attention`` restricted to one backend each (``flash``, ``efficient``,
``cudnn``; one that cannot serve a shape is reported as such) and ``flex``
(``torch.compile``'d ``flex_attention``; causal through a block mask). Defaults: bfloat16,
head dims 64, 128 and 256, H * E = 2048 (H = 2048 / E), L = S in {1k, 2k, 4k, 8k, 16k} with
B * L = 16k tokens, causal and not, forward and forward+backward. A bf16 matmul
(``--matmul-size``, square) is timed in the same run: the table's "% of matmul" columns.

Timing: ``triton.testing.do_bench`` (median; it flushes the L2 cache before every run).
FLOPs: ``aigc_ext.bench.flops.attention_flop``, forward ``4 * B * H * L * S * E`` (halved when
causal); forward+backward 3.5x that.
Every measurement is appended to ``<out>/bench_gpu.jsonl`` at once, so a run cut short by a
timeout keeps what it measured; ``--time-budget`` stops cleanly before that. The summary
(``bench_gpu.json`` and a table of TFLOP/s with triton and cuda / fastest torch SDPA backend,
/ flex and as % of the matmul rate) is written at the end, or rebuilt from JSON-lines files with ``--report``.

    python benchmarks/bench_gpu.py --out results/
    python benchmarks/bench_gpu.py --report results/bench_gpu.jsonl
    python benchmarks/bench_gpu.py --dry-run        # tiny shapes on the CPU (interpreter)

``--dry-run`` runs every code path on tiny CPU shapes through the Triton interpreter (timed with
``time.perf_counter``); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

TORCH_SDPA = ("flash", "efficient", "cudnn")
OURS = ("triton", "cuda")
PROVIDERS = (*OURS, *TORCH_SDPA, "flex")
MODES = ("fwd", "fwdbwd")
DTYPES = ("bf16", "fp16")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny CPU shapes, interpreter")
    p.add_argument("--out", default=os.environ.get("OUT"), help="results directory ($OUT)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="B * L")
    p.add_argument("--heads", type=int, default=0, help="heads (0: --head-product / E, at least 1)")
    p.add_argument("--head-product", type=int, default=2048, help="H * E when --heads is 0")
    p.add_argument("--matmul-size", type=int, default=8192, help="N of the N x N matmul (0: none)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--warmup", type=int, default=10, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=40, help="do_bench repetitions, ms")
    p.add_argument(
        "--time-budget", type=float, default=0.0, help="stop after this many s (0: none)"
    )
    p.add_argument("--no-flex-compile", action="store_true", help="run flex_attention eagerly")
    p.add_argument(
        "--report", nargs="+", metavar="JSONL", help="only print the table of these files"
    )
    a = p.parse_args(argv)
    for name in ("heads", "head_product", "matmul_size", "tokens"):
        if getattr(a, name) < 0 or (name in ("head_product", "tokens") and getattr(a, name) < 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if any(e < 1 for e in a.head_dims) or any(n < 1 for n in a.seqs):
        p.error(f"--head-dims and --seqs must be positive, got {a.head_dims} and {a.seqs}")
    if a.dry_run:
        a.head_dims, a.seqs, a.tokens, a.heads, a.matmul_size = [16], [64], 64, 2, 64
        a.no_flex_compile = True
    return a


# ---------------------------------------------------------------------------------------------
# problems and providers
# ---------------------------------------------------------------------------------------------


# This script's modes as aigc_ext.bench.flops names them.
_FLOP_MODES = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}


def flops(b: int, h: int, lq: int, lkv: int, e: int, causal: bool, mode: str) -> float:
    """Matmul FLOPs of one call (``mode`` ``fwd`` or ``fwdbwd``), by the package's FLOP model.

    :func:`aigc_ext.bench.flops.attention_flop`: forward ``4 B H L S E``, half when causal with
    ``L = S``; forward+backward 3.5x. Imported here, not at the top: ``--dry-run`` turns on
    Triton's interpreter before anything of aigc_ext is imported.
    """
    from aigc_ext.bench.flops import attention_flop

    if mode not in _FLOP_MODES:
        raise ValueError(f"mode: unknown value {mode!r}; expected one of {', '.join(MODES)}")
    return attention_flop(b, h, lq, lkv, e, causal=causal, mode=_FLOP_MODES[mode])


def heads_for(a, e: int) -> int:
    """H for head dim ``e``: ``--heads``, or ``--head-product // e`` (at least 1)."""
    return a.heads if a.heads else max(1, a.head_product // e)


def _triton(torch):
    from aigc_ext.backends.triton import ops

    def fn(q, k, v, causal, scale):
        return ops.attention_with_lse(q, k, v, None, causal, scale)[0]

    return fn


def _cuda(torch):
    from aigc_ext.backends.cpu import ops  # noqa: F401  (loads the library, its autograd)
    from aigc_ext.backends.cuda.backend import unavailable_reason

    why = unavailable_reason()
    forward = torch.ops.aigc_ext.attention_forward

    def fn(q, k, v, causal, scale):
        if why is not None:
            raise RuntimeError(f"cuda backend unavailable: {why}")
        return forward(q, k, v, None, causal, scale)[0]

    return fn


def _torch_sdpa(torch, name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]
    F = torch.nn.functional

    def fn(q, k, v, causal, scale):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    return fn


def _flex(torch, compile_it: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    attend = torch.compile(flex_attention, dynamic=False) if compile_it else flex_attention
    masks: dict = {}

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def fn(q, k, v, causal, scale):
        block_mask = None
        if causal:
            key = (q.shape[-2], k.shape[-2], q.device)
            if key not in masks:
                masks[key] = create_block_mask(
                    causal_mod, None, None, q.shape[-2], k.shape[-2], device=q.device
                )
            block_mask = masks[key]
        return attend(q, k, v, block_mask=block_mask, scale=scale)

    return fn


def make_provider(torch, name: str, flex_compile: bool) -> Callable:
    if name == "triton":
        return _triton(torch)
    if name == "cuda":
        return _cuda(torch)
    if name == "flex":
        return _flex(torch, flex_compile)
    return _torch_sdpa(torch, name)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def _timer(torch, on_gpu: bool, warmup: int, rep: int):
    if on_gpu:
        import triton.testing

        def time_ms(fn, grad_to_none):
            return triton.testing.do_bench(
                fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"
            )

        return time_ms

    def time_ms_cpu(fn, grad_to_none):
        fn()  # warm-up (compiles, autotunes)
        times = []
        for _ in range(3):
            for t in grad_to_none or ():
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return time_ms_cpu


def measure(torch, provider_fn, q, k, v, dout, causal, mode, time_ms) -> float:
    """Milliseconds of one forward (``fwd``) or forward+backward (``fwdbwd``) call."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if mode == "fwd":
        with torch.no_grad():
            return time_ms(lambda: provider_fn(q, k, v, causal, scale), None)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        out = provider_fn(*leaves, causal, scale)
        out.backward(dout)

    return time_ms(step, leaves)


def matmul_tflops(torch, n: int, dtype, device: str, time_ms) -> float:
    """TFLOP/s of an ``n x n`` by ``n x n`` matmul (``2 n^3`` FLOPs), timed as the attention."""
    gen = torch.Generator(device="cpu").manual_seed(n)
    x, y = (torch.randn((n, n), generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    ms = time_ms(lambda: torch.matmul(x, y), None)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def _max_diff(torch, a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def _cases(a):
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[a.causal]
    for e in a.head_dims:
        for lq in a.seqs:
            b = max(1, a.tokens // lq)
            for c in causal:
                yield e, b, lq, c


def run(a) -> list[dict]:
    if a.dry_run:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    on_gpu = torch.cuda.is_available() and not a.dry_run
    device = "cuda" if on_gpu else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    if not on_gpu:
        dtype = torch.float16  # the interpreter's bfloat16 dot is not exact
    time_ms = _timer(torch, on_gpu, a.warmup, a.rep)
    out_dir = Path(a.out) if a.out else None
    jsonl = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        jsonl = out_dir / "bench_gpu.jsonl"
    providers = {p: make_provider(torch, p, not a.no_flex_compile) for p in a.providers}
    if "flex" in providers:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    start = time.monotonic()
    rows: list[dict] = []
    print(
        f"device {torch.cuda.get_device_name() if on_gpu else 'cpu (dry run)'}, torch "
        f"{torch.__version__}, dtype {dtype}, providers {', '.join(providers)}",
        flush=True,
    )
    if a.matmul_size:
        row = {"provider": "matmul", "mode": "matmul", "N": a.matmul_size, "device": device,
               "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
        try:
            row["tflops"] = matmul_tflops(torch, a.matmul_size, dtype, device, time_ms)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
        if jsonl is not None:
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"matmul {a.matmul_size}^3: {row.get('tflops', row.get('error'))}", flush=True)
    for e, b, lq, causal in _cases(a):
        heads = heads_for(a, e)
        gen = torch.Generator(device="cpu").manual_seed(lq + e)
        q, k, v, dout = (
            torch.randn((b, heads, lq, e), generator=gen).to(device=device, dtype=dtype)
            for _ in range(4)
        )
        reference, reference_name = None, None
        for mode in a.modes:
            for name, fn in providers.items():
                if a.time_budget and time.monotonic() - start > a.time_budget:
                    print(f"time budget of {a.time_budget:.0f} s spent: stopping", flush=True)
                    return rows
                row = {
                    "provider": name,
                    "mode": mode,
                    "dtype": str(dtype).removeprefix("torch."),
                    "B": b,
                    "H": heads,
                    "L": lq,
                    "S": lq,
                    "E": e,
                    "causal": causal,
                    "device": device,
                }
                try:
                    if mode == "fwd":  # correctness against the first provider that served
                        with torch.no_grad():
                            got = fn(q, k, v, causal, 1.0 / math.sqrt(e))
                        if reference is None:
                            reference, reference_name = got, name
                        row["max_abs_diff"] = _max_diff(torch, got, reference)
                        row["diff_against"] = reference_name
                    ms = measure(torch, fn, q, k, v, dout, causal, mode, time_ms)
                    row["ms"] = ms
                    row["tflops"] = flops(b, heads, lq, lq, e, causal, mode) / (ms * 1e-3) / 1e12
                except Exception as exc:  # a backend that cannot serve this shape
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                rows.append(row)
                if jsonl is not None:
                    with jsonl.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                shown = f"{row['tflops']:8.1f} TFLOP/s" if "tflops" in row else row["error"][:90]
                print(
                    f"E={e:<3} B={b:<3} L={lq:<6} causal={causal!s:5} {mode:6} {name:9} {shown}",
                    flush=True,
                )
        if on_gpu:
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (E, L, causal, mode): TFLOP/s per provider, and for triton and cuda the
    ratios to the fastest torch SDPA backend, to flex and to the run's matmul rate."""
    groups: dict[tuple, dict] = {}
    matmul = max((r["tflops"] for r in rows if r["mode"] == "matmul" and r.get("tflops")),
                 default=None)  # fmt: skip
    for r in rows:
        if r["mode"] == "matmul":
            continue
        key = (r["E"], r["L"], r["causal"], r["mode"])
        g = groups.setdefault(
            key,
            {"E": r["E"], "L": r["L"], "B": r["B"], "causal": r["causal"], "mode": r["mode"]},
        )
        g.setdefault("tflops", {})[r["provider"]] = r.get("tflops")
        if r.get("max_abs_diff") is not None and r.get("diff_against") != r["provider"]:
            g.setdefault("max_abs_diff", {})[r["provider"]] = r["max_abs_diff"]
    out = []
    for key in sorted(groups):
        g = groups[key]
        t = g["tflops"]
        torch_best = max(
            ((p, t[p]) for p in TORCH_SDPA if t.get(p)), key=lambda x: x[1], default=(None, None)
        )
        g["fastest_torch_sdpa"] = torch_best[0]
        g["matmul_tflops"] = matmul
        for p in OURS:
            ours = t.get(p)
            g[f"{p}_vs_fastest_torch_sdpa"] = (
                ours / torch_best[1] if ours and torch_best[1] else None
            )
            g[f"{p}_vs_flex"] = ours / t["flex"] if ours and t.get("flex") else None
            g[f"{p}_pct_of_matmul"] = 100.0 * ours / matmul if ours and matmul else None
        out.append(g)
    return out


def _diff_cell(g: dict) -> str:
    """Forward rows: the largest max|diff| against the first provider that served."""
    diffs = [d for d in g.get("max_abs_diff", {}).values() if d is not None]
    return f"{max(diffs):.1e}" if diffs else "-"


def _ratio(value: float | None, suffix: str = "x", digits: int = 2) -> str:
    return f"{value:.{digits}f}{suffix}" if value else "-"


def table(summary: list[dict]) -> str:
    ratio_heads = [f"{p}/sdpa" for p in OURS] + [f"{p}/flex" for p in OURS]
    ratio_heads += [f"{p}%mm" for p in OURS]
    head = (
        f"{'E':>3} {'L':>6} {'B':>3} {'causal':6} {'mode':6} "
        + " ".join(f"{p:>9}" for p in PROVIDERS)
        + " ".join(f" {h:>11}" for h in ratio_heads)
        + f" {'best sdpa':>9} {'max|diff|':>9}"
    )
    matmul = next((g["matmul_tflops"] for g in summary if g.get("matmul_tflops")), None)
    lines = [
        "TFLOP/s (- = not served or not measured); x/sdpa: against the fastest torch SDPA "
        "backend; x%mm: % of the bf16 matmul rate "
        + (f"({matmul:.1f} TFLOP/s)" if matmul else "(not measured)")
        + "; max|diff|: forward output against the first provider that served",
        head,
        "-" * len(head),
    ]
    for g in summary:
        cells = []
        for p in PROVIDERS:
            v = g["tflops"].get(p)
            cells.append(f"{v:9.1f}" if v else f"{'-':>9}")
        ratios = [_ratio(g[f"{p}_vs_fastest_torch_sdpa"]) for p in OURS]
        ratios += [_ratio(g[f"{p}_vs_flex"]) for p in OURS]
        ratios += [_ratio(g[f"{p}_pct_of_matmul"], "%", 1) for p in OURS]
        lines.append(
            f"{g['E']:>3} {g['L']:>6} {g['B']:>3} {g['causal']!s:6} {g['mode']:6} "
            + " ".join(cells)
            + "".join(f" {r:>11}" for r in ratios)
            + f" {g['fastest_torch_sdpa'] or '-':>9} {_diff_cell(g):>9}"
        )
    return "\n".join(lines)


def _read_jsonl(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            print(f"(no results file {p})")
            continue
        for line in p.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.report:
        rows = _read_jsonl(a.report)
    elif a.dry_run:
        with warnings.catch_warnings():  # flex_attention warns when run eagerly
            warnings.simplefilter("ignore")
            rows = run(a)
    else:
        rows = run(a)
    summary = summarize(rows)
    print(table(summary))
    if a.out and not a.report:
        Path(a.out, "bench_gpu.json").write_text(
            json.dumps({"rows": rows, "summary": summary}, indent=1)
        )
    elif a.out and a.report:
        Path(a.out, "bench_gpu_summary.json").write_text(
            json.dumps({"rows": rows, "summary": summary}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
