"""The attention contract: fused backends against the float64 reference.

Every comparison uses the error rule of :mod:`sdpa_testing` (FlashAttention's): the error of the
backend in a dtype is at most twice that of ``torch.nn.functional.scaled_dot_product_attention``
in the same dtype, plus 1e-5; float64 runs must match the reference to 1e-10. Outputs and the
gradients of query, key and value (through autograd of the public API) are checked.
"""

from __future__ import annotations

import pytest
import torch
from sdpa_testing import (
    DEVICE,
    causal_keep,
    check_sdpa,
    cpu_isa,
    cpu_kernel,
    make_qkv,
    max_abs,
    randn,
    random_mask,
    run_ours,
    scores64,
)

import aigc_ext
from aigc_ext.backends.reference.ops import attention_forward_reference, sdpa_reference

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
HEAD_DIMS = [16, 32, 59, 64, 111, 128, 256]
SEQ_LENS = [(1, 1), (113, 203), (203, 113)]


def _ids(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return None


causal_param = pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])


# ---------------------------------------------------------------------------------------------
# dtypes, sequence lengths, head dims
# ---------------------------------------------------------------------------------------------


@causal_param
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq", SEQ_LENS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_dtype_seq_head_dim(backend, dtype, seq, head_dim, is_causal):
    q, k, v = make_qkv(2, 2, 2, *seq, head_dim, dtype=dtype, seed=head_dim)
    check_sdpa(backend, q, k, v, is_causal=is_causal)


@causal_param
@pytest.mark.parametrize("head_dim", [16, 59, 128, 256])
@pytest.mark.parametrize("seq", SEQ_LENS, ids=_ids)
def test_float64(backend, seq, head_dim, is_causal):
    q, k, v = make_qkv(2, 2, 2, *seq, head_dim, dtype=F64, seed=head_dim)
    check_sdpa(backend, q, k, v, is_causal=is_causal)


@causal_param
@pytest.mark.parametrize("seq", [(1023, 1024), (2048, 2048)], ids=_ids)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_long_sequences(backend, dtype, seq, is_causal):
    q, k, v = make_qkv(1, 2, 2, *seq, 64, dtype=dtype, seed=7)
    check_sdpa(backend, q, k, v, is_causal=is_causal)


@causal_param
@pytest.mark.parametrize(("e", "ev"), [(64, 32), (32, 80), (59, 111), (128, 16), (16, 256)])
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=_ids)
def test_value_head_dim_differs(backend, dtype, e, ev, is_causal):
    q, k, v = make_qkv(2, 3, 3, 77, 130, e, ev, dtype=dtype, seed=e + ev)
    ours, _ = check_sdpa(backend, q, k, v, is_causal=is_causal)
    assert ours.out.shape == (2, 3, 77, ev)


@pytest.mark.parametrize("scale", [0.5, 1e-3, 0.0, -0.7, 3.0])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_explicit_scale(backend, dtype, scale):
    q, k, v = make_qkv(2, 2, 2, 70, 150, 32, dtype=dtype, seed=3)
    mask = random_mask((70, 150), "float", dtype, seed=4)
    check_sdpa(backend, q, k, v, scale=scale)
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True, scale=scale)


@pytest.mark.parametrize("direction", ["rising", "falling"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_large_logits_across_key_blocks(backend, dtype, direction):
    """Score maxima in late (or early) key blocks exercise the online-softmax rescaling."""
    lq, lkv = 96, 1100
    q, k, v = make_qkv(1, 2, 2, lq, lkv, 64, dtype=dtype, seed=11)
    ramp = torch.linspace(-40.0, 40.0, lkv, device=DEVICE)
    bias = (ramp if direction == "rising" else ramp.flip(0)).to(dtype).expand(lq, lkv)
    check_sdpa(backend, q * 3, k * 3, v, attn_mask=bias)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=_ids)
def test_decode_single_query_long_keys(backend, dtype):
    """One query row against a long key/value sequence (several key blocks), GQA."""
    q, k, v = make_qkv(2, 8, 2, 1, 4100, 64, dtype=dtype, seed=5)
    check_sdpa(backend, q, k, v, enable_gqa=True)
    mask = random_mask((2, 1, 1, 4100), "bool", dtype, seed=6)
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize(("e", "ev"), [(512, 512), (300, 520)])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_large_head_dims(backend, dtype, e, ev):
    q, k, v = make_qkv(1, 2, 2, 40, 70, e, ev, dtype=dtype, seed=e)
    check_sdpa(backend, q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_many_small_heads(backend, dtype):
    q, k, v = make_qkv(16, 16, 16, 7, 9, 8, dtype=dtype, seed=8)
    check_sdpa(backend, q, k, v, is_causal=True)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(backend, threads):
    q, k, v = make_qkv(1, 2, 1, 300, 700, 64, dtype=BF16, seed=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_sdpa(backend, q, k, v, is_causal=True, enable_gqa=True)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_backward_with_broadcast_grad_and_partial_requires_grad(backend, dtype):
    """out.sum() gives a stride-0 grad_out; inputs that do not require grad get none."""
    q, k, v = make_qkv(2, 2, 2, 40, 50, 32, dtype=dtype, seed=10)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    sdpa_reference(*ref, is_causal=True).sum().backward()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with aigc_ext.use_backend(backend):
        aigc_ext.scaled_dot_product_attention(*leaves, is_causal=True).sum().backward()
    tol = 1e-5 if dtype == F32 else 2e-2
    for a, r in zip(leaves, ref, strict=True):
        assert max_abs(a.grad.double() - r.grad) <= tol * max(1.0, max_abs(r.grad))
    q_only = q.detach().requires_grad_()
    with aigc_ext.use_backend(backend):
        out = aigc_ext.scaled_dot_product_attention(q_only, k, v, is_causal=True)
    (grad_q,) = torch.autograd.grad(out.sum(), q_only)
    assert max_abs(grad_q.double() - ref[0].grad) <= tol * max(1.0, max_abs(ref[0].grad))


# ---------------------------------------------------------------------------------------------
# causal masking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq", [(5, 9), (9, 5), (64, 200), (200, 64), (129, 700), (700, 129)], ids=_ids
)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_causal_top_left_alignment(backend, dtype, seq):
    lq, lkv = seq
    q, k, v = make_qkv(2, 2, 2, lq, lkv, 32, dtype=dtype, seed=lq)
    ours, _ = check_sdpa(backend, q, k, v, is_causal=True)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == F32 else {"rtol": 2e-2, "atol": 2e-3}
    # Top-left: query 0 sees key 0 only, whatever L and S are ...
    torch.testing.assert_close(ours.out[:, :, 0], v[:, :, 0], **tol)
    # ... and is_causal equals the bool mask tril(ones(L, S)).
    masked = run_ours(backend, q, k, v, attn_mask=causal_keep(lq, lkv))
    torch.testing.assert_close(ours.out, masked.out, **tol)
    if lq > lkv:  # query rows i >= S - 1 see every key
        full = run_ours(backend, q, k, v)
        torch.testing.assert_close(ours.out[:, :, lkv - 1 :], full.out[:, :, lkv - 1 :], **tol)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------

B, H, L, S = 2, 3, 70, 133
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
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=_ids)
def test_mask(backend, dtype, kind, shape):
    q, k, v = make_qkv(B, H, H, L, S, 48, dtype=dtype, seed=len(shape))
    # (B, 1, L, 1) hides whole query rows; keep most of them
    mask = random_mask(shape, kind, dtype, seed=5, p_keep=0.9 if shape[-1] == 1 else 0.7)
    check_sdpa(backend, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("shape", [(L, S), (B, 1, 1, S), (1, H, L, S)], ids=["LS", "B11S", "1HLS"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=_ids)
def test_mask_with_causal(backend, dtype, kind, shape):
    """attn_mask and is_causal together (an extension: torch takes one or the other)."""
    q, k, v = make_qkv(B, H, H, L, S, 40, dtype=dtype, seed=9)
    mask = random_mask(shape, kind, dtype, seed=6)
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True)


@causal_param
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_key_padding(backend, dtype, kind, is_causal):
    b, h, lq, lkv = 3, 2, 40, 97
    lengths = torch.tensor([97, 60, 1], device=DEVICE)
    keep = torch.arange(lkv, device=DEVICE) < lengths[:, None]  # (B, S)
    mask = keep[:, None, None, :]
    if kind == "float":
        mask = torch.zeros(keep.shape, dtype=dtype, device=DEVICE).masked_fill(~keep, float("-inf"))
        mask = mask[:, None, None, :]
    q, k, v = make_qkv(b, h, h, lq, lkv, 64, dtype=dtype, seed=13)
    ours, _ = check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=is_causal)
    # Padding keys get no gradient.
    for i, n in enumerate(lengths.tolist()):
        assert max_abs(ours.grads[1][i, :, n:]) == 0 and max_abs(ours.grads[2][i, :, n:]) == 0
    # The same as attention over the unpadded keys alone.
    for i, n in enumerate(lengths.tolist()):
        alone = run_ours(
            backend, q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], is_causal=is_causal
        )
        torch.testing.assert_close(ours.out[i : i + 1], alone.out)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=_ids)
def test_fully_masked_rows(backend, dtype, kind):
    """A query row with no visible key yields zeros and zero gradients, never NaN."""
    b, h, lq, lkv = 2, 2, 37, 70
    keep = torch.rand(b, h, lq, lkv, generator=torch.Generator().manual_seed(3)) < 0.7
    keep[:, :, ::5] = False  # some rows of every head
    keep[1, 0] = False  # one whole head
    keep = keep.to(DEVICE)
    mask = keep if kind == "bool" else random_mask(keep.shape, "float", dtype, seed=8)
    if kind == "float":
        mask = mask.masked_fill(~keep, float("-inf"))
    q, k, v = make_qkv(b, h, h, lq, lkv, 32, dtype=dtype, seed=17)
    ours, _ = check_sdpa(backend, q, k, v, attn_mask=mask)
    empty = ~keep.any(-1)
    out, (dq, dk, dv) = ours.out, ours.grads
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    assert (dk[1, 0] == 0).all() and (dv[1, 0] == 0).all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_rows_emptied_by_mask_and_causal(backend, dtype):
    """Causal leaves query 0 key 0 only; a mask hiding that key leaves the row empty."""
    lq, lkv = 20, 30
    keep = torch.ones(lq, lkv, dtype=torch.bool, device=DEVICE)
    keep[0, 0] = False
    keep[5, :6] = False
    q, k, v = make_qkv(1, 2, 2, lq, lkv, 16, dtype=dtype, seed=2)
    ours, _ = check_sdpa(backend, q, k, v, attn_mask=keep, is_causal=True)
    assert (ours.out[:, :, [0, 5]] == 0).all()
    assert (ours.grads[0][:, :, [0, 5]] == 0).all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_rows_hidden_in_first_key_blocks(backend, dtype):
    """Rows whose first visible key lies several key blocks in (S > 1024)."""
    lq, lkv = 64, 1300
    keep = torch.ones(lq, lkv, dtype=torch.bool, device=DEVICE)
    keep[::2, :1100] = False
    q, k, v = make_qkv(1, 2, 2, lq, lkv, 32, dtype=dtype, seed=21)
    check_sdpa(backend, q, k, v, attn_mask=keep)


# ---------------------------------------------------------------------------------------------
# grouped-query attention
# ---------------------------------------------------------------------------------------------


@causal_param
@pytest.mark.parametrize("hkv", [2, 1])
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=_ids)
def test_gqa(backend, dtype, hkv, is_causal):
    q, k, v = make_qkv(2, 8, hkv, 65, 150, 64, dtype=dtype, seed=hkv)
    ours, _ = check_sdpa(backend, q, k, v, is_causal=is_causal, enable_gqa=True)
    assert ours.grads[1].shape == k.shape and ours.grads[2].shape == v.shape


@pytest.mark.parametrize("shape", [(1, 8, 65, 150), (2, 1, 1, 150)], ids=["1HLS", "B11S"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_gqa_with_mask(backend, dtype, kind, shape):
    q, k, v = make_qkv(2, 8, 2, 65, 150, 48, dtype=dtype, seed=4)
    mask = random_mask(shape, kind, dtype, seed=12)
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_single_kv_head_broadcasts_without_gqa(backend, dtype):
    q, k, v = make_qkv(2, 4, 1, 33, 47, 32, dtype=dtype, seed=6)
    check_sdpa(backend, q, k, v)


# ---------------------------------------------------------------------------------------------
# ranks other than 4
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_shape", [None, (45,), (30, 45), (3, 30, 45)], ids=["none", "S", "LS", "NLS"]
)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_3d_inputs(backend, dtype, mask_shape):
    q, k, v = (
        randn((3, 30, 24), dtype, seed=1),
        randn((3, 45, 24), dtype, seed=2),
        randn((3, 45, 20), dtype, seed=3),
    )
    mask = None if mask_shape is None else random_mask(mask_shape, "float", dtype, seed=4)
    check_sdpa(backend, q, k, v, attn_mask=mask)
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_3d_key_value_batch_broadcast(backend, dtype):
    q, k, v = (
        randn((3, 30, 24), dtype, seed=1),
        randn((1, 45, 24), dtype, seed=2),
        randn((1, 45, 24), dtype, seed=3),
    )
    ours, _ = check_sdpa(
        backend, q, k, v, attn_mask=random_mask((3, 30, 45), "bool", dtype, seed=4)
    )
    assert ours.out.shape == (3, 30, 24) and ours.grads[1].shape == (1, 45, 24)


@pytest.mark.parametrize("mask_shape", [None, (40,), (25, 40)], ids=["none", "S", "LS"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=_ids)
def test_2d_inputs(backend, dtype, mask_shape):
    q, k, v = (
        randn((25, 16), dtype, seed=1),
        randn((40, 16), dtype, seed=2),
        randn((40, 8), dtype, seed=3),
    )
    mask = None if mask_shape is None else random_mask(mask_shape, "bool", dtype, seed=4)
    check_sdpa(backend, q, k, v, attn_mask=mask)
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True)


@pytest.mark.parametrize(
    ("kv_lead", "gqa"),
    [((2, 3, 4), False), ((1, 3, 4), False), ((2, 3, 2), True), ((1, 1, 1), False)],
    ids=["same", "broadcast", "gqa", "all-broadcast"],
)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_5d_inputs(backend, dtype, kv_lead, gqa):
    q = randn((2, 3, 4, 21, 16), dtype, seed=1)
    k, v = randn((*kv_lead, 34, 16), dtype, seed=2), randn((*kv_lead, 34, 12), dtype, seed=3)
    mask = random_mask((3, 1, 21, 34), "float", dtype, seed=5)
    check_sdpa(backend, q, k, v, enable_gqa=gqa)
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------
# strided, transposed and expanded inputs
# ---------------------------------------------------------------------------------------------


@causal_param
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=_ids)
def test_transposed_inputs(backend, dtype, is_causal):
    """(B, L, H, E) tensors viewed as (B, H, L, E), as attention layers produce them."""
    q = randn((2, 50, 4, 32), dtype, seed=1).transpose(1, 2)
    k = randn((2, 90, 4, 32), dtype, seed=2).transpose(1, 2)
    v = randn((2, 90, 4, 24), dtype, seed=3).transpose(1, 2)
    assert not q.is_contiguous()
    check_sdpa(backend, q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=_ids)
def test_strided_slices(backend, dtype):
    q = randn((2, 6, 100, 40), dtype, seed=1)[:, ::2, ::2, :32]  # every other head and row
    k = randn((2, 3, 80, 48), dtype, seed=2)[..., 8:40]
    v = randn((3, 3, 80, 40), dtype, seed=3)[1:, ..., :24]
    mask = random_mask((2, 3, 50, 160), "bool", dtype, seed=4)[..., ::2]  # stride 2 on S
    check_sdpa(backend, q, k, v)
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=_ids)
def test_non_contiguous_last_dim(backend, dtype):
    q = randn((2, 2, 32, 50), dtype, seed=1).transpose(-1, -2)  # stride(-1) == 50
    k = randn((2, 2, 32, 60), dtype, seed=2).transpose(-1, -2)
    v = randn((2, 2, 24, 60), dtype, seed=3).transpose(-1, -2)
    mask = random_mask((60, 50), "float", dtype, seed=4).transpose(0, 1)  # stride(-1) == 50
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=_ids)
def test_expanded_batch_and_heads(backend, dtype):
    """Stride-0 batch and head dims (expand) are served as views."""
    q = randn((1, 4, 40, 32), dtype, seed=1).expand(3, 4, 40, 32)
    k = randn((1, 1, 70, 32), dtype, seed=2).expand(3, 4, 70, 32)
    v = randn((3, 1, 70, 16), dtype, seed=3).expand(3, 4, 70, 16)
    mask = random_mask((1, 1, 40, 70), "bool", dtype, seed=4).expand(3, 4, 40, 70)
    ours, _ = check_sdpa(backend, q, k, v, attn_mask=mask)
    assert ours.grads[0].shape == q.shape


@pytest.mark.parametrize("dtype", [F32, F64], ids=_ids)
def test_operator_sequence_stride_below_head_dim(cpu_backend, dtype):
    """A (1, 1, 1, 32) query with strides (32, 32, 1, 1) on the BLAS path (generic ISA): rows
    closer than the head dim must not reach BLAS as a leading dimension."""
    q = randn((1, 1, 32, 1), dtype, seed=1).transpose(-1, -2)
    k, v = randn((1, 1, 4, 32), dtype, seed=2), randn((1, 1, 4, 32), dtype, seed=3)
    with cpu_kernel(isa="default"):
        out, _ = torch.ops.aigc_ext.attention_forward(q, k, v, None, False, 0.2)
    ref, _ = attention_forward_reference(q.double(), k.double(), v.double(), None, False, 0.2)
    torch.testing.assert_close(out.double(), ref)


def _seq_stride_views(dtype):
    yield randn((1, 2, 1, 32), dtype, seed=1).expand(1, 2, 10, 32)  # strides (64, 32, 0, 1)
    yield randn((1, 2, 32, 1), dtype, seed=4).transpose(-1, -2)  # strides (64, 32, 1, 1)


@pytest.mark.parametrize("view", [0, 1], ids=["query-rows-expanded", "query-1-row-stride-1"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=_ids)
def test_sequence_stride_below_head_dim(cpu_backend, dtype, view):
    q = list(_seq_stride_views(dtype))[view]
    k, v = randn((1, 2, 12, 32), dtype, seed=2), randn((1, 2, 12, 32), dtype, seed=3)
    with cpu_kernel(isa="default"):
        check_sdpa(cpu_backend, q, k, v, backward=False)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=_ids)
def test_sequence_stride_below_head_dim_reduced(backend, dtype):
    """Query rows sharing memory, in the dtypes whose GEMMs do not go through BLAS."""
    k, v = randn((1, 2, 12, 32), dtype, seed=2), randn((1, 2, 12, 32), dtype, seed=3)
    for q in _seq_stride_views(dtype):
        check_sdpa(backend, q, k, v)


# ---------------------------------------------------------------------------------------------
# the operator's logsumexp output
# ---------------------------------------------------------------------------------------------

LSE_CASES = [
    "plain",
    "causal",
    "causal-l>s",
    "bool-mask",
    "float-mask",
    "gqa",
    "empty-rows",
    "float32-mask",
]


@pytest.mark.parametrize("case", LSE_CASES)
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=_ids)
def test_operator_lse(dtype, case):
    lq, lkv = (90, 50) if case == "causal-l>s" else (50, 90)
    hkv = 2 if case == "gqa" else 4
    q, k, v = make_qkv(2, 4, hkv, lq, lkv, 40, 24, dtype=dtype, seed=3)
    mask, is_causal, scale = None, case.startswith("causal"), 0.19
    if case == "bool-mask":
        mask = random_mask((2, 1, lq, lkv), "bool", dtype, seed=1)
    elif case == "float-mask":
        mask = random_mask((lq, lkv), "float", dtype, seed=1)
    elif case == "float32-mask":  # the operator also takes float32 masks for any input dtype
        mask = random_mask((lq, lkv), "float", F32, seed=1)
    elif case == "empty-rows":
        mask = random_mask((2, 4, lq, lkv), "bool", dtype, seed=1)
        mask[:, :, ::3] = False
    out, lse = torch.ops.aigc_ext.attention_forward(q, k, v, mask, is_causal, scale)
    assert lse.dtype == (F64 if dtype == F64 else F32)
    assert lse.shape == (2, 4, lq)
    ref = torch.logsumexp(scores64(q, k, mask, is_causal, scale), dim=-1)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    assert not torch.isnan(lse).any()
    finite = torch.isfinite(ref)
    tol = 1e-10 if dtype == F64 else 2e-5
    torch.testing.assert_close(lse.double()[finite], ref[finite], rtol=tol, atol=tol)
    if case == "empty-rows":
        assert (out[:, :, ::3] == 0).all()


# ---------------------------------------------------------------------------------------------
# zero-length sequences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@causal_param
@pytest.mark.parametrize("seq", [(0, 7), (7, 0), (0, 0)], ids=_ids)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_zero_length(backend, dtype, seq, is_causal, with_mask):
    """L = 0 gives an empty output; S = 0 gives zeros (as torch does) and zero gradients."""
    lq, lkv = seq
    q, k, v = make_qkv(2, 3, 3, lq, lkv, 16, 8, dtype=dtype)
    mask = random_mask((lq, lkv), "bool", dtype) if with_mask else None
    ours, _ = check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=is_causal)
    assert ours.out.shape == (2, 3, lq, 8)
    for t, like in zip((ours.out, *ours.grads), (ours.out, q, k, v), strict=True):
        assert t.shape == like.shape and (t == 0).all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_zero_length_operator_lse(dtype):
    q, k, v = make_qkv(2, 3, 3, 5, 0, 16, 8, dtype=dtype)
    out, lse = torch.ops.aigc_ext.attention_forward(q, k, v, None, False, 0.25)
    assert (out == 0).all() and torch.isneginf(lse).all() and lse.shape == (2, 3, 5)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_empty_batch(backend, dtype):
    q, k, v = make_qkv(0, 2, 2, 9, 11, 16, dtype=dtype)
    ours, _ = check_sdpa(backend, q, k, v, is_causal=True)
    assert ours.out.shape == (0, 2, 9, 16)


def test_zero_heads(backend):
    """Zero heads: an empty output as torch gives, or a RuntimeError that names the shapes."""
    q, k, v = make_qkv(2, 0, 0, 9, 11, 16)
    try:
        ours = run_ours(backend, q, k, v)
    except RuntimeError as exc:
        assert "(2, 0, 9, 16)" in str(exc) or "[2, 0, 9, 16]" in str(exc)
    else:
        assert ours.out.shape == (2, 0, 9, 16)


# ---------------------------------------------------------------------------------------------
# CPU kernel variants: instruction sets and the bf16/fp16 GEMM engine
# ---------------------------------------------------------------------------------------------


def _kernel_cases(backend, dtype):
    q, k, v = make_qkv(2, 4, 2, 150, 301, 59, 40, dtype=dtype, seed=1)
    mask = random_mask((2, 1, 150, 301), "float", dtype, seed=2)
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
    q, k, v = make_qkv(1, 2, 2, 113, 203, 128, dtype=dtype, seed=3)
    check_sdpa(backend, q, k, v, attn_mask=random_mask((113, 203), "bool", dtype, seed=4))
    q, k, v = make_qkv(1, 2, 2, 600, 530, 64, dtype=dtype, seed=5)
    check_sdpa(backend, q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=_ids)
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_cpu_isa(cpu_backend, isa, dtype):
    with cpu_isa(isa):
        _kernel_cases(cpu_backend, dtype)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=_ids)
@pytest.mark.parametrize("isa", ["auto", "default"])
def test_cpu_without_brgemm(cpu_backend, isa, dtype):
    with cpu_kernel(isa=isa, use_brgemm=False) as config:
        assert "brgemm=0" in config
        _kernel_cases(cpu_backend, dtype)


@pytest.mark.parametrize("use_amx", [True, False], ids=["amx", "brgemm"])
@pytest.mark.parametrize(
    ("block_q", "block_kv"), [(None, None), (16, 96)], ids=["default", "16x96"]
)
def test_cpu_bf16_gemm_engines(cpu_backend, monkeypatch, use_amx, block_q, block_kv):
    """bf16 forward through the kernel's own AMX tiles (where the CPU has AMX-BF16) and through
    torch's brgemm: ragged query blocks, head dims padded to the tile width, GQA, masks."""
    if block_q is not None:
        monkeypatch.setenv("AIGC_EXT_CPU_BLOCK_Q", str(block_q))
        monkeypatch.setenv("AIGC_EXT_CPU_BLOCK_KV", str(block_kv))
    with cpu_kernel(use_amx=use_amx) as config:
        assert f"amx={int(use_amx)}" in config
        _kernel_cases(cpu_backend, BF16)
        q, k, v = make_qkv(1, 2, 2, 47, 1000, 256, 200, dtype=BF16, seed=6)
        check_sdpa(cpu_backend, q, k, v, is_causal=True)


def test_cpu_amx_then_brgemm_backward(cpu_backend):
    """The AMX forward and torch's brgemm (the bf16 backward) configure the same tile registers:
    alternating them on one thread must keep both correct."""
    q, k, v = make_qkv(1, 2, 2, 130, 140, 64, dtype=BF16, seed=7)
    for _ in range(2):
        check_sdpa(cpu_backend, q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=_ids)
@pytest.mark.parametrize(("block_q", "block_kv"), [(8, 64), (48, 192)], ids=["8x64", "48x192"])
def test_cpu_small_tiles(cpu_backend, monkeypatch, dtype, block_q, block_kv):
    """Forward tile sizes (AIGC_EXT_CPU_BLOCK_Q / _KV, read at each call) that split these
    shapes into many ragged blocks."""
    monkeypatch.setenv("AIGC_EXT_CPU_BLOCK_Q", str(block_q))
    monkeypatch.setenv("AIGC_EXT_CPU_BLOCK_KV", str(block_kv))
    _kernel_cases(cpu_backend, dtype)


def test_cpu_kernel_config_restores(cpu_backend):
    from aigc_ext import ops

    with cpu_kernel(isa="default", use_brgemm=False, use_amx=False) as config:
        assert "isa=default" in config and "brgemm=0" in config and "amx=0" in config
    after = ops.cpu_kernel_config()
    assert "brgemm=1" in after and "amx=1" in after and "isa=" in after
    with pytest.raises(RuntimeError, match="unknown CPU ISA"):
        ops.cpu_kernel_config(isa="sse9")


def test_public_api_matches_between_backends(backend):
    """Sanity: the fused backend and the reference backend agree on a plain float32 call."""
    q, k, v = make_qkv(2, 2, 2, 31, 57, 16, seed=2)
    with aigc_ext.use_backend("reference"):
        ref = aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    with aigc_ext.use_backend(backend):
        out = aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------------------------------------
# short queries against long keys (the split-KV decoding path of the CPU kernel)
# ---------------------------------------------------------------------------------------------

DECODE_CASES = [
    # (B, Hq, Hkv, L, S, E, Ev)
    (1, 32, 8, 1, 3000, 128, 128),  # one group per task, keys in several blocks
    (1, 4, 1, 1, 5000, 64, 64),  # B * Hkv = 1: keys split across tasks
    (2, 6, 2, 4, 1537, 59, 40),  # odd head dims, Ev != E, L > 1
    (1, 2, 2, 16, 700, 111, 111),  # the longest query still served by this path
    (1, 8, 8, 1, 4100, 64, 64),  # one row per task, one split per task: output written in place
    (1, 2, 1, 1, 5000, 64, 48),  # two rows per task (GQA), splits merged, Ev != E
    (3, 4, 4, 1, 1100, 59, 70),  # one row, odd head dims, Ev past a 64-column chunk
    (1, 2, 2, 2, 3000, 100, 100),  # two query rows, no GQA
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=_ids)
def test_decode_shapes(backend, dtype, case):
    b, hq, hkv, lq, lkv, e, ev = case
    q, k, v = make_qkv(b, hq, hkv, lq, lkv, e, ev, dtype=dtype, seed=7)
    check_sdpa(backend, q, k, v, enable_gqa=hq != hkv)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids)
def test_decode_masks_and_causal(backend, dtype, mask_kind):
    q, k, v = make_qkv(1, 8, 2, 3, 2100, 64, dtype=dtype, seed=11)
    mask = random_mask((1, 1, 3, 2100), mask_kind, dtype, seed=5)
    mask[..., 1, :] = False if mask_kind == "bool" else float("-inf")  # a fully masked row
    check_sdpa(backend, q, k, v, attn_mask=mask, enable_gqa=True)
    check_sdpa(backend, q, k, v, is_causal=True, enable_gqa=True)
    check_sdpa(backend, q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)


def test_decode_lse_matches_logsumexp(cpu_backend):
    q, k, v = make_qkv(1, 8, 2, 2, 4100, 64, seed=3)
    mask = random_mask((1, 1, 2, 4100), "bool", torch.float32, seed=9)
    _, lse = torch.ops.aigc_ext.attention_forward(q, k, v, mask, False, 0.125)
    s = scores64(q, k, attn_mask=mask, scale=0.125)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, dim=-1), atol=1e-5, rtol=1e-5)
