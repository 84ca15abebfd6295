"""Shared test helpers: the device under test, input factories, the fp64 oracle and the error rule.

The error rule is FlashAttention's (:func:`aigc_ext.testing.check_error_rule`, which
``aigc-ext bench`` applies too): a fused kernel in a given dtype may be at most twice as far from
the float64 reference as PyTorch's own ``scaled_dot_product_attention`` in that dtype, plus a
small absolute slack::

    max|ours - ref_fp64| <= 2 * max|torch_same_dtype - ref_fp64| + 1e-5

``ref_fp64`` is :func:`aigc_ext.backends.reference.ops.sdpa_reference` run in float64 on the
same (rounded) inputs. ``torch_same_dtype`` is
``torch.nn.functional.scaled_dot_product_attention`` in the dtype under test, called on an
equivalent contiguous 4-D form of the problem so that torch serves it with its own fused kernel
(see :func:`_torch_canonical`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import aigc_ext
from aigc_ext.backends.reference.ops import sdpa_reference
from aigc_ext.testing import ERROR_ATOL, ERROR_FACTOR, check_error_rule
from aigc_ext.validation import validate_sdpa_args

# The device the fused backends are tested on ("cpu" unless set, e.g. "cuda").
DEVICE = os.environ.get("AIGC_EXT_TEST_DEVICE", "cpu")

FP64_ATOL = 1e-10  # float64: ours vs the float64 reference, absolute


def fused_backends(device: str = DEVICE) -> list[str]:
    """Names of the available fused (non-reference) backends that run on ``device``."""
    return [
        b.name
        for b in aigc_ext.backends()
        if b.available and b.name != "reference" and device in b.devices
    ]


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape, dtype=torch.float32, *, seed: int = 0) -> torch.Tensor:
    """Deterministic normal samples (drawn on the CPU in float32), moved to the device under test."""
    t = torch.randn(tuple(shape), generator=generator(seed), dtype=torch.float32)
    return t.to(device=DEVICE, dtype=dtype)


def make_qkv(
    b: int,
    hq: int,
    hkv: int,
    lq: int,
    lkv: int,
    e: int,
    ev: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev) inputs."""
    ev = e if ev is None else ev
    q = randn((b, hq, lq, e), dtype, seed=seed)
    k = randn((b, hkv, lkv, e), dtype, seed=seed + 1)
    v = randn((b, hkv, lkv, ev), dtype, seed=seed + 2)
    return q, k, v


def random_mask(shape, kind: str, dtype: torch.dtype, *, seed: int = 0, p_keep: float = 0.7):
    """A bool mask (True = takes part) or a float mask (random values, some -inf) of ``shape``."""
    keep = torch.rand(tuple(shape), generator=generator(seed)) < p_keep
    if kind == "bool":
        return keep.to(DEVICE)
    if kind == "float":
        bias = torch.randn(tuple(shape), generator=generator(seed + 1))
        bias = bias.masked_fill(~keep, float("-inf"))
        return bias.to(device=DEVICE, dtype=dtype)
    raise ValueError(kind)


def causal_keep(lq: int, lkv: int) -> torch.Tensor:
    """(L, S) bool: key j is visible to query i when j <= i (top-left aligned)."""
    return torch.ones(lq, lkv, dtype=torch.bool, device=DEVICE).tril()


def fold_causal(attn_mask: torch.Tensor | None, lq: int, lkv: int):
    """One mask equivalent to ``attn_mask`` combined with ``is_causal`` (torch takes only one)."""
    keep = causal_keep(lq, lkv)
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    hidden = torch.zeros(lq, lkv, dtype=attn_mask.dtype, device=DEVICE).masked_fill(
        ~keep, float("-inf")
    )
    return attn_mask + hidden


def max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def assert_error_rule(
    name: str,
    ours: torch.Tensor,
    ref64: torch.Tensor,
    baseline: torch.Tensor,
    *,
    atol: float = ERROR_ATOL,
    factor: float = ERROR_FACTOR,
) -> None:
    """``max|ours - ref64| <= factor * max|baseline - ref64| + atol`` (FlashAttention's rule).

    The rule is :func:`aigc_ext.testing.check_error_rule`; this raises ``AssertionError`` with
    the numbers when it fails. ``baseline`` is PyTorch's own result in the dtype under test;
    entries where it is not finite are left out of its error (ours must still be finite
    wherever the reference is).
    """
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == baseline.dtype, f"{name}: dtype {ours.dtype} != {baseline.dtype}"
    r = ref64.detach().to(torch.float64)
    finite = torch.isfinite(r)
    bad = finite & ~torch.isfinite(ours.detach())
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} non-finite values where the reference is finite"
    )
    result = check_error_rule(ours, r, baseline, factor=factor, atol=atol)
    # A large torch error would make the rule vacuous: it means the yardstick is broken.
    scale = max(1.0, max_abs(r[finite]))
    assert result.baseline_error <= 2**-4 * scale, (
        f"{name}: torch's own error {result.baseline_error:.3e} is implausibly large "
        f"(reference max {scale:.3e})"
    )
    assert result.ok, result.describe(name)


def assert_fp64_close(name: str, ours: torch.Tensor, ref64: torch.Tensor, atol: float = FP64_ATOL):
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    err = max_abs(ours.detach().double() - ref64.detach().double())
    assert err <= atol, f"{name}: max|ours - ref_fp64| = {err:.3e} > {atol:.1e}"


@dataclass
class Result:
    out: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]


def _sdpa_kwargs(attn_mask, is_causal, scale, enable_gqa):
    return {
        "attn_mask": attn_mask,
        "is_causal": is_causal,
        "scale": scale,
        "enable_gqa": enable_gqa,
    }


def _run(fn, inputs, grad_out, kwargs) -> Result:
    out = fn(*inputs, **kwargs)
    if grad_out is None:
        return Result(out.detach(), (None, None, None))
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return Result(out.detach(), tuple(grads))


def skip_if_declined(backend: str, q, k, v, **kwargs) -> None:
    """Skips the test when ``backend`` declares the call unsupported (its ``unsupported_reason``).

    Backends cover different feature sets (the triton backend declines float64 and head dims
    above 256, for example); a declined call is the dispatcher's fallback, not a failure of the
    backend. Invalid arguments are left for the call itself to reject.
    """
    try:
        call = validate_sdpa_args(
            q,
            k,
            v,
            kwargs.get("attn_mask"),
            kwargs.get("dropout_p", 0.0),
            kwargs.get("is_causal", False),
            kwargs.get("scale"),
            kwargs.get("enable_gqa", False),
        )
    except (TypeError, ValueError):
        return
    with aigc_ext.use_backend(backend) as chosen:  # asked as the forced backend it will be
        reason = chosen.why_unsupported(call)
    if reason is not None:
        pytest.skip(f"backend {backend!r} declines this call: {reason}")


def run_ours(backend: str, q, k, v, *, grad_out=None, **kwargs) -> Result:
    """Our public API under ``use_backend(backend)``; grads w.r.t. q, k, v when ``grad_out``.

    Skips the test when the backend declines the call (see :func:`skip_if_declined`).
    """
    skip_if_declined(backend, q, k, v, **kwargs)
    leaves = [t.detach().requires_grad_(grad_out is not None) for t in (q, k, v)]
    with aigc_ext.use_backend(backend):
        return _run(aigc_ext.scaled_dot_product_attention, leaves, grad_out, kwargs)


def run_reference64(q, k, v, *, grad_out=None, attn_mask=None, **kwargs) -> Result:
    """Our reference in float64 on the same (already rounded) inputs."""
    leaves = [t.detach().to(torch.float64).requires_grad_(grad_out is not None) for t in (q, k, v)]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(torch.float64)
    return _run(sdpa_reference, leaves, grad_out, {"attn_mask": attn_mask, **kwargs})


def _torch_canonical(q, k, v, attn_mask, enable_gqa):
    """The same problem as contiguous 4-D tensors with one head dim for q, k and v.

    torch's ``scaled_dot_product_attention`` serves that form with its fused kernel; for other
    forms (2-D, 3-D, 5-D, strided views, ``Ev != E``, a 1-D or 3-D mask) it takes its math
    path, which on the CPU computes reduced dtypes in float32 and so is no same-dtype yardstick.
    Zero columns appended to q and k leave the scores unchanged; those appended to v are cut
    from the output.
    Returns (q4, k4, v4, mask4, enable_gqa, restore) where ``restore`` maps the output back.
    """
    lead, lq, lkv = tuple(q.shape[:-2]), q.shape[-2], k.shape[-2]
    e, ev = q.shape[-1], v.shape[-1]
    if q.dim() == 4:
        q4 = q
        k4 = k.expand(q.shape[0], *k.shape[1:])
        v4 = v.expand(q.shape[0], *v.shape[1:])
        mask4 = attn_mask
        if attn_mask is not None and attn_mask.dim() < 4:  # torch's fused kernel wants 2-D or 4-D
            mask4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    else:
        # Leading dims: all but the last flattened into the batch, the last (dim -3, which
        # enable_gqa groups) kept as the heads; 2-D inputs get one of each.
        heads, kv_heads = (lead[-1], k.shape[-3]) if lead else (1, 1)
        kv_lead = (*lead[:-1], kv_heads) if lead else ()
        q4 = q.reshape(-1, heads, lq, e)
        k4 = k.expand(*kv_lead, lkv, e).reshape(-1, kv_heads, lkv, e)
        v4 = v.expand(*kv_lead, lkv, ev).reshape(-1, kv_heads, lkv, ev)
        mask4 = None
        if attn_mask is not None:
            mask4 = attn_mask.expand(*lead, lq, lkv).reshape(q4.shape[0], q4.shape[1], lq, lkv)
    gqa = enable_gqa or k4.shape[1] != q4.shape[1]
    width = max(e, ev)
    q4, k4 = (F.pad(t.contiguous(), (0, width - e)) for t in (q4, k4))
    v4 = F.pad(v4.contiguous(), (0, width - ev))

    def restore(out):
        return out[..., :ev].reshape(*lead, lq, ev)

    return q4, k4, v4, mask4, gqa, restore


def run_torch(
    q, k, v, *, grad_out=None, attn_mask=None, is_causal=False, scale=None, enable_gqa=False
) -> Result:
    """PyTorch's ``scaled_dot_product_attention`` in the input dtype, on the canonical form
    of the problem (see :func:`_torch_canonical`); a mask and ``is_causal`` are folded into one
    mask, as torch takes only one of them."""
    leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v)]
    if is_causal and attn_mask is not None:
        attn_mask, is_causal = fold_causal(attn_mask, q.shape[-2], k.shape[-2]), False
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])

    def fn(q, k, v):
        q4, k4, v4, mask4, gqa, restore = _torch_canonical(q, k, v, attn_mask, enable_gqa)
        out = F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=mask4, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
        return restore(out)

    return _run(fn, leaves, grad_out, {})


def check_sdpa(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    backward: bool = True,
    atol: float = ERROR_ATOL,
    factor: float = ERROR_FACTOR,
    seed: int = 1234,
) -> tuple[Result, Result]:
    """Checks output (and dq, dk, dv) of ``backend`` against the fp64 reference.

    Reduced and single precision use the error rule against torch in the same dtype (``factor``
    times torch's error plus ``atol``); float64 an absolute tolerance. Returns (ours, reference)
    for further checks.
    """
    kwargs = _sdpa_kwargs(attn_mask, is_causal, scale, enable_gqa)
    out_shape = (*q.shape[:-1], v.shape[-1])
    grad_out = randn(out_shape, q.dtype, seed=seed) if backward else None
    ours = run_ours(backend, q, k, v, grad_out=grad_out, **kwargs)
    ref = run_reference64(q, k, v, grad_out=grad_out, **kwargs)
    names = ("out", "dq", "dk", "dv")
    pairs = list(zip(names, (ours.out, *ours.grads), (ref.out, *ref.grads), strict=True))
    if q.dtype == torch.float64:
        for name, a, r in pairs:
            if r is not None:
                assert_fp64_close(name, a, r)
        return ours, ref
    base = run_torch(q, k, v, grad_out=grad_out, **kwargs)
    for (name, a, r), b in zip(pairs, (base.out, *base.grads), strict=True):
        if r is not None:
            assert_error_rule(name, a, r, b, atol=atol, factor=factor)
    return ours, ref


def scores64(q, k, attn_mask=None, is_causal=False, scale=None) -> torch.Tensor:
    """Scaled, masked fp64 scores (B, Hq, L, S) of 4-D inputs; -inf where a key is hidden."""
    q64, k64 = q.detach().double(), k.detach().double()
    if k64.shape[1] != q64.shape[1]:
        k64 = k64.repeat_interleave(q64.shape[1] // k64.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q64 @ k64.transpose(-2, -1) * scale
    if is_causal:
        s = s.masked_fill(~causal_keep(q.shape[-2], k.shape[-2]), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.double()
    return s


@contextlib.contextmanager
def cpu_kernel(
    isa: str | None = None,
    use_brgemm: bool | None = None,
    use_amx: bool | None = None,
    use_avx512_bf16: bool | str | None = None,
) -> Iterator[str]:
    """Sets the CPU kernel configuration for the block; restores auto ISA, brgemm, AMX and the
    vdpbf16ps micro-kernel after."""
    from aigc_ext import ops

    try:
        yield ops.cpu_kernel_config(
            isa=isa, use_brgemm=use_brgemm, use_amx=use_amx, use_avx512_bf16=use_avx512_bf16
        )
    finally:
        ops.cpu_kernel_config(isa="auto", use_brgemm=True, use_amx=True, use_avx512_bf16="auto")


@contextlib.contextmanager
def cpu_isa(isa: str, **settings) -> Iterator[str]:
    """``cpu_kernel(isa=isa, **settings)`` for the block, skipping the test where that build is
    not compiled in or the CPU lacks it; checks that the configuration report names the ISA."""
    if not cpu_isa_supported(isa):
        pytest.skip(f"CPU ISA {isa} not compiled in or not supported here")
    with cpu_kernel(isa=isa, **settings) as config:
        assert f"isa={isa}" in config
        yield config


def cpu_isa_supported(isa: str) -> bool:
    from aigc_ext import ops

    try:
        ops.cpu_kernel_config(isa=isa)
    except RuntimeError:
        return False
    finally:
        ops.cpu_kernel_config(isa="auto")
    return True
