"""Bad input to the FlashAttention operators: a clear error naming the argument, never a read
out of bounds.

Each case is a valid call with one thing broken. It is run through the checks themselves, the
reference, :func:`aigc_ext.flash.ops.flash_attention` (the operator of each backend) and, for
the shape checks, the fake kernels on meta tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from flash_testing import cu_seqlens, flash_backends, rand

from aigc_ext.flash import ops
from aigc_ext.flash.checks import (
    FlashArgumentError,
    FlashTypeError,
    check_flash_backward,
    check_flash_forward,
)
from aigc_ext.flash.reference import flash_reference
from aigc_ext.validation import AttentionArgumentError

I32 = torch.int32
BACKENDS = flash_backends()


def dense():
    return {"q": rand((2, 5, 4, 8)), "k": rand((2, 6, 2, 8)), "v": rand((2, 6, 2, 8))}


def varlen():
    return {
        "q": rand((7, 4, 8)),
        "k": rand((9, 2, 8)),
        "v": rand((9, 2, 8)),
        "cu_seqlens_q": cu_seqlens([3, 4]),
        "cu_seqlens_k": cu_seqlens([4, 5]),
        "max_seqlen_q": 4,
        "max_seqlen_k": 5,
    }


def cache():
    return {
        "q": rand((2, 1, 4, 8)),
        "k": rand((3, 10, 2, 8)),
        "v": rand((3, 10, 2, 8)),
        "seqused_k": torch.tensor([4, 10], dtype=I32),
        "leftpad_k": torch.tensor([1, 0], dtype=I32),
        "kv_batch_idx": torch.tensor([2, 0], dtype=I32),
    }


def paged():
    return {
        "q": rand((2, 1, 4, 8)),
        "k": rand((5, 4, 2, 8)),
        "v": rand((5, 4, 2, 8)),
        "seqused_k": torch.tensor([6, 3], dtype=I32),
        "block_table": torch.tensor([[3, 1], [0, 4]], dtype=I32),
    }


def change(base, **updates):
    def build():
        args = base()
        args.update({k: (v(args) if callable(v) else v) for k, v in updates.items()})
        return args

    return build


# id -> (valid call with one thing broken, error class, the argument the message must name,
#        whether the error is found without reading values)
CASES = {
    # cu_seqlens: values
    "cu_seqlens_not_increasing": (
        change(varlen, cu_seqlens_q=torch.tensor([0, 5, 3], dtype=I32)),
        FlashArgumentError, "cu_seqlens_q", False,
    ),
    "cu_seqlens_not_from_zero": (
        change(varlen, cu_seqlens_k=torch.tensor([1, 4, 9], dtype=I32)),
        FlashArgumentError, "cu_seqlens_k", False,
    ),
    "cu_seqlens_past_packed_q": (
        change(varlen, cu_seqlens_q=torch.tensor([0, 3, 8], dtype=I32)),
        FlashArgumentError, "cu_seqlens_q", False,
    ),
    "cu_seqlens_past_packed_k": (
        change(varlen, cu_seqlens_k=torch.tensor([0, 5, 10], dtype=I32)),
        FlashArgumentError, "cu_seqlens_k", False,
    ),
    "sequence_longer_than_max_seqlen": (
        change(varlen, max_seqlen_k=4), FlashArgumentError, "max_seqlen_k", False,
    ),
    # cu_seqlens: shapes and dtypes
    "cu_seqlens_int64": (
        change(varlen, cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()),
        FlashTypeError, "cu_seqlens_q", True,
    ),
    "cu_seqlens_2d": (
        change(varlen, cu_seqlens_k=lambda a: a["cu_seqlens_k"].view(1, -1)),
        FlashArgumentError, "cu_seqlens_k", True,
    ),
    "cu_seqlens_different_batches": (
        change(varlen, cu_seqlens_k=cu_seqlens([4, 5, 0])),
        FlashArgumentError, "cu_seqlens_k", True,
    ),
    "cu_seqlens_q_alone": (
        change(varlen, cu_seqlens_k=None), FlashArgumentError, "cu_seqlens_k", True,
    ),
    "varlen_q_not_3d": (
        change(varlen, q=rand((1, 7, 4, 8))), FlashArgumentError, "q", True,
    ),
    # KV cache: values
    "seqused_k_larger_than_cache": (
        change(cache, seqused_k=torch.tensor([4, 11], dtype=I32)),
        FlashArgumentError, "seqused_k", False,
    ),
    "seqused_k_below_leftpad": (
        change(cache, seqused_k=torch.tensor([0, 10], dtype=I32)),
        FlashArgumentError, "leftpad_k", False,
    ),
    "leftpad_negative": (
        change(cache, leftpad_k=torch.tensor([-1, 0], dtype=I32)),
        FlashArgumentError, "leftpad_k", False,
    ),
    "kv_batch_idx_out_of_range": (
        change(cache, kv_batch_idx=torch.tensor([3, 0], dtype=I32)),
        FlashArgumentError, "kv_batch_idx", False,
    ),
    "kv_batch_idx_negative": (
        change(cache, kv_batch_idx=torch.tensor([0, -1], dtype=I32)),
        FlashArgumentError, "kv_batch_idx", False,
    ),
    "block_table_past_the_cache": (
        change(paged, block_table=torch.tensor([[3, 5], [0, 4]], dtype=I32)),
        FlashArgumentError, "block_table", False,
    ),
    "block_table_negative": (
        change(paged, block_table=torch.tensor([[3, 1], [-1, 4]], dtype=I32)),
        FlashArgumentError, "block_table", False,
    ),
    "seqused_k_larger_than_pages": (
        change(paged, seqused_k=torch.tensor([6, 9], dtype=I32)),
        FlashArgumentError, "seqused_k", False,
    ),
    # KV cache: shapes and dtypes
    "seqused_k_int64": (
        change(cache, seqused_k=lambda a: a["seqused_k"].long()),
        FlashTypeError, "seqused_k", True,
    ),
    "leftpad_k_float": (
        change(cache, leftpad_k=lambda a: a["leftpad_k"].float()),
        FlashTypeError, "leftpad_k", True,
    ),
    "kv_batch_idx_int64": (
        change(cache, kv_batch_idx=lambda a: a["kv_batch_idx"].long()),
        FlashTypeError, "kv_batch_idx", True,
    ),
    "block_table_int64": (
        change(paged, block_table=lambda a: a["block_table"].long()),
        FlashTypeError, "block_table", True,
    ),
    "block_table_wrong_batch": (
        change(paged, block_table=torch.zeros((3, 2), dtype=I32)),
        FlashArgumentError, "block_table", True,
    ),
    "seqused_k_wrong_shape": (
        change(cache, seqused_k=torch.tensor([4, 10, 2], dtype=I32)),
        FlashArgumentError, "seqused_k", True,
    ),
    "kv_batch_idx_with_block_table": (
        change(paged, kv_batch_idx=torch.tensor([0, 1], dtype=I32)),
        FlashArgumentError, "kv_batch_idx", True,
    ),
    "cache_batch_without_index": (
        change(cache, kv_batch_idx=None), FlashArgumentError, "batch", True,
    ),
    "cache_with_varlen": (
        change(varlen, seqused_k=torch.tensor([2, 3], dtype=I32)),
        FlashArgumentError, "seqused_k", True,
    ),
    "block_table_with_varlen": (
        change(varlen, block_table=torch.zeros((2, 1), dtype=I32)),
        FlashArgumentError, "block_table", True,
    ),
    # attn_mask
    "mask_with_varlen": (
        change(varlen, attn_mask=torch.ones(7, 9, dtype=torch.bool)),
        FlashArgumentError, "attn_mask", True,
    ),
    "mask_with_cache": (
        change(cache, attn_mask=torch.ones(1, 10, dtype=torch.bool)),
        FlashArgumentError, "attn_mask", True,
    ),
    "mask_not_broadcasting": (
        change(dense, attn_mask=torch.ones(5, 5, dtype=torch.bool)),
        FlashArgumentError, "attn_mask", True,
    ),
    "mask_int": (
        change(dense, attn_mask=torch.ones(5, 6, dtype=torch.int32)),
        FlashTypeError, "attn_mask", True,
    ),
    # scalar options
    "window_left_below_minus_one": (
        change(dense, window_left=-2), FlashArgumentError, "window_left", True,
    ),
    "window_right_below_minus_one": (
        change(dense, window_right=-5), FlashArgumentError, "window_right", True,
    ),
    "softcap_negative": (change(dense, softcap=-1.0), FlashArgumentError, "softcap", True),
    "softcap_nan": (change(dense, softcap=math.nan), FlashArgumentError, "softcap", True),
    "dropout_one": (
        change(dense, dropout_p=1.0, rng_state=torch.tensor([1, 2])),
        FlashArgumentError, "dropout_p", True,
    ),
    "dropout_negative": (change(dense, dropout_p=-0.1), FlashArgumentError, "dropout_p", True),
    "scale_inf": (change(dense, scale=math.inf), FlashArgumentError, "scale", True),
    "num_splits_negative": (
        change(dense, num_splits=-1), FlashArgumentError, "num_splits", True,
    ),
    "max_seqlen_negative": (
        change(varlen, max_seqlen_q=-1), FlashArgumentError, "max_seqlen_q", True,
    ),
    # dropout state, ALiBi, sinks
    "dropout_without_rng_state": (
        change(dense, dropout_p=0.1), FlashArgumentError, "rng_state", True,
    ),
    "rng_state_int32": (
        change(dense, dropout_p=0.1, rng_state=torch.tensor([1, 2], dtype=I32)),
        FlashTypeError, "rng_state", True,
    ),
    "rng_state_three_values": (
        change(dense, dropout_p=0.1, rng_state=torch.tensor([1, 2, 3])),
        FlashArgumentError, "rng_state", True,
    ),
    "alibi_float16": (
        change(dense, alibi_slopes=torch.ones(4, dtype=torch.float16)),
        FlashTypeError, "alibi_slopes", True,
    ),
    "alibi_wrong_heads": (
        change(dense, alibi_slopes=torch.ones(3)), FlashArgumentError, "alibi_slopes", True,
    ),
    "alibi_wrong_batch": (
        change(dense, alibi_slopes=torch.ones(3, 4)), FlashArgumentError, "alibi_slopes", True,
    ),
    "sinks_wrong_shape": (
        change(dense, sinks=torch.ones(2, 4)), FlashArgumentError, "sinks", True,
    ),
    "sinks_float16": (
        change(dense, sinks=torch.ones(4, dtype=torch.float16)), FlashTypeError, "sinks", True,
    ),
    # q, k, v
    "dtypes_differ": (
        change(dense, k=lambda a: a["k"].float()), FlashTypeError, "same dtype", True,
    ),
    "integer_inputs": (
        change(dense, q=lambda a: a["q"].long(), k=lambda a: a["k"].long(),
               v=lambda a: a["v"].long()),
        FlashTypeError, "q", True,
    ),
    "head_dim_over_256": (
        change(dense, q=rand((2, 5, 4, 264)), k=rand((2, 6, 2, 264)), v=rand((2, 6, 2, 264))),
        FlashArgumentError, "head dim", True,
    ),
    "head_dims_of_q_and_k_differ": (
        change(dense, k=rand((2, 6, 2, 7))), FlashArgumentError, "head dim", True,
    ),
    "heads_not_a_multiple": (
        change(dense, k=rand((2, 6, 3, 8)), v=rand((2, 6, 3, 8))),
        FlashArgumentError, "multiple", True,
    ),
    "k_and_v_lengths_differ": (
        change(dense, v=rand((2, 7, 2, 8))), FlashArgumentError, "k and v", True,
    ),
    "batch_sizes_differ": (
        change(dense, k=rand((3, 6, 2, 8)), v=rand((3, 6, 2, 8))),
        FlashArgumentError, "batch", True,
    ),
    "q_not_4d": (change(dense, q=rand((5, 4, 8))), FlashArgumentError, "q must be 4-D", True),
    "last_dim_not_contiguous": (
        change(dense, q=lambda a: rand((2, 5, 4, 16))[..., ::2]),
        FlashArgumentError, "contiguous", True,
    ),
    "not_a_tensor": (change(dense, v=[1.0]), FlashTypeError, "v must be a Tensor", True),
}  # fmt: skip


def _meta(args):
    """The arguments as meta tensors of the same shapes and strides (no values)."""
    return {
        k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
        if isinstance(v, torch.Tensor)
        else v
        for k, v in args.items()
    }


def _call(fn, args, **extra):
    args = dict(args)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return fn(q, k, v, **args, **extra)


def _expect(case, fn, **extra):
    build, cls, name, _ = CASES[case]
    with pytest.raises(cls, match=name) as info:
        _call(fn, build(), **extra)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AttentionArgumentError)
    return info.value


@pytest.mark.parametrize("case", CASES)
def test_checks_name_the_argument(case):
    _expect(case, check_flash_forward)


@pytest.mark.parametrize("case", CASES)
def test_the_reference_rejects_it(case):
    _expect(case, flash_reference)


@pytest.mark.parametrize("backend", BACKENDS)
# (flash_attention draws a missing rng_state, and copies q, k, v to a contiguous last dim)
@pytest.mark.parametrize(
    "case", [c for c in CASES if c not in ("dropout_without_rng_state", "last_dim_not_contiguous")]
)
def test_flash_attention_rejects_it(case, backend):
    _expect(case, ops.flash_attention, backend=backend)


# What an operator accepts beyond the contract, called directly: the C++ operator copies q, k,
# v to a contiguous last dim and takes head dims above 256.
BEYOND_THE_CONTRACT = {"cpu": {"last_dim_not_contiguous", "head_dim_over_256"}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c, s in CASES.items() if s[3] and c != "not_a_tensor"])
def test_operators_reject_it_without_the_entry_point(case, backend):
    """Called directly, every operator refuses the shape errors too: with its own checks (the
    C++ operator words them itself) and, on meta tensors, with the fake kernel's."""
    build, cls, name, _ = CASES[case]
    op = getattr(torch.ops.aigc_ext, ops.BACKEND_OPERATORS[backend][0])
    if case not in BEYOND_THE_CONTRACT.get(backend, ()):
        with pytest.raises((ValueError, RuntimeError)):
            _call(op, build())
    with pytest.raises(cls, match=name):
        _call(op, _meta(build()))


def test_flash_attention_draws_the_missing_rng_state():
    args = CASES["dropout_without_rng_state"][0]()
    torch.manual_seed(0)
    first, _ = _call(ops.flash_attention, args, backend="reference")
    torch.manual_seed(0)
    again, _ = _call(ops.flash_attention, args, backend="reference")
    other, _ = _call(ops.flash_attention, args, backend="reference")
    assert torch.equal(first, again) and not torch.equal(first, other)


# (a list where a Tensor is due is refused by the operator's schema, before any kernel)
@pytest.mark.parametrize("case", [c for c, s in CASES.items() if s[3] and c != "not_a_tensor"])
def test_fake_kernels_reject_shape_errors(case):
    """The fake kernels (meta tensors: no values) run the same shape checks."""
    build, cls, name, _ = CASES[case]
    args = _meta(build())
    op = torch.ops.aigc_ext.flash_reference_forward
    with pytest.raises(cls, match=name):
        _call(op, args)


def test_values_are_not_read_on_meta_or_when_told_not_to():
    args = CASES["block_table_past_the_cache"][0]()
    _call(check_flash_forward, args, check_values=False)  # passes: values unread
    layout = _call(check_flash_forward, _meta(args))
    assert layout.paged and layout.out_shape == (2, 1, 4, 8)


def test_backward_checks_out_lse_and_grad_out():
    args = dense()
    q, k, v = args["q"], args["k"], args["v"]
    out, lse = flash_reference(q, k, v)
    check_flash_backward(out, q, k, v, out, lse)
    with pytest.raises(FlashArgumentError, match="lse must have shape"):
        check_flash_backward(out, q, k, v, out, lse[:, :, :3])
    with pytest.raises(FlashTypeError, match=r"lse must be torch\.float64"):
        check_flash_backward(out, q, k, v, out, lse.float())
    with pytest.raises(FlashArgumentError, match="grad_out must have the output's shape"):
        check_flash_backward(out[:1], q, k, v, out, lse)
    with pytest.raises(FlashTypeError, match="out must have the dtype"):
        check_flash_backward(out, q, k, v, out.float(), lse)


def test_messages_show_the_shapes_and_values():
    err = _expect("block_table_past_the_cache", check_flash_forward)
    assert "[0, 5)" in str(err) and "(5, 4, 2, 8)" in str(err) and "[3, 5]" in str(err)
    err = _expect("cu_seqlens_not_increasing", check_flash_forward)
    assert "[0, 5, 3]" in str(err)
    err = _expect("seqused_k_larger_than_cache", check_flash_forward)
    assert "11" in str(err) and "10" in str(err)
