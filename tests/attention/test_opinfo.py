"""torch's own test inputs give torch's results.

* The OpInfo samples of ``nn.functional.scaled_dot_product_attention`` (all but those with
  dropout, which is random): :func:`aigc_ext.scaled_dot_product_attention` returns torch's
  output shape and values, and the gradients of every input that requires grad, in float64,
  float32, bfloat16 and float16.
* The ModuleInfo inputs of ``nn.MultiheadAttention``: :class:`aigc_ext.nn.MultiheadAttention`
  with the same constructor arguments and state gives torch's attention output, weights and
  gradients, with ``need_weights`` on (torch's code path) and off (the fused path).
* Shapes: a list of calls and a seeded random search over ranks, batch dims, heads, masks and
  empty dims; a call torch accepts is accepted with torch's result, a call it rejects raises an
  error of torch's exception class.

Float64 results must agree with torch's to rounding. Other dtypes follow FlashAttention's rule
against torch's float64 result: at most twice torch's own error in that dtype plus a slack of
one rounding of the largest value (``1e-5`` for float32). torch's own error is the larger of
its result on the call as given (on the CPU its math path, which computes bfloat16 and float16
in float32) and of its fused kernel on the same problem brought to contiguous 4-D form, the
kernel a fused implementation is measured against.
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("expecttest")  # torch.testing._internal needs it

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from sdpa_testing import ERROR_ATOL, ERROR_FACTOR, max_abs, skip_if_declined
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db

import aigc_ext
import aigc_ext.nn
from aigc_ext.layout import run_attention_op
from aigc_ext.validation import validate_sdpa_args

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [F64, F32, BF16, F16]
DTYPE_IDS = ["f64", "f32", "bf16", "f16"]

OP = next(o for o in op_db if o.name == "nn.functional.scaled_dot_product_attention")
MHA = next(m for m in module_db if m.module_cls is torch.nn.MultiheadAttention)


# ---------------------------------------------------------------------------------------------
# comparing with torch
# ---------------------------------------------------------------------------------------------


def _slack(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """One rounding of the largest value in ``dtype`` (at least ``ERROR_ATOL``)."""
    return max(ERROR_ATOL, torch.finfo(dtype).eps / 2 * max(1.0, max_abs(ref)))


def assert_matches_torch(
    name: str,
    ours: torch.Tensor | None,
    ref64: torch.Tensor | None,
    baselines: list[torch.Tensor | None],
    factor: float = ERROR_FACTOR,
) -> None:
    """``ours`` is torch's result ``ref64`` (float64) up to the error rule; ``baselines`` are
    torch's results in the dtype of ``ours``."""
    if ref64 is None:
        assert ours is None, f"{name}: torch gives None, ours a tensor"
        return
    assert ours is not None, f"{name}: torch gives a tensor, ours None"
    assert ours.shape == ref64.shape, (
        f"{name}: shape {tuple(ours.shape)} != torch's {tuple(ref64.shape)}"
    )
    ours, ref64 = ours.detach(), ref64.detach()
    if ours.dtype == F64:
        torch.testing.assert_close(ours, ref64, rtol=1e-9, atol=1e-9, equal_nan=True, msg=name)
        return
    r = ref64.double()
    finite = torch.isfinite(r)
    o = ours.double()
    assert torch.equal(torch.isfinite(o), finite), f"{name}: non-finite values differ from torch's"
    err = max_abs((o - r)[finite])
    base = max(max_abs((b.detach().double() - r)[finite]) for b in baselines if b is not None)
    tol = factor * base + _slack(ours.dtype, r[finite])
    assert err <= tol, (
        f"{name}: max|ours - torch_fp64| = {err:.3e} > {tol:.3e} (torch's {base:.3e})"
    )


def fused_form(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):  # fmt: skip
    """torch's ``scaled_dot_product_attention`` on the same problem as contiguous 4-D tensors
    (the form torch's fused CPU kernel serves), written with torch's math-path semantics:
    key/value heads repeated under ``enable_gqa``, batch dims broadcast, the leading ones
    flattened. Returns the output in the shape torch gives the call as given."""
    if enable_gqa:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    heads = lead[-1] if lead else 1

    def four_d(t, last2):
        return t.expand(*lead, *last2).reshape(-1, heads, *last2).contiguous()

    lq, lkv = query.shape[-2], key.shape[-2]
    mask = None if attn_mask is None else four_d(attn_mask, (lq, lkv))
    out = F.scaled_dot_product_attention(
        four_d(query, query.shape[-2:]),
        four_d(key, key.shape[-2:]),
        four_d(value, value.shape[-2:]),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
    )
    return out.reshape(*lead, lq, value.shape[-1])


def run_with_grads(fn: Callable, tensors, kwargs, dtype, grad_seed: int):
    """``fn(*tensors, **kwargs)`` on fresh leaves (``tensors[3]``: the mask), those of the query's
    dtype cast to ``dtype``, others (a bool mask, a dtype that differs on purpose) as they are;
    returns ``[out, grad of each tensor (None where it does not require grad)]``."""
    call_dtype = tensors[0].dtype
    leaves = [
        t.detach().to(dtype if t.dtype == call_dtype else t.dtype).requires_grad_(t.requires_grad)
        for t in tensors
    ]
    q, k, v, *mask = leaves
    if mask:
        kwargs = {**kwargs, "attn_mask": mask[0]}
    out = fn(q, k, v, **kwargs)
    wanted = [t for t in leaves if t.requires_grad]
    if not wanted:
        return [out, *(None for _ in leaves)]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    grads = iter(torch.autograd.grad(out, wanted, g))
    return [out, *(next(grads) if t.requires_grad else None for t in leaves)]


# ---------------------------------------------------------------------------------------------
# OpInfo samples of scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------


@functools.cache
def _sample_list(dtype: torch.dtype) -> list:
    """The samples without dropout: sample_inputs, and reference_inputs when the OpInfo has its
    own (otherwise they are the sample inputs again)."""
    samples = list(OP.sample_inputs("cpu", dtype, requires_grad=True))
    if OP.reference_inputs_func is not None:
        samples += list(OP.reference_inputs("cpu", dtype, requires_grad=True))
    return [s for s in samples if s.kwargs.get("dropout_p", 0.0) == 0.0]


def _sample_id(sample) -> str:
    def dims(t):
        return "x".join(map(str, t.shape))

    parts = [f"q{dims(sample.input)}", f"k{dims(sample.args[0])}", f"v{dims(sample.args[1])}"]
    for name, value in sorted(sample.kwargs.items()):
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}{dims(value)}")
        elif value not in (None, False, 0.0):
            parts.append(name if value is True else f"{name}{value}")
    return "-".join(parts)


_SAMPLES = _sample_list(F32)
SAMPLE_INDEX = list(range(len(_SAMPLES)))
SAMPLE_IDS = [f"{i}-{_sample_id(s)}" for i, s in enumerate(_SAMPLES)]


def _sample(dtype: torch.dtype, index: int):
    sample = _sample_list(dtype)[index]
    tensors = [sample.input, *sample.args]
    mask = sample.kwargs.get("attn_mask")
    if mask is not None:
        tensors.append(mask)
    kwargs = {k: v for k, v in sample.kwargs.items() if k != "attn_mask"}
    return tensors, kwargs


def check_sample(
    dtype: torch.dtype, index: int, backend: str | None = None, factor: float = ERROR_FACTOR
) -> None:
    tensors, kwargs = _sample(dtype, index)
    if backend is not None:
        mask = {"attn_mask": tensors[3]} if len(tensors) > 3 else {}
        skip_if_declined(backend, *tensors[:3], **kwargs, **mask)
    ref = run_with_grads(F.scaled_dot_product_attention, tensors, kwargs, F64, index)
    torch_same = run_with_grads(F.scaled_dot_product_attention, tensors, kwargs, dtype, index)
    torch_fused = run_with_grads(fused_form, tensors, kwargs, dtype, index)
    # torch's math backend too: on these small, large-valued samples the gradients are badly
    # conditioned, and which of torch's kernels lands closest to float64 depends on the CPU's
    # BLAS (on Intel MKL the math path's error was 4x the fused kernel's in fp32).
    with sdpa_kernel(SDPBackend.MATH):
        torch_math = run_with_grads(F.scaled_dot_product_attention, tensors, kwargs, dtype, index)
    if backend is None:
        ours = run_with_grads(aigc_ext.scaled_dot_product_attention, tensors, kwargs, dtype, index)
    else:
        with aigc_ext.use_backend(backend):
            ours = run_with_grads(
                aigc_ext.scaled_dot_product_attention, tensors, kwargs, dtype, index
            )
    assert ours[0].dtype == dtype
    names = ["out", "grad query", "grad key", "grad value", "grad attn_mask"]
    for name, o, r, *base in zip(names, ours, ref, torch_same, torch_fused, torch_math,
                                 strict=False):  # fmt: skip
        assert_matches_torch(name, o, r, base, factor)


def test_opinfo_has_cross_rank_samples():
    """The samples include a 3-D query with 4-D key/value, whose batch dims broadcast."""
    ranks = {(s.input.dim(), s.args[0].dim()) for s in _SAMPLES}
    assert (3, 4) in ranks and len(_SAMPLES) >= 13


@pytest.mark.parametrize("index", SAMPLE_INDEX, ids=SAMPLE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opinfo_sample(dtype, index):
    """Default dispatch (the mask sample's mask requires grad: the reference path serves it)."""
    check_sample(dtype, index)


@pytest.mark.parametrize("index", SAMPLE_INDEX, ids=SAMPLE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opinfo_sample_forced_backend(backend, dtype, index):
    check_sample(dtype, index, backend)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_opinfo_cross_rank_samples_triton(dtype):
    """The Triton kernels on the samples whose batch dims broadcast across ranks, one causal and
    one not (through Triton's interpreter on the CPU: it is slow). In bfloat16 they round P and
    dS to bfloat16 as FlashAttention-2 does, which torch's CPU kernels do not: a factor of 4
    there, as in tests/attention/test_triton.py."""
    if aigc_ext.dispatch.get_backend("triton").why_unavailable() is not None:
        pytest.skip("the triton backend is not available here")
    cross = [i for i, s in enumerate(_SAMPLES) if s.input.dim() != s.args[0].dim()]
    picked = {_SAMPLES[i].kwargs.get("is_causal", False): i for i in reversed(cross)}
    assert set(picked) == {False, True}
    for index in picked.values():
        check_sample(dtype, index, "triton", 4.0 if dtype == BF16 else ERROR_FACTOR)


def test_opinfo_error_inputs():
    """Each error input torch's OpInfo lists raises torch's exception class here too."""
    if OP.error_inputs_func is None:
        pytest.skip("the OpInfo of scaled_dot_product_attention defines no error_inputs")
    for error in OP.error_inputs("cpu"):
        s = error.sample_input
        with pytest.raises(error.error_type):
            aigc_ext.scaled_dot_product_attention(s.input, *s.args, **s.kwargs)


# ---------------------------------------------------------------------------------------------
# calls torch accepts and calls it rejects
# ---------------------------------------------------------------------------------------------


def _outcome(fn, tensors, kwargs):
    """``("ok", [out, grads...])`` or ``("error", exception)``."""
    try:
        return "ok", run_with_grads(fn, tensors, kwargs, tensors[0].dtype, 0)
    except Exception as exc:  # the class is what is compared
        return "error", exc


def _patched_sdpa(*args, **kwargs):
    """``torch.nn.functional.scaled_dot_product_attention`` under ``patch_sdpa``, which validates
    and calls the fused backend itself, without the public API's preparation of the tensors."""
    with aigc_ext.patch_sdpa():
        return F.scaled_dot_product_attention(*args, **kwargs)


def check_like_torch(tensors, kwargs, ours_fn=aigc_ext.scaled_dot_product_attention) -> None:
    """Ours accepts exactly what torch accepts, with torch's result, and raises torch's class."""
    want, ref = _outcome(torch._C._nn.scaled_dot_product_attention, tensors, kwargs)
    got, ours = _outcome(ours_fn, tensors, kwargs)
    if want == "error":
        assert got == "error", f"torch raises {type(ref).__name__}: {ref}; ours accepts"
        assert isinstance(ours, type(ref)), (
            f"torch raises {type(ref).__name__}, ours {type(ours).__name__}: {ours}"
        )
        if ours_fn is aigc_ext.scaled_dot_product_attention:  # patch_sdpa: torch's own error
            shapes = [str(tuple(t.shape)) for t in tensors]
            assert any(shape in str(ours) for shape in shapes), f"no shape named in: {ours}"
        return
    assert got == "ok", f"torch accepts (output {tuple(ref[0].shape)}); ours raises {ours!r}"
    for name, o, r in zip(
        ["out", "grad q", "grad k", "grad v", "grad mask"], ours, ref, strict=False
    ):
        if r is None:
            assert o is None, name
        else:
            assert o.shape == r.shape, f"{name}: {tuple(o.shape)} != torch's {tuple(r.shape)}"
            tol = 1e-9 if r.dtype == F64 else 2e-5
            torch.testing.assert_close(o, r, rtol=tol, atol=tol, msg=name)


def _t(*shape, dtype=F64, seed=0, grad=True):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)
    return t.requires_grad_(grad and dtype.is_floating_point)


def _qkv(q, k, v, dtype=F64):
    return [_t(*q, dtype=dtype, seed=1), _t(*k, dtype=dtype, seed=2), _t(*v, dtype=dtype, seed=3)]


# (id, query, key, value shapes, keyword arguments)
SHAPE_CASES = [
    ("q3-kv4", (4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8), {}),
    ("q3-kv4-causal", (4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8), {"is_causal": True}),
    ("q4-kv3", (2, 4, 3, 8), (4, 6, 8), (4, 6, 8), {}),
    ("q4-kv3-heads-differ", (2, 3, 4, 8), (4, 5, 8), (4, 5, 8), {}),
    ("q2-kv3", (3, 8), (4, 6, 8), (4, 6, 8), {}),
    ("q2-kv4", (3, 8), (2, 4, 6, 8), (2, 4, 6, 8), {}),
    ("q3-kv2", (4, 3, 8), (6, 8), (6, 8), {}),
    ("q5-kv4", (2, 3, 4, 3, 8), (3, 4, 6, 8), (3, 4, 6, 8), {}),
    ("q3-kv5", (4, 3, 8), (2, 3, 4, 6, 8), (2, 3, 4, 6, 8), {}),
    ("q-batch-broadcasts-up", (1, 4, 3, 8), (2, 4, 6, 8), (2, 4, 6, 8), {}),
    ("q-heads-broadcast-up", (2, 1, 3, 8), (2, 4, 6, 8), (2, 4, 6, 5), {}),
    ("k-v-ranks-differ", (2, 4, 3, 8), (2, 4, 6, 8), (4, 6, 8), {}),
    ("k-batch-1-v-batch-2", (2, 4, 3, 8), (1, 4, 6, 8), (2, 4, 6, 8), {}),
    ("v-widens-output", (1, 4, 3, 8), (1, 4, 6, 8), (2, 4, 6, 8), {}),
    ("k-heads-1-v-heads-4", (2, 4, 3, 8), (2, 1, 6, 8), (2, 4, 6, 8), {}),
    ("heads-differ", (2, 4, 3, 8), (2, 2, 6, 8), (2, 2, 6, 8), {}),
    ("batch-differs", (2, 4, 3, 8), (3, 4, 6, 8), (3, 4, 6, 8), {}),
    ("v-batch-differs", (2, 4, 3, 8), (2, 4, 6, 8), (3, 4, 6, 8), {}),
    ("gqa", (2, 4, 3, 8), (2, 2, 6, 8), (2, 2, 6, 8), {"enable_gqa": True}),
    ("gqa-q3-kv4", (4, 3, 8), (4, 2, 6, 8), (4, 2, 6, 8), {"enable_gqa": True}),
    ("gqa-k2-v4-heads", (2, 4, 3, 8), (2, 2, 6, 8), (2, 4, 6, 8), {"enable_gqa": True}),
    ("gqa-k1-v2-heads", (2, 4, 3, 8), (2, 1, 6, 8), (2, 2, 6, 8), {"enable_gqa": True}),
    ("gqa-kv-batch-1", (2, 4, 3, 8), (1, 2, 6, 8), (1, 2, 6, 8), {"enable_gqa": True}),
    ("gqa-not-dividing", (2, 6, 3, 8), (2, 4, 6, 8), (2, 4, 6, 8), {"enable_gqa": True}),
    ("gqa-more-kv-heads", (2, 2, 3, 8), (2, 4, 6, 8), (2, 4, 6, 8), {"enable_gqa": True}),
    ("gqa-q-heads-1", (2, 1, 3, 8), (2, 4, 6, 8), (2, 4, 6, 8), {"enable_gqa": True}),
    ("gqa-kv-2d", (4, 3, 8), (6, 8), (6, 8), {"enable_gqa": True}),
    ("gqa-q-2d", (3, 8), (2, 6, 8), (2, 6, 8), {"enable_gqa": True}),
    ("gqa-v-2d", (2, 4, 3, 8), (2, 2, 6, 8), (6, 8), {"enable_gqa": True}),
    ("head-dims-differ", (4, 3, 8), (4, 6, 7), (4, 6, 8), {}),
    ("kv-lengths-differ", (2, 3, 3, 8), (2, 3, 6, 8), (2, 3, 5, 5), {}),
    ("ev-differs", (2, 4, 3, 8), (2, 4, 6, 8), (2, 4, 6, 5), {}),
    ("head-dim-0", (2, 4, 3, 0), (2, 4, 6, 0), (2, 4, 6, 5), {}),
    ("head-dim-0-causal", (2, 4, 3, 0), (2, 4, 6, 0), (2, 4, 6, 5), {"is_causal": True}),
    ("head-dim-0-broadcast", (4, 3, 0), (2, 4, 6, 0), (2, 4, 6, 5), {"scale": 0.5}),
    ("head-dim-0-batch-differs", (2, 3, 3, 0), (5, 3, 6, 0), (5, 3, 6, 5), {}),
    ("no-query-rows", (2, 3, 0, 8), (2, 4, 6, 8), (2, 4, 6, 5), {}),
    ("no-keys", (2, 3, 3, 8), (2, 3, 0, 8), (2, 3, 0, 5), {}),
    ("no-keys-batch-differs", (2, 3, 3, 8), (7, 3, 0, 8), (7, 3, 0, 5), {}),
    ("no-kv-heads", (4, 3, 8), (2, 0, 6, 8), (2, 0, 6, 8), {}),
    ("empty-value-head-dims-differ", (2, 3, 3, 8), (2, 3, 6, 7), (2, 0, 6, 5), {}),
    ("no-value-columns", (2, 3, 3, 8), (2, 4, 6, 8), (2, 3, 6, 0), {}),
    ("no-keys-only-in-key", (2, 3, 3, 8), (2, 3, 0, 7), (2, 3, 6, 5), {}),
    ("no-kv-heads-only-in-key", (2, 3, 3, 8), (2, 0, 6, 8), (2, 3, 6, 5), {}),
    ("empty-batch", (0, 4, 3, 8), (0, 4, 6, 8), (0, 4, 6, 5), {}),
    ("empty-batch-broadcast", (0, 4, 3, 8), (1, 4, 6, 8), (1, 4, 6, 5), {}),
    ("empty-batch-vs-2", (0, 3, 3, 8), (2, 3, 6, 8), (2, 3, 6, 5), {}),
    ("no-query-heads", (2, 0, 3, 8), (2, 1, 6, 8), (2, 1, 6, 8), {}),
    ("no-query-heads-gqa", (2, 0, 3, 8), (2, 2, 6, 8), (2, 2, 6, 8), {"enable_gqa": True}),
]

# (id, query, key, value shapes, mask shape and dtype)
MASK_CASES = [
    ("q3-kv4-mask2", (4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8), ((3, 6), F64)),
    ("q3-kv4-mask3", (4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8), ((4, 3, 6), F64)),
    ("q3-kv4-mask4-bool", (4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8), ((4, 4, 3, 6), torch.bool)),
    ("q3-kv4-mask5", (4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8), ((1, 4, 4, 3, 6), F64)),
    ("mask-widens-scores", (4, 3, 8), (4, 6, 8), (4, 6, 8), ((2, 4, 3, 6), F64)),
    ("mask-1d", (4, 3, 8), (4, 6, 8), (4, 6, 8), ((6,), torch.bool)),
    ("mask-vs-value-batch", (1, 4, 3, 8), (1, 4, 6, 8), (2, 4, 6, 8), ((2, 1, 3, 6), F64)),
    ("mask-fits-scores", (1, 4, 3, 8), (1, 4, 6, 8), (2, 4, 6, 8), ((1, 4, 3, 6), F64)),
    ("mask-int", (4, 3, 8), (4, 6, 8), (4, 6, 8), ((3, 6), torch.int64)),
    ("mask-f16-for-f64", (4, 3, 8), (4, 6, 8), (4, 6, 8), ((3, 6), F16)),
    ("mask-any-shape-no-keys", (2, 3, 3, 8), (2, 3, 0, 8), (2, 3, 0, 5), ((5, 5), F64)),
    ("mask-int-no-keys", (2, 3, 3, 8), (2, 3, 0, 8), (2, 3, 0, 5), ((5, 5), torch.int32)),
]


@pytest.mark.parametrize(
    ("q", "k", "v", "kwargs"), [c[1:] for c in SHAPE_CASES], ids=[c[0] for c in SHAPE_CASES]
)
def test_shapes_like_torch(q, k, v, kwargs):
    check_like_torch(_qkv(q, k, v), kwargs)


@pytest.mark.parametrize(
    ("q", "k", "v", "mask"), [c[1:] for c in MASK_CASES], ids=[c[0] for c in MASK_CASES]
)
def test_masks_like_torch(q, k, v, mask):
    shape, dtype = mask
    if dtype == torch.bool:
        m = torch.rand(shape, generator=torch.Generator().manual_seed(4)) < 0.7
    else:
        m = _t(*shape, dtype=dtype, seed=4, grad=False)
    check_like_torch([*_qkv(q, k, v), m], {})


@pytest.mark.parametrize(
    ("q", "k", "v", "kwargs"), [c[1:] for c in SHAPE_CASES], ids=[c[0] for c in SHAPE_CASES]
)
def test_shapes_like_torch_through_patch_sdpa(q, k, v, kwargs):
    """The op-backed backends prepare calls that reach them without the public API."""
    check_like_torch(_qkv(q, k, v), kwargs, _patched_sdpa)


def test_dtypes_like_torch():
    """Unsupported and mismatched dtypes: torch's RuntimeError."""
    ints = [t.detach().to(torch.int32) for t in _qkv((4, 3, 8), (4, 6, 8), (4, 6, 8))]
    check_like_torch(ints, {})
    q, k, v = _qkv((4, 3, 8), (4, 6, 8), (4, 6, 8))
    check_like_torch([q, k.detach().float(), v], {})


def test_rank_below_2_like_torch():
    check_like_torch([_t(8), *_qkv((4, 3, 8), (4, 6, 8), (4, 6, 8))[1:]], {})


def test_errors_are_value_and_runtime_errors():
    """The class keeps ``except ValueError`` working and adds torch's ``RuntimeError`` (and
    ``IndexError`` where torch gives that)."""
    q, k, v = _qkv((2, 4, 3, 8), (2, 2, 6, 8), (2, 2, 6, 8))
    with pytest.raises(ValueError, match=r"head counts.*query \(2, 4, 3, 8\), key \(2, 2, 6, 8\)"):
        aigc_ext.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match="head counts"):
        aigc_ext.scaled_dot_product_attention(q, k, v)
    q2 = _t(3, 8)
    with pytest.raises(IndexError, match=r"enable_gqa.*3 dims.*query \(3, 8\)"):
        aigc_ext.scaled_dot_product_attention(q2, k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        aigc_ext.scaled_dot_product_attention(q2, k, v, enable_gqa=True)


def test_broadcast_is_a_view_for_the_kernel():
    """A query shared across key/value batches reaches the operator as a stride-0 view."""
    from aigc_ext.layout import broadcast_qkv

    seen = []

    def spy(q, k, v, mask, is_causal, scale):
        seen.append((tuple(q.shape), q.stride(), tuple(k.shape)))
        return torch.ops.aigc_ext.attention_forward(q, k, v, mask, is_causal, scale)

    q, k, v = _qkv((4, 3, 8), (5, 4, 6, 8), (5, 4, 6, 8), dtype=F32)
    call = validate_sdpa_args(q, k, v, None, 0.0, False, None, False)
    assert call.prepare == "broadcast" and call.batch_shape == (5, 4)
    views = broadcast_qkv(q, k, v, call.batch_shape, call.heads_kv)
    assert views[0].data_ptr() == q.data_ptr() and views[0].stride()[0] == 0
    prepared = call._replace(query=views[0], key=views[1], value=views[2], prepare="")
    out = run_attention_op(spy, prepared)
    assert seen == [((5, 4, 3, 8), (0, 24, 8, 1), (5, 4, 6, 8))]
    assert out.shape == (5, 4, 3, 8)


def test_cross_rank_call_compiles_fullgraph():
    """The broadcasting is traced into one graph (views, then the operator) by torch.compile."""
    q, k, v = _qkv((4, 3, 8), (5, 4, 6, 8), (5, 4, 6, 8), dtype=F32)

    def attend(q, k, v):
        return aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = torch.compile(attend, fullgraph=True)
    eager, traced = (run_with_grads(fn, [q, k, v], {}, F32, 0) for fn in (attend, compiled))
    assert traced[0].shape == (5, 4, 3, 8)
    for name, a, b in zip(["out", "grad q", "grad k", "grad v"], traced, eager, strict=True):
        torch.testing.assert_close(a, b, msg=name)


@st.composite
def random_calls(draw):
    """A random call over ranks 2-5, batch dims that match, are 1, are missing or differ,
    heads with and without enable_gqa, masks, and empty dims; drawn from one seed."""
    rnd = random.Random(draw(st.integers(0, 2**32 - 1), label="seed"))
    lead = [rnd.choice([1, 2, 3]) for _ in range(3)]  # the full batch dims, heads last
    heads = rnd.choice([1, 2, 4])
    gqa = rnd.random() < 0.3
    lq, lkv = rnd.choice([0, 1, 3, 5]), rnd.choice([0, 1, 4])
    e = rnd.choice([0, 3, 8]) if rnd.random() < 0.2 else rnd.choice([3, 8])
    ev = rnd.choice([0, 5]) if rnd.random() < 0.1 else rnd.choice([5, 8])

    def batch_dims(kv_heads=None):
        rank = rnd.randint(0, 3)
        dims = [*lead[:2], heads if kv_heads is None else kv_heads][3 - rank :]
        for i in range(len(dims)):  # broadcast (1) or conflict (another size) now and then
            r = rnd.random()
            dims[i] = 1 if r < 0.25 else (dims[i] + 1 if r < 0.3 else dims[i])
        return dims

    kv_heads = rnd.choice([1, heads // 2 or 1, heads]) if gqa else None
    q = (*batch_dims(), lq, e)
    k = (*batch_dims(kv_heads), lkv, e if rnd.random() < 0.95 else e + 1)
    v = (*batch_dims(kv_heads), lkv if rnd.random() < 0.95 else lkv + 1, ev)
    if gqa and any(len(s) > 2 and s[-3] == 0 for s in (q, k, v)):
        gqa = False
    kwargs = {"is_causal": rnd.random() < 0.3, "enable_gqa": gqa}
    if rnd.random() < 0.3:
        kwargs["scale"] = rnd.choice([0.5, 2.0])
    mask = None
    if rnd.random() < 0.3:
        try:  # mostly the score shape; the full batch dims otherwise, or when q, k conflict
            score = torch.broadcast_shapes(q[:-2], k[:-2]) if rnd.random() < 0.9 else lead
        except RuntimeError:
            score = lead
        dims = [n if rnd.random() < 0.6 else 1 for n in (*score, lq, lkv)]
        mask = (tuple(dims[rnd.randint(0, len(dims)) :]), rnd.choice([torch.bool, F64]))
        kwargs["is_causal"] = False  # torch takes a mask or is_causal
    return q, k, v, mask, kwargs, rnd.randint(0, 2**16)


def _torch_can_run(q, k, v, kwargs) -> bool:
    """Calls torch mishandles are left out: enable_gqa with key/value sequence lengths that
    differ (its 4-D fused CPU kernel reads past the value) or with no key/value heads (it
    divides by zero)."""
    if not kwargs["enable_gqa"]:
        return True
    return k[-2] == v[-2] and all(len(s) < 3 or s[-3] > 0 for s in (k, v))


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(call=random_calls())
def test_random_shapes_like_torch(call):
    q, k, v, mask, kwargs, seed = call
    note(repr(call))
    if not _torch_can_run(q, k, v, kwargs):
        return
    tensors = _qkv(q, k, v)
    if mask is not None:
        shape, dtype = mask
        gen = torch.Generator().manual_seed(seed)
        m = torch.rand(shape, generator=gen) < 0.8 if dtype == torch.bool else _t(*shape, seed=seed)
        tensors.append(m if dtype == torch.bool else m.detach())
    check_like_torch(tensors, kwargs)
    check_like_torch(tensors, kwargs, _patched_sdpa)


# ---------------------------------------------------------------------------------------------
# ModuleInfo inputs of nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------


@functools.cache
def _module_inputs(dtype: torch.dtype, training: bool) -> list:
    return list(
        MHA.module_inputs_func(
            MHA, device="cpu", dtype=dtype, requires_grad=True, training=training
        )
    )


MODULE_INDEX = list(range(len(_module_inputs(F32, True))))
# need_weights=True (the default) runs torch's own forward and returns the averaged weights;
# need_weights=False the fused kernel.
MODES = {"weights": {"need_weights": True}, "fused": {"need_weights": False}}


def _module_id(i: int) -> str:
    m = _module_inputs(F32, True)[i]
    c, f = m.constructor_input.kwargs, m.forward_input.kwargs
    flags = [name for name in ("bias", "add_bias_kv", "add_zero_attn") if c.get(name)]
    flags.append("batch_first" if c.get("batch_first") else "seq_first")
    flags += [name for name in ("key_padding_mask", "attn_mask") if f.get(name) is not None]
    return f"{i}-" + "-".join(flags)


def _run_module(module, forward_input, dtype, kwargs, grad_seed):
    """Output, weights and the gradients of the inputs and of every parameter."""
    inputs = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in forward_input.args]
    out, weights = module(*inputs, **forward_input.kwargs, **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    loss = (out * torch.randn(out.shape, generator=gen).to(dtype)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen).to(dtype)).sum()
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, [*inputs, *params], allow_unused=True)
    return [out, weights, *grads]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("index", MODULE_INDEX, ids=_module_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_multihead_attention_module_input(dtype, training, index, mode):
    module_input = _module_inputs(dtype, training)[index]
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    torch.manual_seed(index)
    theirs = torch.nn.MultiheadAttention(*args, **kwargs, device="cpu", dtype=dtype)
    ours = aigc_ext.nn.MultiheadAttention(*args, **kwargs, device="cpu", dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    ref = copy.deepcopy(theirs).to(F64)
    for m in (theirs, ours, ref):
        m.train(training)
    fwd = module_input.forward_input
    mode_kwargs = MODES[mode]
    want = _run_module(ref, fwd, F64, mode_kwargs, index)
    base = _run_module(theirs, fwd, dtype, mode_kwargs, index)
    got = _run_module(ours, fwd, dtype, mode_kwargs, index)
    names = ["out", "weights", "grad query", "grad key", "grad value"]
    names += [f"grad {n}" for n, _ in ours.named_parameters()]
    assert len(got) == len(names)
    for name, o, r, b in zip(names, got, want, base, strict=True):
        assert_matches_torch(name, o, r, [b])


def test_multihead_attention_error_inputs():
    if MHA.module_error_inputs_func is None:
        pytest.skip("the ModuleInfo of nn.MultiheadAttention defines no error inputs")
    for error in MHA.module_error_inputs_func(MHA, device="cpu", dtype=F32, requires_grad=False,
                                              training=True):  # fmt: skip
        c, f = error.module_error_input.constructor_input, error.module_error_input.forward_input
        with pytest.raises(error.error_type):
            aigc_ext.nn.MultiheadAttention(*c.args, **c.kwargs)(*f.args, **f.kwargs)
