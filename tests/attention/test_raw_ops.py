"""The raw operators' own checks: devices, shapes, dtypes and scale, in the real and fake kernels.

``torch.ops.aigc_ext.attention_forward`` / ``attention_backward`` are reached by three routes:
the C++ CPU kernel; the Meta kernel (the fake kernel), which the dispatcher picks whenever one
tensor argument is on the meta device, since Meta outranks CPU; and FakeTensorMode, which
``torch.compile`` and ``torch.export`` trace with. Each route must reject a bad call with the
same error, and none may hand back tensors that nothing wrote.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from sdpa_testing import DEVICE, make_qkv
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import aigc_ext  # noqa: F401  (registers the operators)

FWD = torch.ops.aigc_ext.attention_forward
BWD = torch.ops.aigc_ext.attention_backward
CPU_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

FORWARD_NAMES = ("query", "key", "value", "attn_mask")
BACKWARD_NAMES = ("grad_out", "query", "key", "value", "out", "lse", "attn_mask")


def _empty(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _forward_args(mask=True):
    """Valid CPU arguments of the forward operator: GQA, a bool mask, Ev != E."""
    q, k, v = (t.cpu() for t in make_qkv(2, 4, 2, 5, 6, 8, 4, seed=1))
    m = torch.rand(5, 6, generator=torch.Generator().manual_seed(2)) < 0.8 if mask else None
    return [q, k, v, m, False, 0.3]


def _backward_args(mask=True):
    q, k, v, m, is_causal, scale = _forward_args(mask)
    out, lse = FWD(q, k, v, m, is_causal, scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return [grad_out, q, k, v, out, lse, m, is_causal, scale]


def _on_meta(args, names, which):
    """``args`` with the tensor named ``which`` moved to the meta device."""
    i = names.index(which)
    return [a.to("meta") if j == i else a for j, a in enumerate(args)]


def _all_meta(args):
    return [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]


def _error(fn, *args) -> RuntimeError:
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    return info.value


def _device_message(names, which):
    """What the error says when ``which`` alone is on meta: the first tensor off the query's
    device, and both devices."""
    if which == "query":
        first = next(n for n in names if n != "query")
        return f"{first} is on cpu but query is on meta; all tensors must be on one device"
    return f"{which} is on meta but query is on cpu; all tensors must be on one device"


# ---------------------------------------------------------------------------------------------
# mixed devices: the fake kernel (the dispatcher's choice) and the CPU kernel both raise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["dispatcher", "cpu-kernel"])
@pytest.mark.parametrize("which", FORWARD_NAMES)
def test_forward_rejects_a_tensor_on_another_device(which, route):
    args = _on_meta(_forward_args(), FORWARD_NAMES, which)
    op = FWD.default if route == "dispatcher" else lambda *a: FWD.default.redispatch(CPU_ONLY, *a)
    err = _error(op, *args)
    assert str(err) == "aigc_ext::attention_forward: " + _device_message(FORWARD_NAMES, which)


@pytest.mark.parametrize("route", ["dispatcher", "cpu-kernel"])
@pytest.mark.parametrize("which", BACKWARD_NAMES)
def test_backward_rejects_a_tensor_on_another_device(which, route):
    args = _on_meta(_backward_args(), BACKWARD_NAMES, which)
    op = BWD.default if route == "dispatcher" else lambda *a: BWD.default.redispatch(CPU_ONLY, *a)
    err = _error(op, *args)
    assert str(err) == "aigc_ext::attention_backward: " + _device_message(BACKWARD_NAMES, which)


def test_reported_reproducers_raise_instead_of_returning_unwritten_tensors():
    grad_out, q, k, v, out, lse, _, _, _ = _backward_args(mask=False)
    with pytest.raises(RuntimeError, match="grad_out is on meta but query is on cpu"):
        BWD(grad_out.to("meta"), q, k, v, out, lse, None, False, 0.25)
    with pytest.raises(RuntimeError, match="key is on meta but query is on cpu"):
        FWD(q, k.to("meta"), v.to("meta"), None, False, 0.25)
    with pytest.raises(RuntimeError, match="lse is on meta but query is on cpu"):
        BWD(grad_out, q, k, v, out, lse.to("meta"), None, False, 0.25)


def test_cpu_kernel_rejects_meta_tensors():
    """All on meta reaches the CPU kernel only by a redispatch: it has no data to read."""
    for op, args in ((FWD, _forward_args()), (BWD, _backward_args())):
        err = _error(op.default.redispatch, CPU_ONLY, *_all_meta(args))
        assert "the tensors are on meta; this operator has a kernel for CPU tensors only" in str(
            err
        )


def test_fake_kernel_rejects_devices_without_a_kernel():
    """Fake CUDA tensors (as an export for a GPU traces) fail as the real call would."""
    mode = FakeTensorMode()
    cuda = torch.device("cuda", 0)
    args = [
        FakeTensor(mode, a.to("meta"), cuda) if isinstance(a, torch.Tensor) else a
        for a in _forward_args()
    ]
    with mode, pytest.raises(RuntimeError) as info:
        FWD(*args)
    assert str(info.value) == (
        "aigc_ext::attention_forward: the tensors are on cuda:0; this operator has a kernel for "
        "CPU tensors only"
    )


# ---------------------------------------------------------------------------------------------
# all on meta, and fake tensors: valid calls describe the real outputs
# ---------------------------------------------------------------------------------------------


def _describe(ts):
    return [(tuple(t.shape), t.dtype, t.stride()) for t in ts]


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_fake_outputs_match_the_real_ones(layout):
    q, k, v, m, is_causal, scale = _forward_args()
    if layout == "transposed":  # (B, L, H, E) memory, as after a projection
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    fwd_args = [q, k, v, m, is_causal, scale]
    out, lse = FWD(*fwd_args)
    bwd_args = [torch.ones_like(out), q, k, v, out, lse, m, is_causal, scale]
    real = _describe(FWD(*fwd_args)) + _describe(BWD(*bwd_args))
    meta = _describe(FWD(*_all_meta(fwd_args))) + _describe(BWD(*_all_meta(bwd_args)))
    with FakeTensorMode() as mode:
        fake_fwd = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in fwd_args]
        fake_bwd = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bwd_args]
        fake = _describe(FWD(*fake_fwd)) + _describe(BWD(*fake_bwd))
    assert meta == real
    assert fake == real
    for t in FWD(*_all_meta(fwd_args)):
        assert t.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# inconsistent shapes, dtypes, scale: the same error from the real and the fake kernel
# ---------------------------------------------------------------------------------------------


def _fwd_case(q, k, v, mask=None, scale=0.5):
    return [q, k, v, mask, False, scale]


def _bwd_case(**change):
    """Valid backward arguments (B, Hq, L, Ev) = (2, 4, 5, 4) with some replaced."""
    names = ("grad_out", "query", "key", "value", "out", "lse", "attn_mask", "is_causal", "scale")
    args = dict(zip(names, _backward_args(), strict=True))
    args.update(change)
    return list(args.values())


# (id, arguments, the argument the message must name, a pattern of the message)
FORWARD_CASES = [
    (
        "reported",
        lambda: _fwd_case(_empty(2, 3, 8, 16), _empty(5, 2, 9, 7), _empty(1, 1, 1, 1)),
        "key",
        r"batch sizes differ: query has shape \[2, 3, 8, 16\] but key has shape \[5, 2, 9, 7\]",
    ),
    (
        "query-3d",
        lambda: _fwd_case(_empty(3, 4, 8), _empty(3, 1, 5, 8), _empty(3, 1, 5, 8)),
        "query",
        r"query must be 4-D .*got shape \[3, 4, 8\]",
    ),
    (
        "key-5d",
        lambda: _fwd_case(_empty(3, 1, 4, 8), _empty(3, 1, 1, 5, 8), _empty(3, 1, 5, 8)),
        "key",
        r"key must be 4-D .*got shape \[3, 1, 1, 5, 8\]",
    ),
    (
        "value-dtype",
        lambda: _fwd_case(
            _empty(1, 2, 4, 8), _empty(1, 2, 5, 8), _empty(1, 2, 5, 8, dtype=torch.float64)
        ),
        "value",
        r"value has dtype Double but query has dtype Float",
    ),
    (
        "int-dtype",
        lambda: _fwd_case(*(_empty(1, 2, 4, 8, dtype=torch.int64),) * 3),
        "query",
        r"unsupported dtype Long of query, key and value",
    ),
    (
        "value-batch",
        lambda: _fwd_case(_empty(2, 2, 4, 8), _empty(2, 2, 5, 8), _empty(3, 2, 5, 8)),
        "value",
        r"batch sizes differ: query has shape \[2, 2, 4, 8\] but value has shape \[3, 2, 5, 8\]",
    ),
    (
        "kv-heads",
        lambda: _fwd_case(_empty(1, 4, 4, 8), _empty(1, 2, 5, 8), _empty(1, 4, 5, 8)),
        "value",
        r"key and value must have the same number of heads: key has shape \[1, 2, 5, 8\] but "
        r"value has shape \[1, 4, 5, 8\]",
    ),
    (
        "gqa-ratio",
        lambda: _fwd_case(_empty(1, 3, 4, 8), _empty(1, 2, 5, 8), _empty(1, 2, 5, 8)),
        "query",
        r"query heads must be a multiple of key/value heads: query has shape \[1, 3, 4, 8\]",
    ),
    (
        "zero-kv-heads",
        lambda: _fwd_case(_empty(1, 3, 4, 8), _empty(1, 0, 5, 8), _empty(1, 0, 5, 8)),
        "key",
        r"multiple of key/value heads: .* key has shape \[1, 0, 5, 8\]",
    ),
    (
        "kv-seq",
        lambda: _fwd_case(_empty(1, 2, 4, 8), _empty(1, 2, 5, 8), _empty(1, 2, 6, 8)),
        "value",
        r"key and value sequence lengths differ: key has shape \[1, 2, 5, 8\] but value has "
        r"shape \[1, 2, 6, 8\]",
    ),
    (
        "head-dim",
        lambda: _fwd_case(_empty(1, 2, 4, 8), _empty(1, 2, 5, 7), _empty(1, 2, 5, 8)),
        "key",
        r"query and key head dims differ: query has shape \[1, 2, 4, 8\] but key has shape "
        r"\[1, 2, 5, 7\]",
    ),
    (
        "mask-dtype",
        lambda: _fwd_case(*make_cpu(1, 2, 4, 5, 8), _empty(4, 5, dtype=torch.int32)),
        "attn_mask",
        r"attn_mask must be bool, float32 or the query dtype \(Float\); got Int",
    ),
    (
        "mask-5d",
        lambda: _fwd_case(*make_cpu(1, 2, 4, 5, 8), _empty(1, 1, 2, 4, 5, dtype=torch.bool)),
        "attn_mask",
        r"attn_mask \[1, 1, 2, 4, 5\] has more than 4 dims; .* = \[1, 2, 4, 5\]",
    ),
    (
        "mask-shape",
        lambda: _fwd_case(*make_cpu(1, 2, 4, 5, 8), _empty(3, 4, 5, dtype=torch.bool)),
        "attn_mask",
        r"attn_mask \[3, 4, 5\] does not broadcast to \(B, Hq, L, S\) = \[1, 2, 4, 5\]",
    ),
    ("scale-nan", lambda: _fwd_case(*make_cpu(1, 2, 4, 5, 8), scale=math.nan), "scale", r"nan$"),
    ("scale-inf", lambda: _fwd_case(*make_cpu(1, 2, 4, 5, 8), scale=math.inf), "scale", r"inf$"),
    (
        "scale-minus-inf",
        lambda: _fwd_case(*make_cpu(1, 2, 4, 5, 8), scale=-math.inf),
        "scale",
        r"got -inf$",
    ),
]

BACKWARD_CASES = [
    (
        "grad_out-shape",
        lambda: _bwd_case(grad_out=_empty(2, 4, 5, 8)),
        "grad_out",
        r"grad_out \[2, 4, 5, 8\] must have shape \[2, 4, 5, 4\]",
    ),
    (
        "out-shape",
        lambda: _bwd_case(out=_empty(2, 4, 4, 4)),
        "out",
        r"out \[2, 4, 4, 4\] must have shape \[2, 4, 5, 4\]",
    ),
    (
        "grad_out-and-out-shape",  # both alike but wrong: the kernel would read past value's dim
        lambda: _bwd_case(grad_out=_empty(2, 4, 5, 2), out=_empty(2, 4, 5, 2)),
        "grad_out",
        r"grad_out \[2, 4, 5, 2\] must have shape \[2, 4, 5, 4\]",
    ),
    (
        "grad_out-dtype",
        lambda: _bwd_case(grad_out=_empty(2, 4, 5, 4, dtype=torch.float64)),
        "grad_out",
        r"grad_out has dtype Double; grad_out and out must have the query dtype Float",
    ),
    (
        "out-dtype",
        lambda: _bwd_case(out=_empty(2, 4, 5, 4, dtype=torch.bfloat16)),
        "out",
        r"out has dtype BFloat16; grad_out and out must have the query dtype Float",
    ),
    (
        "lse-dtype",
        lambda: _bwd_case(lse=_empty(2, 4, 5, dtype=torch.float64)),
        "lse",
        r"lse must be Float of shape \[2, 4, 5\]; got Double \[2, 4, 5\]",
    ),
    (
        "lse-shape",
        lambda: _bwd_case(lse=_empty(2, 4, 5, 1)),
        "lse",
        r"lse must be Float of shape \[2, 4, 5\]; got Float \[2, 4, 5, 1\]",
    ),
    (
        "key-head-dim",
        lambda: _bwd_case(key=_empty(2, 2, 6, 7)),
        "key",
        r"query and key head dims differ",
    ),
    (
        "mask-shape",
        lambda: _bwd_case(attn_mask=_empty(5, 7, dtype=torch.bool)),
        "attn_mask",
        r"attn_mask \[5, 7\] does not broadcast to \(B, Hq, L, S\) = \[2, 4, 5, 6\]",
    ),
    ("scale-nan", lambda: _bwd_case(scale=math.nan), "scale", r"scale must be a finite .* nan$"),
    ("scale-inf", lambda: _bwd_case(scale=math.inf), "scale", r"scale must be a finite .* inf$"),
]


def make_cpu(b, h, lq, lkv, e):
    return [t.cpu() for t in make_qkv(b, h, h, lq, lkv, e, seed=4)]


def _fake_error(op, args) -> RuntimeError:
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return _error(op, *fakes)


def _check_case(op, name, case):
    _, build, argument, pattern = case
    args = build()
    real = _error(op, *args)
    meta = _error(op, *_all_meta(args))
    fake = _fake_error(op, args)
    assert str(real).startswith(f"aigc_ext::{name}: ")
    assert argument in str(real)
    assert re.search(pattern, str(real)), str(real)
    # The fake kernel says exactly what the real one says, on meta and under FakeTensorMode.
    assert str(meta) == str(real)
    assert str(fake) == str(real)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_rejects_bad_arguments_in_every_kernel(case):
    _check_case(FWD, "attention_forward", case)


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[c[0] for c in BACKWARD_CASES])
def test_backward_rejects_bad_arguments_in_every_kernel(case):
    _check_case(BWD, "attention_backward", case)


def test_nan_scale_used_to_give_finite_output():
    q, k, v, m, is_causal, _ = _forward_args()
    for scale in (math.nan, math.inf):
        with pytest.raises(RuntimeError, match=r"attention_forward: scale must be a finite"):
            FWD(q, k, v, m, is_causal, scale)


def test_torch_compile_rejects_an_invalid_call_while_tracing():
    def fn(q, k, v):
        return FWD(q, k, v, None, False, 0.5)[0].sum()

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    args = (_empty(2, 3, 8, 16), _empty(5, 2, 9, 7), _empty(1, 1, 1, 1))
    with pytest.raises(RuntimeError, match=r"batch sizes differ: query has shape \[2, 3, 8, 16\]"):
        compiled(*args)


# ---------------------------------------------------------------------------------------------
# the Triton operators' fake kernels
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_ops():
    pytest.importorskip("triton")
    from aigc_ext.backends.triton import kernels, ops  # noqa: F401  (ops registers the operators)

    if DEVICE == "cpu" and not kernels.INTERPRET:
        pytest.skip("the Triton operators take CPU tensors only under the interpreter")
    return torch.ops.aigc_ext.triton_attention_forward, torch.ops.aigc_ext.triton_attention_backward


def _triton_args():
    q, k, v = make_qkv(1, 2, 1, 4, 6, 16, 8, seed=5)
    return [q, k, v, None, False, 0.25]


def _triton_backward_args(fwd):
    q, k, v, m, is_causal, scale = _triton_args()
    out, lse = fwd(q, k, v, m, is_causal, scale)
    return [torch.ones_like(out), q, k, v, out, lse, m, is_causal, scale]


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_triton_forward_rejects_a_tensor_on_another_device(triton_ops, which):
    fwd, _ = triton_ops
    args = _on_meta(_triton_args(), ("query", "key", "value"), which)
    other = "key" if which == "query" else which
    with pytest.raises(ValueError, match=rf"triton_attention: {other} is on "):
        fwd(*args)


@pytest.mark.parametrize("which", ["grad_out", "key", "out", "lse"])
def test_triton_backward_rejects_a_tensor_on_another_device(triton_ops, which):
    fwd, bwd = triton_ops
    args = _on_meta(_triton_backward_args(fwd), BACKWARD_NAMES, which)
    with pytest.raises(ValueError, match=rf"triton_attention: {which} is on meta but query"):
        bwd(*args)


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
@pytest.mark.parametrize("scale", [math.nan, math.inf], ids=["nan", "inf"])
def test_triton_operators_reject_a_non_finite_scale(triton_ops, fake, scale):
    fwd, bwd = triton_ops
    for op, args in ((fwd, _triton_args()), (bwd, _triton_backward_args(fwd))):
        args[-1] = scale
        with pytest.raises(ValueError, match=r"scale must be a finite number; got (nan|inf)"):
            if fake:
                with FakeTensorMode() as mode:
                    op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
            else:
                op(*args)


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
@pytest.mark.parametrize("which", ["grad_out", "out", "both", "lse"])
def test_triton_backward_rejects_bad_shapes(triton_ops, fake, which):
    fwd, bwd = triton_ops
    args = _triton_backward_args(fwd)  # out (1, 2, 4, 8)
    short = args[0][..., :4].contiguous()
    if which in ("grad_out", "both"):
        args[0] = short
    if which in ("out", "both"):
        args[4] = short.clone()
    if which == "lse":
        args[5] = args[5][..., :3].contiguous()
    name = "lse" if which == "lse" else "grad_out" if which != "out" else "out"
    with pytest.raises(ValueError, match=rf"triton_attention_backward: {name} has shape"):
        if fake:
            with FakeTensorMode() as mode:
                bwd(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        else:
            bwd(*args)


def test_triton_fake_kernel_rejects_inconsistent_shapes(triton_ops):
    fwd, _ = triton_ops
    args = [t.to(DEVICE) for t in (_empty(2, 3, 8, 16), _empty(5, 2, 9, 16), _empty(1, 1, 1, 1))]
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in args]
        with pytest.raises(ValueError, match=r"batch sizes differ: query \(2, 3, 8, 16\)"):
            fwd(*fakes, None, False, 0.5)
