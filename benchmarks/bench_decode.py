#!/usr/bin/env python
"""One decoding step with a KV cache: aigc_ext's CPU kernel against torch's SDPA.

A decoding step attends a few new query rows (L <= 16) to a long cache of keys and values.
The CPU kernel serves it with its split-KV path: each task takes a whole GQA group of query
heads, so every cached key and value is read once per group, and long caches are split across
cores when batch x KV heads is small. Both implementations get the same inputs in the same
process, alternating call by call; the reported time is the median over ``--reps`` runs.

Defaults are the configuration the project tracks: B = 1, 32 query heads, 8 KV heads,
S = 8192, E = 128, L = 1, bf16 and fp32 (torch is called with ``enable_gqa=True``, as a
decoder would).

    python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py --seqs 1024 8192 32768 --lens 1 4 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import aigc_ext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seqs", type=int, nargs="+", default=[8192], help="cached keys S")
    p.add_argument("--lens", type=int, nargs="+", default=[1], help="new query rows L")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args()


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"aigc_ext {aigc_ext.__version__}: {aigc_ext.ops.cpu_kernel_config()}")
    print(
        f"B={a.batch} Hq={a.heads} Hkv={a.kv_heads} E={a.head_dim}, median of {a.reps} "
        "alternating runs\n"
    )
    head = f"{'dtype':5}  {'L':>3}  {'S':>6}  {'ours ms':>8}  {'torch ms':>8}  {'ours GB/s':>9}  {'speedup':>7}  {'max|diff|':>9}"
    print(head)
    print("-" * len(head))
    for name in a.dtypes:
        dt = DTYPES[name]
        for s in a.seqs:
            for lq in a.lens:
                g = torch.Generator().manual_seed(0)
                q = torch.randn(a.batch, a.heads, lq, a.head_dim, generator=g).to(dt)
                k = torch.randn(a.batch, a.kv_heads, s, a.head_dim, generator=g).to(dt)
                v = torch.randn(a.batch, a.kv_heads, s, a.head_dim, generator=g).to(dt)

                def ours(q=q, k=k, v=v):
                    with aigc_ext.use_backend("cpu"):
                        return aigc_ext.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                def theirs(q=q, k=k, v=v):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                diff = (ours().float() - theirs().float()).abs().max().item()
                t_ours, t_torch = [], []
                for _ in range(a.reps):
                    t0 = time.perf_counter()
                    ours()
                    t1 = time.perf_counter()
                    theirs()
                    t2 = time.perf_counter()
                    t_ours.append(t1 - t0)
                    t_torch.append(t2 - t1)
                mo, mt = statistics.median(t_ours), statistics.median(t_torch)
                kv_bytes = 2 * k.numel() * k.element_size()
                print(
                    f"{name:5}  {lq:>3}  {s:>6}  {mo * 1e3:8.2f}  {mt * 1e3:8.2f}  "
                    f"{kv_bytes / mo / 1e9:9.1f}  {mt / mo:6.2f}x  {diff:9.1e}"
                )


if __name__ == "__main__":
    main()
