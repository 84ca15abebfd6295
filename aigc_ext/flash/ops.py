"""The FlashAttention operators: fake kernels, autograd, and :func:`flash_attention`.

Every fused backend implements the contract's two operators (``docs/flash-contract.md``)::

    cpu        torch.ops.aigc_ext.flash_forward / flash_backward               (C++, csrc/)
    triton     torch.ops.aigc_ext.triton_flash_forward / triton_flash_backward
    reference  torch.ops.aigc_ext.flash_reference_forward / _backward          (defined here)

The reference pair wraps :mod:`aigc_ext.flash.reference` as opaque ``custom_op`` operators, so
that it traces under ``torch.compile`` like the kernels. :func:`register_flash_operator` gives
a pair its fake kernels (which run :mod:`aigc_ext.flash.checks` and describe the outputs) and
its autograd (the backward operator for q, k and v; the sinks' gradient in Python from ``lse``
and ``rowsum(dO * O)``); it is called here for every pair that exists, and is idempotent, so a
backend module defining its operators later calls it once for them.

:func:`flash_attention` is the entry point over the operators: it validates the arguments
(values too, for CPU tensors), picks the operator by device (CPU: ``cpu``; CUDA: ``triton``)
or by name, and draws a fresh ``rng_state`` for dropout when none is given.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from aigc_ext import _C  # noqa: F401  (loads the compiled operators, when built with them)
from aigc_ext.flash import reference
from aigc_ext.flash.checks import FlashArgumentError, check_flash_backward, check_flash_forward
from aigc_ext.utils import warn_once

__all__ = [
    "BACKEND_OPERATORS",
    "BACKWARD_SCHEMA",
    "FORWARD_SCHEMA",
    "available_flash_backends",
    "flash_attention",
    "new_rng_state",
    "register_flash_operator",
    "run_flash_operator",
]

FORWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
    "int max_seqlen_q=0, int max_seqlen_k=0, Tensor? seqused_k=None, Tensor? leftpad_k=None, "
    "Tensor? kv_batch_idx=None, Tensor? block_table=None, float scale=1.0, bool causal=False, "
    "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, "
    "float dropout_p=0.0, Tensor? rng_state=None, Tensor? sinks=None, int num_splits=0, "
    "Tensor? attn_mask=None) -> (Tensor out, Tensor lse)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, "
    "int max_seqlen_k=0, float scale=1.0, bool causal=False, int window_left=-1, "
    "int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, float dropout_p=0.0, "
    "Tensor? rng_state=None, Tensor? attn_mask=None) -> (Tensor grad_q, Tensor grad_k, "
    "Tensor grad_v)"
)

# backend name -> (forward, backward) operator names in the aigc_ext namespace
BACKEND_OPERATORS: dict[str, tuple[str, str]] = {
    "cpu": ("flash_forward", "flash_backward"),
    "triton": ("triton_flash_forward", "triton_flash_backward"),
    "cuda": ("flash_forward", "flash_backward"),  # the C++ operators' CUDA kernels
    "reference": ("flash_reference_forward", "flash_reference_backward"),
}
_TRITON_MODULE = "aigc_ext.backends.triton.flash_ops"  # defines the triton pair when imported

# positions in the forward schema
_SEQUSED, _LEFTPAD, _KV_BATCH, _BLOCK_TABLE, _SINKS, _MASK = 7, 8, 9, 10, 19, 21

_registered: set[str] = set()
_warned: set = set()


def _qualname(name: str) -> str:
    return f"aigc_ext::{name}"


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aigc_ext, name)


def _fake_forward(q, k, v, *args):
    layout = check_flash_forward(q, k, v, *args, check_values=False)
    out = q.new_empty(layout.out_shape)
    return out, q.new_empty(layout.lse_shape, dtype=layout.lse_dtype)


def _fake_backward(grad_out, q, k, v, out, lse, *args):
    check_flash_backward(grad_out, q, k, v, out, lse, *args, check_values=False)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _sinks_grad(sinks, grad_out, out, lse, varlen: bool) -> torch.Tensor:
    """``d sinks[h] = -sum_i exp(sinks[h] - lse_hi) * rowsum(dO_i * O_i)`` (the contract's
    formula), in float32 (float64 for float64 inputs); rows with ``lse = -inf`` (past the
    packed sequences) contribute nothing."""
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # (B, L, H) or (T, H)
    delta = delta.transpose(-1, -2)  # the lse layout: (B, H, L) or (H, T)
    shape = (-1, 1) if varlen else (1, -1, 1)
    weight = torch.exp(sinks.to(lse.dtype).view(shape) - lse)
    weight = torch.where(torch.isfinite(lse), weight, torch.zeros_like(weight))
    grad = -(weight * delta).sum(dim=1 if varlen else (0, 2))
    return grad.to(sinks.dtype)


def register_flash_operator(forward: str, backward: str) -> None:
    """Gives ``aigc_ext::<forward>`` / ``aigc_ext::<backward>`` (operators with the contract's
    schemas) fake kernels and the autograd of the forward through the backward.

    The fake kernels run the checks (shapes, not values) and return the contract's output
    shapes, contiguous; an operator defined in C++ with a Meta kernel, or with a fake
    registered through ``torch.library``, keeps it. The autograd saves
    q, k, v, out, lse and the options, calls the backward operator for q, k and v (``grad_out``
    made contiguous) and computes the sinks' gradient itself; the KV-cache forms (``seqused_k``,
    ``leftpad_k``, ``kv_batch_idx``, ``block_table``) have no backward, as in FlashAttention,
    and raise :class:`~aigc_ext.flash.checks.FlashArgumentError` if one is asked for.
    Registering the same pair again does nothing.
    """
    if forward in _registered:
        return
    for name, fake in ((forward, _fake_forward), (backward, _fake_backward)):
        try:
            torch.library.register_fake(_qualname(name), fake)
        except RuntimeError as exc:  # a C++ Meta kernel or a fake registered earlier: kept
            if "already has" not in str(exc):
                raise

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, cu_q, cu_k, max_q, max_k = inputs[:7]
        out, lse = output
        sinks = inputs[_SINKS]
        ctx.kv_cache = [
            name
            for name, i in (
                ("seqused_k", _SEQUSED),
                ("leftpad_k", _LEFTPAD),
                ("kv_batch_idx", _KV_BATCH),
                ("block_table", _BLOCK_TABLE),
            )
            if inputs[i] is not None
        ]
        alibi, rng = inputs[16], inputs[18]
        mask = inputs[_MASK] if len(inputs) > _MASK else None
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, rng, sinks, mask)
        ctx.options = (max_q, max_k, *inputs[11:16])  # scale .. softcap
        ctx.dropout_p = inputs[17]
        ctx.mark_non_differentiable(lse)

    def backward_fn(ctx, grad_out, _grad_lse):
        if ctx.kv_cache:
            raise FlashArgumentError(
                f"{forward}: no backward for the KV-cache forms (given: "
                f"{', '.join(ctx.kv_cache)}); they are inference only, as in FlashAttention"
            )
        q, k, v, out, lse, cu_q, cu_k, alibi, rng, sinks, mask = ctx.saved_tensors
        max_q, max_k, scale, causal, left, right, softcap = ctx.options
        grad_out = grad_out.contiguous()
        backward_op = getattr(torch.ops.aigc_ext, backward)
        masked = {} if mask is None else {"attn_mask": mask}  # a schema without it: no mask
        dq, dk, dv = backward_op(
            grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, left, right,
            softcap, alibi, ctx.dropout_p, rng, **masked,
        )  # fmt: skip
        grads: list[Any] = [dq, dk, dv] + [None] * (ctx.n_inputs - 3)
        if sinks is not None and ctx.needs_input_grad[_SINKS]:
            grads[_SINKS] = _sinks_grad(sinks, grad_out, out, lse, cu_q is not None)
        return tuple(grads)

    torch.library.register_autograd(_qualname(forward), backward_fn, setup_context=setup_context)
    _registered.add(forward)


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """float16/bfloat16 tensors in float32: the reference operators accumulate in float32, as
    the kernels do."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def _define_reference_operators() -> None:
    """``aigc_ext::flash_reference_forward`` / ``_backward``: the reference as operators,
    computing in float32 for float16/bfloat16 inputs (float32 and float64 as they are)."""
    forward, backward = BACKEND_OPERATORS["reference"]
    if _has_op(forward):
        return

    def forward_impl(q, k, v, *args):
        with torch.no_grad():
            out, lse = reference.flash_reference(*_upcast(q, k, v), *args)
        return out.to(q.dtype).contiguous(), lse.contiguous()

    def backward_impl(grad_out, q, k, v, out, lse, *args):
        with torch.no_grad():
            grads = reference.flash_reference_backward(*_upcast(grad_out, q, k, v, out), lse, *args)
        return tuple(g.to(q.dtype).contiguous() for g in grads)

    torch.library.custom_op(
        _qualname(forward), forward_impl, mutates_args=(), schema=FORWARD_SCHEMA
    )
    torch.library.custom_op(
        _qualname(backward), backward_impl, mutates_args=(), schema=BACKWARD_SCHEMA
    )


def _register_existing() -> None:
    for forward, backward in BACKEND_OPERATORS.values():
        if _has_op(forward) and _has_op(backward):
            register_flash_operator(forward, backward)


_define_reference_operators()
_register_existing()
# Read once here: under torch.compile, module constants cost no guard on torch.ops.
_HAS_CPU_OPERATORS = _has_op("flash_forward") and _has_op("flash_backward")


def _load_triton() -> None:
    """Imports the Triton operators (which needs triton) and registers them."""
    forward, backward = BACKEND_OPERATORS["triton"]
    if not _has_op(forward):
        try:
            importlib.import_module(_TRITON_MODULE)
        except ImportError as exc:
            raise FlashArgumentError(
                f"flash_attention: backend 'triton' is not available here ({exc})"
            ) from exc
    if not _has_op(forward):
        raise FlashArgumentError(f"flash_attention: {_TRITON_MODULE} defines no {forward}")
    register_flash_operator(forward, backward)


def _has_cuda_kernels() -> bool:
    """Whether ``flash_forward`` / ``flash_backward`` have CUDA kernels (AIGC_EXT_WITH_CUDA=1)."""
    forward, backward = BACKEND_OPERATORS["cuda"]
    return all(
        _has_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(_qualname(name), "CUDA")
        for name in (forward, backward)
    )


def available_flash_backends() -> list[str]:
    """The backends whose operators exist in this process (``triton`` once it is loaded,
    ``cuda`` in builds with CUDA kernels)."""
    return [
        name
        for name, (fwd, bwd) in BACKEND_OPERATORS.items()
        if _has_op(fwd) and _has_op(bwd) and (name != "cuda" or _has_cuda_kernels())
    ]


def _operator(device_type: str, backend: str | None):
    """The forward operator serving a call on ``device_type`` (or the one named)."""
    if backend is None:
        if device_type == "cuda":
            backend = "triton"
        elif _HAS_CPU_OPERATORS:
            backend = "cpu"
        else:
            if not torch.compiler.is_compiling():
                warn_once(
                    "aigc_ext.flash: the C++ flash_forward operator is not in this build; "
                    "the plain PyTorch reference serves the call",
                    key="no-cpu-flash",
                    seen=_warned,
                    stacklevel=4,
                )
            backend = "reference"
    if backend not in BACKEND_OPERATORS:
        raise FlashArgumentError(
            f"flash_attention: unknown backend {backend!r}; expected one of "
            f"{', '.join(BACKEND_OPERATORS)} or None"
        )
    if backend == "triton":
        _load_triton()
    elif backend == "cpu" and not _HAS_CPU_OPERATORS:
        raise FlashArgumentError(
            "flash_attention: backend 'cpu' needs torch.ops.aigc_ext.flash_forward, which this "
            "build of aigc_ext._C does not define"
        )
    elif backend == "cuda" and not _has_cuda_kernels():
        raise FlashArgumentError(
            "flash_attention: backend 'cuda' needs the CUDA kernels of "
            "torch.ops.aigc_ext.flash_forward / flash_backward; this build of aigc_ext._C has "
            "none (build with AIGC_EXT_WITH_CUDA=1)"
        )
    return getattr(torch.ops.aigc_ext, BACKEND_OPERATORS[backend][0])


def _last_dim_contiguous(t):
    """``t`` with a contiguous last dim (a copy only when it is not), as FlashAttention does."""
    if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def new_rng_state() -> torch.Tensor:
    """A fresh ``[seed, offset]`` (int64, CPU) from torch's default generator, so dropout is
    reproducible under ``torch.manual_seed``."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    seqused_k: torch.Tensor | None = None,
    leftpad_k: torch.Tensor | None = None,
    kv_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int = 0,
    attn_mask: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention by the FlashAttention contract: ``(out, lse)`` in the contract's layouts.

    The arguments are the operators' (``docs/flash-contract.md``), except that ``scale``
    defaults to ``D ** -0.5``, that ``dropout_p > 0`` without ``rng_state`` draws a fresh one
    (:func:`new_rng_state`) and that q, k, v whose last dim is strided are copied first. ``backend``: ``None`` picks by device (CPU tensors: the C++
    operator, or the reference with a one-time warning where the build lacks it; CUDA: the
    Triton operator), or ``"cpu"``, ``"triton"`` (on CPU tensors under ``TRITON_INTERPRET=1``),
    ``"cuda"`` (the CUDA C++ kernels, CUDA tensors, builds with ``AIGC_EXT_WITH_CUDA=1``),
    ``"reference"``. Differentiable in q, k, v and sinks except for the KV-cache forms.
    """
    if scale is None and isinstance(q, torch.Tensor):
        scale = q.shape[-1] ** -0.5
    if isinstance(dropout_p, (int, float)) and dropout_p > 0 and rng_state is None:
        rng_state = new_rng_state()
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    args = [
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, leftpad_k,
        kv_batch_idx, block_table, scale, causal, window_left, window_right, softcap,
        alibi_slopes, dropout_p, rng_state, sinks, num_splits, attn_mask,
    ]  # fmt: skip
    check_flash_forward(q, k, v, *args, op="flash_attention")
    return run_flash_operator(q, k, v, *args, backend=backend)


def run_flash_operator(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calls the forward operator for arguments already validated with
    :func:`~aigc_ext.flash.checks.check_flash_forward` (``args``: the schema's, after q, k, v,
    in order): :func:`flash_attention` without its checks and defaults, for callers that ran
    the checks themselves (``flash_attn_with_kvcache`` checks before it writes the cache)."""
    args = list(args)
    for i in (8, 12, 14):  # scale, softcap, dropout_p: the schema's floats
        if i < len(args):
            args[i] = float(args[i])
    op = _operator(q.device.type, backend)
    return op(q, k, v, *args)
