"""Compiles the Triton kernels for a GPU architecture without a GPU (ahead of time, to cubin).

The interpreter checks what the kernels compute, not whether they compile: this check runs
Triton's real compiler (with its bundled ``ptxas``) for sm80 / sm90 on kernel variants that
cover every code path (dtypes, causal, mask modes, padded head dims), with the argument
specialisations a real launch gets (16-byte aligned pointers, unit head-dim strides, other
strides multiples of 16, sizes unspecialised). It also reports what the generated code uses:
shared memory, tensor core instructions (``wgmma`` on sm90, ``mma.sync`` on sm80) and
asynchronous copies (software pipelining), so a change that silently loses them shows up here.

    python -m aigc_ext.backends.triton.compile_check            # the quick variants, sm90
    python -m aigc_ext.backends.triton.compile_check --arch 80 90 --variants all
    python -m aigc_ext.backends.triton.compile_check --kernels flash   # only the flash kernels

The FlashAttention-contract kernels (:mod:`aigc_ext.backends.triton.flash_kernels`) have their
own variants (:data:`FLASH_VARIANTS`: layouts, windows, softcap, ALiBi, dropout, sinks, masks,
paged caches with and without per-row page lookups).

Needs ``TRITON_INTERPRET`` unset (it turns the kernels into interpreted functions).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass

__all__ = [
    "FLASH_VARIANTS",
    "VARIANTS",
    "CompileResult",
    "FlashVariant",
    "Variant",
    "compile_flash_variant",
    "compile_variant",
    "main",
]


@dataclass(frozen=True)
class Variant:
    """One specialisation of the three attention kernels."""

    name: str
    dtype: str  # "bf16", "fp16", "fp32"
    head_dim: int
    padded: bool  # head dim below its power-of-two block (masked loads on the head dim)
    causal: bool
    mask_mode: int  # 0 none, 1 key vector, 2 tiles
    mask_bool: bool
    # (BLOCK_M, BLOCK_N, num_warps, num_stages) of forward, dK/dV, dQ
    fwd: tuple[int, int, int, int] = (128, 64, 8, 3)
    dkdv: tuple[int, int, int, int] = (32, 128, 4, 3)
    dq: tuple[int, int, int, int] = (128, 32, 4, 3)


VARIANTS = {
    "quick": [
        Variant("bf16-causal-nomask-d128", "bf16", 128, False, True, 0, False),
        Variant(
            "fp16-d72-floatmask-causal",
            "fp16",
            128,
            True,
            True,
            2,
            False,
            fwd=(64, 64, 4, 3),
            dkdv=(32, 64, 4, 3),
            dq=(64, 64, 4, 3),
        ),
        Variant(
            "fp32-keypadding-d64",
            "fp32",
            64,
            False,
            False,
            1,
            True,
            fwd=(64, 32, 4, 2),
            dkdv=(32, 64, 4, 3),
            dq=(64, 32, 4, 2),
        ),
    ],
}
VARIANTS["all"] = [
    *VARIANTS["quick"],
    Variant("bf16-d64-full", "bf16", 64, False, False, 0, False, fwd=(128, 128, 8, 3)),
    Variant(
        "fp16-d256-causal",
        "fp16",
        256,
        False,
        True,
        0,
        False,
        fwd=(64, 32, 4, 2),
        dkdv=(32, 64, 4, 3),
        dq=(64, 32, 4, 2),
    ),
    Variant("bf16-boolmask-tiles", "bf16", 128, False, False, 2, True),
]


@dataclass(frozen=True)
class FlashVariant:
    """One specialisation of the FlashAttention-contract kernels (forward, dK/dV, dQ)."""

    name: str
    dtype: str  # "bf16", "fp16", "fp32"
    head_dim: int  # any value up to 256; padded to a power of two in the kernels
    varlen: bool = False
    page_size: int = 0  # > 0: a paged cache (forward only)
    leftpad: bool = False
    seqused: bool = False
    window_left: bool = False
    window_right: bool = False
    softcap: bool = False
    alibi: bool = False
    dropout: bool = False
    sinks: bool = False
    mask_mode: int = 0
    mask_bool: bool = False
    fwd: tuple[int, int, int, int] = (128, 64, 8, 3)
    dkdv: tuple[int, int, int, int] | None = (32, 128, 4, 3)  # None: no backward (KV cache)
    dq: tuple[int, int, int, int] | None = (128, 32, 4, 3)


FLASH_VARIANTS = {
    "quick": [
        FlashVariant("flash-bf16-causal-d128", "bf16", 128, window_right=True),
        FlashVariant(
            "flash-fp16-varlen-all-d72",
            "fp16",
            72,
            varlen=True,
            window_left=True,
            window_right=True,
            softcap=True,
            alibi=True,
            dropout=True,
            fwd=(64, 64, 4, 3),
            dkdv=(32, 64, 4, 3),
            dq=(64, 64, 4, 3),
        ),
        FlashVariant(
            "flash-bf16-paged64-decode",
            "bf16",
            128,
            page_size=64,
            seqused=True,
            window_right=True,
            fwd=(16, 64, 4, 3),
            dkdv=None,
            dq=None,
        ),
    ],
}
FLASH_VARIANTS["all"] = [
    *FLASH_VARIANTS["quick"],
    FlashVariant(
        "flash-fp16-paged16-leftpad",
        "fp16",
        64,
        page_size=16,
        seqused=True,
        leftpad=True,
        softcap=True,
        fwd=(64, 64, 4, 3),
        dkdv=None,
        dq=None,
    ),
    FlashVariant(
        "flash-fp32-sinks-mask-d64",
        "fp32",
        64,
        sinks=True,
        mask_mode=2,
        mask_bool=True,
        window_left=True,
        fwd=(64, 32, 4, 2),
        dkdv=(32, 64, 4, 3),
        dq=(64, 32, 4, 2),
    ),
    FlashVariant(
        "flash-bf16-d256-keymask",
        "bf16",
        256,
        mask_mode=1,
        dropout=True,
        fwd=(64, 32, 4, 2),
        dkdv=(32, 64, 4, 3),
        dq=(64, 32, 4, 2),
    ),
]


@dataclass
class CompileResult:
    variant: str
    kernel: str
    arch: int
    config: tuple[int, int, int, int]
    seconds: float
    shared_bytes: int
    wgmma: int
    mma_sync: int
    cp_async: int

    def row(self) -> str:
        bm, bn, w, s = self.config
        return (
            f"{self.variant:30} {self.kernel:5} sm{self.arch} {bm:>3}x{bn:<3} w{w} s{s}  "
            f"{self.seconds:5.1f}s  smem {self.shared_bytes // 1024:>3} KB  wgmma {self.wgmma:>3}  "
            f"mma.sync {self.mma_sync:>3}  cp.async {self.cp_async:>3}"
        )


def _source(fn, pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...]):
    """An ASTSource with a real launch's specialisations (see the module docstring)."""
    from triton.compiler import ASTSource

    signature, attrs, consts = {}, {}, dict(constexprs)
    aligned = [["tt.divisibility", 16]]
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d"):  # unit head-dim strides
            signature[name] = "constexpr"
            consts[name] = 1
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = aligned
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):  # sizes are not specialised (_NO_SPECIALIZE)
                attrs[(i,)] = aligned
    return ASTSource(fn, signature, constexprs=consts, attrs=attrs)


def _compile(variant_name, kernels, common, arch) -> list[CompileResult]:
    """Compiles ``(name, autotuned kernel, pointer types, float args, config)`` rows."""
    import triton
    from triton.backends.compiler import GPUTarget

    results = []
    for name, autotuned, pointers, floats, (bm, bn, warps, stages) in kernels:
        fn = autotuned.fn  # the JITFunction under the autotuner
        src = _source(fn, pointers, {**common, "BLOCK_M": bm, "BLOCK_N": bn}, floats)
        start = time.perf_counter()
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
        seconds = time.perf_counter() - start
        ptx = compiled.asm["ptx"]
        results.append(
            CompileResult(
                variant=variant_name,
                kernel=name,
                arch=arch,
                config=(bm, bn, warps, stages),
                seconds=seconds,
                shared_bytes=int(compiled.metadata.shared),
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                cp_async=len(re.findall(r"cp\.async\.c[ag]", ptx)),
            )
        )
    return results


def compile_flash_variant(variant: FlashVariant, arch: int) -> list[CompileResult]:
    """Compiles the flash forward and, unless it is a KV-cache variant, dK/dV and dQ kernels
    of ``variant`` for ``sm{arch}``."""
    import triton

    from aigc_ext.backends.triton import flash_kernels as FK
    from aigc_ext.backends.triton import kernels as K

    if K.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET is on: unset it to compile the kernels")
    v = variant
    dt = v.dtype
    block_d = max(16, triton.next_power_of_2(v.head_dim))
    features = {
        "E": v.head_dim,
        "EV": v.head_dim,
        "BLOCK_D": block_d,
        "BLOCK_DV": block_d,
        "EVEN_D": v.head_dim == block_d,
        "EVEN_DV": v.head_dim == block_d,
        "VARLEN": v.varlen,
        "PAGED": v.page_size > 0,
        "WINDOW_LEFT": v.window_left,
        "WINDOW_RIGHT": v.window_right,
        "SOFTCAP": v.softcap,
        "ALIBI": v.alibi,
        "DROPOUT": v.dropout,
        "MASK_MODE": v.mask_mode,
        "MASK_BOOL": v.mask_bool,
        "PRECISE": dt == "fp32",
        "UPCAST": False,
    }
    fwd_only = {
        "PAGE_SIZE": max(1, v.page_size),
        "HAS_SEQUSED": v.seqused,
        "HAS_LEFTPAD": v.leftpad,
        "HAS_KV_IDX": False,
        "SINKS_ON": v.sinks,
    }
    io = {
        "Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "LSE": "*fp32", "CU_Q": "*i32",
        "CU_K": "*i32", "SLOPES": "*fp32", "RNG": "*i64",
        "M": "*u8" if v.mask_bool else "*fp32",
    }  # fmt: skip
    floats = ("scale", "qk_scale", "softcap", "inv_softcap", "drop_scale")
    kernels = [
        (
            "fwd",
            FK.flash_fwd,
            {**io, "Out": f"*{dt}", "SEQUSED": "*i32", "LEFTPAD": "*i32", "KV_IDX": "*i32",
             "BLOCK_TABLE": "*i32", "SINKS": "*fp32"},
            floats,
            v.fwd,
        ),
    ]  # fmt: skip
    results = _compile(v.name, kernels, {**features, **fwd_only}, arch)
    bwd = {**io, "DO": f"*{dt}", "DELTA": "*fp32"}
    kernels = []
    if v.dkdv is not None:
        dkdv_ptrs = {**bwd, "DK": f"*{dt}", "DV": f"*{dt}"}
        kernels.append(("dkdv", FK.flash_bwd_dkdv, dkdv_ptrs, floats, v.dkdv))
    if v.dq is not None:
        kernels.append(("dq", FK.flash_bwd_dq, {**bwd, "DQ": f"*{dt}"}, floats, v.dq))
    return results + _compile(v.name, kernels, features, arch)


def compile_variant(variant: Variant, arch: int) -> list[CompileResult]:
    """Compiles the forward, dK/dV and dQ kernels of ``variant`` for ``sm{arch}``."""
    import triton

    from aigc_ext.backends.triton import kernels as K

    if K.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET is on: unset it to compile the kernels")
    dt = variant.dtype
    block_d = max(16, triton.next_power_of_2(variant.head_dim))
    mask_type = "*u8" if variant.mask_bool else "*fp32"
    common = {
        "BLOCK_D": block_d,
        "BLOCK_DV": block_d,
        "EVEN_D": not variant.padded,
        "EVEN_DV": not variant.padded,
        "IS_CAUSAL": variant.causal,
        "MASK_MODE": variant.mask_mode,
        "MASK_BOOL": variant.mask_bool,
        "PRECISE": dt == "fp32",
        "UPCAST": False,
    }
    io = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "M": mask_type}
    io.update(LSE="*fp32", DELTA="*fp32")
    kernels = [
        ("fwd", K.attn_fwd, {**io, "Out": f"*{dt}"}, ("qk_scale",), variant.fwd),
        (
            "dkdv",
            K.attn_bwd_dkdv,
            {**io, "DO": f"*{dt}", "DK": f"*{dt}", "DV": f"*{dt}"},
            ("scale", "qk_scale"),
            variant.dkdv,
        ),
        (
            "dq",
            K.attn_bwd_dq,
            {**io, "DO": f"*{dt}", "DQ": f"*{dt}"},
            ("scale", "qk_scale"),
            variant.dq,
        ),
    ]
    return _compile(variant.name, kernels, common, arch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities")
    p.add_argument("--variants", choices=sorted(VARIANTS), default="quick")
    p.add_argument(
        "--kernels",
        choices=("all", "attention", "flash"),
        default="all",
        help="the attention kernels (kernels.py), the FlashAttention-contract ones, or both",
    )
    args = p.parse_args(argv)
    jobs = []
    if args.kernels in ("all", "attention"):
        jobs += [(v, compile_variant) for v in VARIANTS[args.variants]]
    if args.kernels in ("all", "flash"):
        jobs += [(v, compile_flash_variant) for v in FLASH_VARIANTS[args.variants]]
    failures = 0
    for arch in args.arch:
        for variant, compile_fn in jobs:
            try:
                for r in compile_fn(variant, arch):
                    print(r.row(), flush=True)
            except Exception as exc:  # report every failing variant, then fail
                failures += 1
                print(f"{variant.name:30} sm{arch} FAILED: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
