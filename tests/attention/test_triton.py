"""The ``triton`` backend against the float64 reference, with FlashAttention's error rule.

Runs on the device under test (``AIGC_EXT_TEST_DEVICE``). Without a CUDA device, conftest turns
on Triton's interpreter and the kernels run on CPU tensors: the shapes are then small (odd
lengths that still span several blocks of the interpreter's tiles) and bfloat16 gets a looser
bound (see :func:`check`). With ``AIGC_EXT_TEST_DEVICE=cuda`` the same tests run at full size,
bfloat16 with the standard rule, plus determinism and ``torch.compile`` with inductor.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from sdpa_testing import (
    DEVICE,
    ERROR_FACTOR,
    causal_keep,
    check_sdpa,
    fused_backends,
    make_qkv,
    max_abs,
    randn,
    random_mask,
    run_ours,
    scores64,
)

import aigc_ext
from aigc_ext.backends.reference.ops import sdpa_reference
from aigc_ext.backends.triton import backend as triton_backend
from aigc_ext.validation import validate_sdpa_args

TRITON = "triton"
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
INTERPRETED = triton_backend.interpreter_enabled()
ON_GPU = DEVICE == "cuda" and not INTERPRETED


def _skip_reason() -> str:
    row = next((b for b in aigc_ext.backends() if b.name == TRITON), None)
    if row is None:
        return "the triton backend is not registered"
    if not row.available:
        return f"the triton backend is not available: {row.reason}"
    return (
        f"the triton backend does not run on {DEVICE!r} here (devices {row.devices}); run with "
        "AIGC_EXT_TEST_DEVICE=cuda on a GPU, or without CUDA (the interpreter)"
    )


pytestmark = pytest.mark.skipif(TRITON not in fused_backends(DEVICE), reason=_skip_reason())
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (AIGC_EXT_TEST_DEVICE=cuda)")

# Interpreter: small shapes (tiles are 64 x 32 and 32 x 64 there); GPU: full size as well.
SEQS = [(1, 1), (17, 33), (33, 17), (65, 64)]
HEAD_DIMS = [16, 40, 64, 72]
DTYPES = [F32, F16]
if ON_GPU:
    SEQS += [(257, 1000), (1023, 1024)]
    HEAD_DIMS += [128, 256]
    DTYPES += [BF16]

# Under the interpreter torch's CPU kernels (the yardstick) keep the probabilities in float32;
# ours round P and dS to bfloat16 before the value and gradient products, as FlashAttention-2
# does on GPUs, which costs about 2-3x torch's CPU error in bfloat16.
BF16_INTERPRETED_FACTOR = 4.0


def _ids(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return None


causal_param = pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])


def check(q, k, v, **kwargs):
    """:func:`sdpa_testing.check_sdpa` for the triton backend; bfloat16 under the interpreter
    with ``BF16_INTERPRETED_FACTOR`` instead of 2 (see above)."""
    factor = BF16_INTERPRETED_FACTOR if INTERPRETED and q.dtype == BF16 else ERROR_FACTOR
    return check_sdpa(TRITON, q, k, v, factor=factor, **kwargs)


# ---------------------------------------------------------------------------------------------
# dtypes, sequence lengths, head dims
# ---------------------------------------------------------------------------------------------


@causal_param
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq", SEQS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_dtype_seq_head_dim(dtype, seq, head_dim, is_causal):
    q, k, v = make_qkv(1, 2, 2, *seq, head_dim, dtype=dtype, seed=head_dim)
    check(q, k, v, is_causal=is_causal)


@pytest.mark.skipif(ON_GPU, reason="bfloat16 is part of the full parametrisation on the GPU")
@causal_param
@pytest.mark.parametrize("seq", [(33, 17), (65, 64)], ids=_ids)
def test_bfloat16_interpreted(seq, is_causal):
    """bfloat16 through the interpreter (its bfloat16 dot is emulated in float32)."""
    q, k, v = make_qkv(1, 2, 2, *seq, 40, dtype=BF16, seed=3)
    check(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize(("e", "ev"), [(128, 128), (256, 256), (200, 48)], ids=_ids)
def test_wide_head_dims(e, ev):
    q, k, v = make_qkv(1, 2, 2, 33, 40, e, ev, dtype=F16, seed=e)
    check(q, k, v, is_causal=True)


@causal_param
@pytest.mark.parametrize(("e", "ev"), [(64, 32), (40, 72), (16, 128)], ids=_ids)
@pytest.mark.parametrize("dtype", [F32, *([F16, BF16] if ON_GPU else [])], ids=_ids)
def test_value_head_dim_differs(dtype, e, ev, is_causal):
    q, k, v = make_qkv(2, 2, 2, 37, 70, e, ev, dtype=dtype, seed=e + ev)
    ours, _ = check(q, k, v, is_causal=is_causal)
    assert ours.out.shape == (2, 2, 37, ev)


@pytest.mark.parametrize("scale", [0.0, -0.7, 3.0])
def test_explicit_scale(scale):
    q, k, v = make_qkv(1, 2, 2, 40, 70, 32, dtype=F32, seed=3)
    mask = random_mask((40, 70), "float", F32, seed=4)
    check(q, k, v, attn_mask=mask, is_causal=True, scale=scale)


@pytest.mark.parametrize("direction", ["rising", "falling"])
def test_online_softmax_rescaling(direction):
    """Score maxima in late (or early) key blocks exercise the running-max rescaling."""
    lq, lkv = 40, 300
    q, k, v = make_qkv(1, 1, 1, lq, lkv, 32, dtype=F16, seed=11)
    ramp = torch.linspace(-40.0, 40.0, lkv, device=DEVICE)
    bias = (ramp if direction == "rising" else ramp.flip(0)).to(F16).expand(lq, lkv)
    check(q * 3, k * 3, v, attn_mask=bias)


# ---------------------------------------------------------------------------------------------
# causal, grouped-query attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [(5, 70), (70, 5), (65, 64)], ids=_ids)
def test_causal_top_left_alignment(seq):
    lq, lkv = seq
    q, k, v = make_qkv(1, 2, 2, lq, lkv, 16, dtype=F32, seed=lq)
    ours, _ = check(q, k, v, is_causal=True)
    torch.testing.assert_close(ours.out[:, :, 0], v[:, :, 0])  # query 0 sees key 0 only
    masked = run_ours(TRITON, q, k, v, attn_mask=causal_keep(lq, lkv))
    torch.testing.assert_close(ours.out, masked.out)


@causal_param
@pytest.mark.parametrize("hkv", [2, 1])
@pytest.mark.parametrize("dtype", [F32, F16], ids=_ids)
def test_gqa(dtype, hkv, is_causal):
    q, k, v = make_qkv(1, 4, hkv, 33, 50, 32, dtype=dtype, seed=hkv)
    ours, _ = check(q, k, v, is_causal=is_causal, enable_gqa=True)
    assert ours.grads[1].shape == k.shape and ours.grads[2].shape == v.shape


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------

B, H, L, S = 2, 2, 37, 70
MASK_SHAPES = {
    "S": (S,),
    "LS": (L, S),
    "B11S": (B, 1, 1, S),
    "1HLS": (1, H, L, S),
    "BHLS": (B, H, L, S),
    "B1L1": (B, 1, L, 1),
}


@pytest.mark.parametrize("shape", list(MASK_SHAPES.values()), ids=list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=_ids)
def test_mask(dtype, kind, shape):
    q, k, v = make_qkv(B, H, H, L, S, 24, dtype=dtype, seed=len(shape))
    mask = random_mask(shape, kind, dtype, seed=5, p_keep=0.9 if shape[-1] == 1 else 0.7)
    check(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("shape", [(L, S), (B, 1, 1, S), (1, H, L, S)], ids=["LS", "B11S", "1HLS"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_with_causal(kind, shape):
    q, k, v = make_qkv(B, H, H, L, S, 40, dtype=F16, seed=9)
    check(q, k, v, attn_mask=random_mask(shape, kind, F16, seed=6), is_causal=True)


def test_float32_mask_with_half_inputs():
    q, k, v = make_qkv(B, H, H, L, S, 32, dtype=F16, seed=2)
    check(q, k, v, attn_mask=random_mask((B, 1, L, S), "float", F32, seed=3), is_causal=True)


@causal_param
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding(kind, is_causal):
    """A (B, 1, 1, S) key-padding mask: read as one key vector per block, never as L x S."""
    b, h, lq, lkv = 3, 2, 20, 70
    lengths = torch.tensor([70, 41, 1], device=DEVICE)
    keep = torch.arange(lkv, device=DEVICE) < lengths[:, None]
    mask = keep[:, None, None, :]
    if kind == "float":
        mask = torch.zeros(keep.shape, dtype=F16, device=DEVICE).masked_fill(~keep, float("-inf"))
        mask = mask[:, None, None, :]
    q, k, v = make_qkv(b, h, h, lq, lkv, 32, dtype=F16, seed=13)
    ours, _ = check(q, k, v, attn_mask=mask, is_causal=is_causal)
    for i, n in enumerate(lengths.tolist()):
        assert max_abs(ours.grads[1][i, :, n:]) == 0 and max_abs(ours.grads[2][i, :, n:]) == 0
        alone = run_ours(
            TRITON, q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], is_causal=is_causal
        )
        torch.testing.assert_close(ours.out[i : i + 1], alone.out)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=_ids)
def test_fully_masked_rows(dtype, kind):
    """A query row with no visible key yields zeros and zero gradients, never NaN."""
    b, h, lq, lkv = 2, 2, 37, 70
    keep = torch.rand(b, h, lq, lkv, generator=torch.Generator().manual_seed(3)) < 0.7
    keep[:, :, ::5] = False
    keep[1, 0] = False  # one whole head
    keep = keep.to(DEVICE)
    mask = keep
    if kind == "float":
        mask = random_mask(keep.shape, "float", dtype, seed=8).masked_fill(~keep, float("-inf"))
    q, k, v = make_qkv(b, h, h, lq, lkv, 32, dtype=dtype, seed=17)
    ours, _ = check(q, k, v, attn_mask=mask)
    empty = ~keep.any(-1)
    out, (dq, dk, dv) = ours.out, ours.grads
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    assert (dk[1, 0] == 0).all() and (dv[1, 0] == 0).all()


def test_rows_emptied_by_mask_and_causal():
    lq, lkv = 20, 30
    keep = torch.ones(lq, lkv, dtype=torch.bool, device=DEVICE)
    keep[0, 0] = False
    keep[5, :6] = False
    q, k, v = make_qkv(1, 2, 2, lq, lkv, 16, dtype=F32, seed=2)
    ours, _ = check(q, k, v, attn_mask=keep, is_causal=True)
    assert (ours.out[:, :, [0, 5]] == 0).all()
    assert (ours.grads[0][:, :, [0, 5]] == 0).all()


# ---------------------------------------------------------------------------------------------
# layouts: strides, expanded dims, other ranks
# ---------------------------------------------------------------------------------------------


def test_transposed_inputs():
    """(B, L, H, E) tensors viewed as (B, H, L, E), as attention layers produce them."""
    q = randn((2, 30, 2, 32), F16, seed=1).transpose(1, 2)
    k = randn((2, 50, 2, 32), F16, seed=2).transpose(1, 2)
    v = randn((2, 50, 2, 24), F16, seed=3).transpose(1, 2)
    check(q, k, v, is_causal=True)


def test_strided_slices_and_mask_stride():
    q = randn((2, 4, 60, 40), F32, seed=1)[:, ::2, ::2, :32]
    k = randn((2, 2, 50, 48), F32, seed=2)[..., 8:40]
    v = randn((3, 2, 50, 40), F32, seed=3)[1:, ..., :24]
    mask = random_mask((2, 2, 30, 100), "bool", F32, seed=4)[..., ::2]  # stride 2 on S
    check(q, k, v, attn_mask=mask, is_causal=True)


def test_expanded_batch_and_heads():
    q = randn((1, 2, 30, 32), F32, seed=1).expand(2, 2, 30, 32)
    k = randn((1, 1, 45, 32), F32, seed=2).expand(2, 2, 45, 32)
    v = randn((2, 1, 45, 16), F32, seed=3).expand(2, 2, 45, 16)
    ours, _ = check(q, k, v, attn_mask=random_mask((1, 1, 30, 45), "bool", F32, seed=4))
    assert ours.grads[0].shape == q.shape


def test_3d_inputs_and_broadcast_grad_out():
    """(N, L, E) inputs; out.sum() hands the backward a stride-0 grad_out."""
    q, k = randn((3, 30, 24), F32, seed=1), randn((3, 45, 24), F32, seed=2)
    v = randn((3, 45, 20), F32, seed=3)
    check(q, k, v, attn_mask=random_mask((30, 45), "float", F32, seed=4), is_causal=True)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    sdpa_reference(*ref, is_causal=True).sum().backward()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with aigc_ext.use_backend(TRITON):
        aigc_ext.scaled_dot_product_attention(*leaves, is_causal=True).sum().backward()
    for a, r in zip(leaves, ref, strict=True):
        assert max_abs(a.grad.double() - r.grad) <= 1e-5 * max(1.0, max_abs(r.grad))


# ---------------------------------------------------------------------------------------------
# the operator: logsumexp, empty sizes, argument errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["plain", "causal-l>s", "empty-rows", "gqa"])
@pytest.mark.parametrize("dtype", [F32, *([BF16] if ON_GPU else [F16])], ids=_ids)
def test_operator_lse(dtype, case):
    lq, lkv = (70, 30) if case == "causal-l>s" else (30, 70)
    hkv = 1 if case == "gqa" else 2
    q, k, v = make_qkv(2, 2, hkv, lq, lkv, 40, 24, dtype=dtype, seed=3)
    mask, is_causal, scale = None, case.startswith("causal"), 0.19
    if case == "empty-rows":
        mask = random_mask((2, 2, lq, lkv), "bool", dtype, seed=1)
        mask[:, :, ::3] = False
    out, lse = torch.ops.aigc_ext.triton_attention_forward(q, k, v, mask, is_causal, scale)
    assert lse.dtype == F32 and lse.shape == (2, 2, lq)
    ref = torch.logsumexp(scores64(q, k, mask, is_causal, scale), dim=-1)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    assert not torch.isnan(lse).any()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(lse.double()[finite], ref[finite], rtol=2e-5, atol=2e-5)
    if case == "empty-rows":
        assert (out[:, :, ::3] == 0).all()


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("seq", [(0, 7), (7, 0), (0, 0)], ids=_ids)
def test_zero_length(seq, with_mask):
    lq, lkv = seq
    q, k, v = make_qkv(2, 2, 2, lq, lkv, 16, 8)
    mask = random_mask((lq, lkv), "bool", F32) if with_mask else None
    ours, _ = check(q, k, v, attn_mask=mask, is_causal=True)
    assert ours.out.shape == (2, 2, lq, 8)
    for t in (ours.out, *ours.grads):
        assert (t == 0).all()


def test_empty_batch_and_heads():
    q, k, v = make_qkv(0, 2, 2, 9, 11, 16)
    assert check(q, k, v, is_causal=True)[0].out.shape == (0, 2, 9, 16)
    q, k, v = make_qkv(2, 0, 0, 9, 11, 16)
    assert run_ours(TRITON, q, k, v).out.shape == (2, 0, 9, 16)


def test_operator_rejects_bad_arguments():
    op = torch.ops.aigc_ext.triton_attention_forward
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="query must be 4-D"):
        op(q[0], k, v, None, False, 1.0)
    with pytest.raises(ValueError, match="float64"):
        op(q.double(), k.double(), v.double(), None, False, 1.0)
    with pytest.raises(ValueError, match=r"multiple of key/value heads \(3\)"):
        op(q, *make_qkv(1, 3, 3, 8, 8, 16)[1:], None, False, 1.0)
    with pytest.raises(ValueError, match="head dims up to 256"):
        op(*make_qkv(1, 1, 1, 4, 4, 300), None, False, 1.0)
    with pytest.raises(ValueError, match=r"does not broadcast to \(1, 4, 8, 8\)"):
        op(q, k, v, torch.ones(3, 8, dtype=torch.bool, device=DEVICE), False, 1.0)
    with pytest.raises(ValueError, match=r"attn_mask dtype torch\.int64"):
        op(q, k, v, torch.ones(8, 8, dtype=torch.int64, device=DEVICE), False, 1.0)


# ---------------------------------------------------------------------------------------------
# registration and dispatch
# ---------------------------------------------------------------------------------------------


def test_registration():
    rows = {b.name: b for b in aigc_ext.backends()}
    row = rows[TRITON]
    assert row.available and row.reason is None
    if INTERPRETED:  # CPU tensors too, below the C++ kernel
        assert row.devices == ("cuda", "cpu") and row.priority < rows["cpu"].priority
    else:
        assert row.devices == ("cuda",) and row.priority > rows["cpu"].priority
    assert row.priority > rows["reference"].priority


def test_default_choice_on_the_device_under_test():
    """CPU: the C++ kernel stays the default; CUDA: triton is."""
    q, k, v = make_qkv(1, 2, 2, 9, 11, 16)
    aigc_ext.dispatch.backend_usage(reset=True)
    aigc_ext.scaled_dot_product_attention(q, k, v)
    expected = "cpu" if DEVICE == "cpu" else TRITON
    assert aigc_ext.dispatch.backend_usage(reset=True) == {expected: 1}


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("float64", "dtype torch.float64 is not supported"),
        ("dropout", "dropout_p > 0"),
        ("mask-grad", "attn_mask requires grad"),
        ("head-dim", "head dims above 256"),
    ],
)
def test_declined_calls(case, reason):
    """Declined calls: a forced triton backend raises; the dispatcher falls back."""
    dtype = F64 if case == "float64" else F32
    e = 300 if case == "head-dim" else 16
    q, k, v = make_qkv(1, 2, 2, 6, 7, e, dtype=dtype)
    kwargs = {"dropout_p": 0.5 if case == "dropout" else 0.0}
    if case == "mask-grad":
        kwargs["attn_mask"] = torch.zeros(6, 7, device=DEVICE, requires_grad=True)
    with aigc_ext.use_backend(TRITON), pytest.raises(aigc_ext.BackendError, match=reason):
        aigc_ext.scaled_dot_product_attention(q, k, v, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = aigc_ext.scaled_dot_product_attention(q, k, v, **kwargs)
    assert out.shape == (1, 2, 6, v.shape[-1])


def test_unavailable_reason_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setattr(triton_backend, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in triton_backend.unavailable_reason()
    assert triton_backend.devices() == ("cuda",)
    assert triton_backend.priority() > 100


# ---------------------------------------------------------------------------------------------
# autotuning configs
# ---------------------------------------------------------------------------------------------


def test_autotune_config_selection():
    from aigc_ext.backends.triton import kernels

    fwd = kernels.FWD_CONFIGS
    assert len(kernels.select_configs(fwd, 128, 128, False)) >= 4
    for c in kernels.select_configs(fwd, 256, 256, False) + kernels.select_configs(
        fwd, 64, 64, True
    ):
        assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64
    assert len(kernels.select_configs(fwd, 64, 64, False, mode="fast")) == 2
    for configs in (fwd, kernels.DKDV_CONFIGS, kernels.DQ_CONFIGS):
        assert kernels.select_configs(configs, 256, 256, True)  # never empty
        for c in configs:
            assert c.kwargs["BLOCK_M"] in (32, 64, 128) and c.kwargs["BLOCK_N"] in (32, 64, 128)
            assert c.num_warps in (4, 8) and 2 <= c.num_stages <= 4


# ---------------------------------------------------------------------------------------------
# torch.compile, determinism
# ---------------------------------------------------------------------------------------------


def _attention_loss(q, k, v, mask):
    # The backend function itself (what the dispatcher hands the call to): the operators,
    # their fake kernels and autograd are what is under test here.
    out = triton_backend.serve(validate_sdpa_args(q, k, v, mask, 0.0, True, None, True))
    return (out.float() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum()


def test_compile_fullgraph_forward_backward():
    """fullgraph=True forward and backward: on a GPU through the triton_op with inductor; under
    the interpreter through the opaque custom op with aot_eager (tracing Triton kernels with fake
    tensors does not work there)."""
    torch._dynamo.reset()
    dtype = BF16 if ON_GPU else F32
    q, k, v = make_qkv(2, 4, 2, 70, 90, 64, dtype=dtype, seed=5)
    mask = random_mask((2, 1, 1, 90), "bool", dtype, seed=6)
    compiled = torch.compile(
        _attention_loss, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager"
    )
    grads = []
    for fn in (_attention_loss, compiled):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        loss = fn(*leaves, mask)
        loss.backward()
        grads.append([loss.detach(), *(t.grad for t in leaves)])
    # Inductor tunes the kernels again and may pick another config (another summation order).
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == BF16 else {"rtol": 1e-5, "atol": 1e-5}
    for eager, comp in zip(*grads, strict=True):
        torch.testing.assert_close(comp, eager, **tol)


@gpu_only
@pytest.mark.parametrize("dtype", [BF16, F16], ids=_ids)
def test_deterministic(dtype):
    """Two runs are bitwise equal: forward, and backward (no atomics)."""
    q, k, v = make_qkv(2, 8, 2, 1000, 1537, 128, dtype=dtype, seed=9)
    mask = random_mask((2, 1, 1, 1537), "bool", dtype, seed=2)
    grad_out = randn((2, 8, 1000, 128), dtype, seed=3)
    runs = [
        run_ours(
            TRITON, q, k, v, grad_out=grad_out, attn_mask=mask, is_causal=True, enable_gqa=True
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].out, runs[1].out)
    for a, b in zip(runs[0].grads, runs[1].grads, strict=True):
        assert torch.equal(a, b)


@gpu_only
def test_long_sequence_bf16():
    q, k, v = make_qkv(1, 4, 4, 4096, 4096, 128, dtype=BF16, seed=1)
    check(q, k, v, is_causal=True)
    q, k, v = make_qkv(2, 4, 1, 1, 4100, 64, dtype=BF16, seed=2)  # decode-like, GQA
    check(q, k, v, enable_gqa=True)


def test_scale_default_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 1, 1, 20, 30, 40, dtype=F32, seed=4)
    with aigc_ext.use_backend(TRITON):
        a = aigc_ext.scaled_dot_product_attention(q, k, v)
        b = aigc_ext.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(40))
    assert torch.equal(a, b)
