"""The implementations a benchmark compares, behind one interface.

* every registered aigc_ext backend (built-in and from plugins), called through
  ``aigc_ext.scaled_dot_product_attention`` under ``aigc_ext.use_backend(name)``;
* torch's SDPA backends ``torch-math``, ``torch-flash``, ``torch-efficient`` and ``torch-cudnn``,
  each forced with ``torch.nn.attention.sdpa_kernel``;
* ``torch-flex``: FlexAttention under ``torch.compile`` (compile time is not timed; the total
  is bounded by ``BenchConfig.flex_compile_budget_s``);
* ``flash-attn`` and ``xformers`` when those packages are installed.

An :class:`Impl` says once whether it can run on the device at all (``unavailable``); for each
row, ``build(problem)`` returns the attention function or raises :class:`Skip` with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import aigc_ext
from aigc_ext import dispatch
from aigc_ext.bench.problem import Problem
from aigc_ext.validation import validate_sdpa_args

__all__ = ["CompileBudget", "Impl", "Skip", "available_impls", "known_names"]

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Row order in reports: aigc_ext backends first, then torch's, then third-party libraries.
KINDS = ("aigc_ext", "torch-sdpa", "flex", "external")
TORCH_SDPA = {
    "torch-math": "MATH",
    "torch-flash": "FLASH_ATTENTION",
    "torch-efficient": "EFFICIENT_ATTENTION",
    "torch-cudnn": "CUDNN_ATTENTION",
}
CUDA_ONLY_SDPA = ("torch-efficient", "torch-cudnn")
EXTERNAL = {"flash-attn": "flash_attn", "xformers": "xformers"}


class Skip(Exception):
    """An implementation cannot serve a row; the message is the reason shown."""


@dataclass
class CompileBudget:
    """Seconds an implementation may spend compiling in one run, and how many it has spent."""

    limit: float
    spent: float = 0.0


@dataclass
class Impl:
    name: str
    kind: str  # one of KINDS
    unavailable: str | None  # why it cannot run on this device at all; None when it can
    build: Callable[[Problem], AttnFn]  # raises Skip for a row it cannot serve
    # Set for implementations whose first call per row compiles: that call is timed
    # separately (never part of the results) and charged to this budget.
    compile_budget: CompileBudget | None = None


def _device_type(device: str) -> str:
    return torch.device(device).type


# ----------------------------------------------------------------------------- aigc_ext backends


def _aigc_impl(info: aigc_ext.BackendInfo, device_type: str) -> Impl:
    name = info.name
    unavailable = None
    if not info.available:
        unavailable = info.reason or "unavailable"
    elif device_type not in info.devices:
        unavailable = f"runs on {', '.join(info.devices)}, not {device_type}"

    def build(p: Problem) -> AttnFn:
        backend = dispatch.get_backend(name)
        kwargs = p.sdpa_kwargs()
        with aigc_ext.use_backend(name):  # some backends answer differently when forced
            call = validate_sdpa_args(p.query, p.key, p.value, dropout_p=0.0, **kwargs)
            reason = backend.why_unsupported(call)
        if reason is not None:
            raise Skip(reason)

        def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with aigc_ext.use_backend(name):
                return aigc_ext.scaled_dot_product_attention(q, k, v, **kwargs)

        return attn

    return Impl(name, "aigc_ext", unavailable, build)


# ----------------------------------------------------------------------------- torch SDPA


def _sdpa_impl(name: str, device_type: str) -> Impl:
    from torch.nn.attention import SDPBackend

    backend = getattr(SDPBackend, TORCH_SDPA[name])
    unavailable = None
    if name in CUDA_ONLY_SDPA and device_type != "cuda":
        unavailable = f"CUDA only: torch has no {device_type} kernel for this SDPA backend"

    def build(p: Problem) -> AttnFn:
        from torch.nn.attention import sdpa_kernel

        mask, causal = p.folded_mask()  # torch refuses attn_mask together with is_causal

        def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal, scale=p.scale, enable_gqa=p.gqa
                )

        return attn

    return Impl(name, "torch-sdpa", unavailable, build)


# ----------------------------------------------------------------------------- FlexAttention


def _flex_impl(device_type: str, budget: CompileBudget) -> Impl:
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError as exc:  # pragma: no cover - torch < 2.5
        return Impl("torch-flex", "flex", f"torch.nn.attention.flex_attention: {exc}", _no_build)

    def build(p: Problem) -> AttnFn:
        if budget.limit <= 0:
            raise Skip("no torch.compile budget for FlexAttention (set --flex-compile-budget)")
        if device_type == "cpu" and p.case.backward:
            raise Skip("FlexAttention has no backward on the CPU in this torch")
        if budget.spent >= budget.limit:
            raise Skip(
                f"torch.compile budget for FlexAttention spent ({budget.spent:.0f} s of "
                f"{budget.limit:.0f} s; raise it with --flex-compile-budget)"
            )
        mods, batch, heads = [], None, None
        if p.causal:
            mods.append(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
        if p.case.mask == "padding":
            lengths, batch = p.lengths, p.case.batch
            mods.append(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b])
        elif p.case.mask == "arbitrary":
            mask, heads = p.mask, p.case.heads
            mods.append(lambda b, h, q_idx, kv_idx: mask[0, h, q_idx, kv_idx])
        block_mask = None
        if mods:
            mask_mod = flex.and_masks(*mods) if len(mods) > 1 else mods[0]
            block_mask = flex.create_block_mask(
                mask_mod, batch, heads, p.case.seq_q, p.case.seq_kv, device=p.device
            )
        torch._dynamo.reset()  # one compiled graph per row: no recompilation limit to hit
        compiled = torch.compile(flex.flex_attention, dynamic=False, fullgraph=True)

        def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return compiled(q, k, v, block_mask=block_mask, scale=p.scale, enable_gqa=p.gqa)

        return attn

    return Impl("torch-flex", "flex", None, build, compile_budget=budget)


def _no_build(p: Problem) -> AttnFn:
    raise Skip("unavailable")


# ----------------------------------------------------------------------------- flash-attn, xformers


def _flash_attn_build(p: Problem) -> AttnFn:
    if p.case.dtype not in ("fp16", "bf16"):
        raise Skip("flash-attn supports fp16 and bf16 only")
    if p.case.mask != "none":
        raise Skip("flash-attn takes no attention mask (key padding needs its varlen API)")
    if p.causal and p.case.seq_q != p.case.seq_kv:
        raise Skip("flash-attn aligns causal masks bottom-right; torch's are top-left when L != S")
    if p.case.head_dim != p.case.head_dim_v:
        raise Skip("flash-attn needs equal query/key and value head dims")
    from flash_attn import flash_attn_func

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # flash-attn's layout is (B, L, H, E): transposed views, no copies.
        out = flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            softmax_scale=p.scale,
            causal=p.causal,
        )
        return out.transpose(1, 2)

    return attn


def _xformers_build(p: Problem) -> AttnFn:
    if p.case.mask != "none":
        raise Skip("only causal or no masks are wired for xformers in this benchmark")
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if p.causal else None  # top-left aligned, as torch
    b, h, kv = p.case.batch, p.case.heads, p.case.kv_heads

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # xformers' layout is (B, L, H, E); grouped-query attention as (B, L, G, H/G, E).
        qx, kx, vx = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv != h:
            qx = qx.unflatten(2, (kv, h // kv))
            kx = kx.unsqueeze(3).expand(b, -1, kv, h // kv, -1)
            vx = vx.unsqueeze(3).expand(b, -1, kv, h // kv, -1)
        out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=p.scale)
        if kv != h:
            out = out.flatten(2, 3)
        return out.transpose(1, 2)

    return attn


def _external_impl(name: str, device_type: str) -> Impl:
    module = EXTERNAL[name]
    build = _flash_attn_build if name == "flash-attn" else _xformers_build
    if importlib.util.find_spec(module) is None:
        unavailable = f"not installed (pip package {name})"
    elif device_type != "cuda":
        unavailable = f"CUDA only, not {device_type}"
    else:
        unavailable = None
    return Impl(name, "external", unavailable, build)


# ----------------------------------------------------------------------------- the list


def known_names() -> list[str]:
    """Every implementation name the benchmark knows, aigc_ext backends first."""
    return [b.name for b in aigc_ext.backends()] + [*TORCH_SDPA, "torch-flex", *EXTERNAL]


def available_impls(device: str, flex_compile_budget_s: float = 120.0) -> list[Impl]:
    """Every implementation, in report order, with whether it can run on ``device``."""
    device_type = _device_type(device)
    impls = [_aigc_impl(info, device_type) for info in aigc_ext.backends()]
    impls += [_sdpa_impl(name, device_type) for name in TORCH_SDPA]
    impls.append(_flex_impl(device_type, CompileBudget(flex_compile_budget_s)))
    impls += [_external_impl(name, device_type) for name in EXTERNAL]
    return impls
