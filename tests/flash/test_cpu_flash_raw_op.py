"""The C++ ``flash_forward`` / ``flash_backward`` operators called directly, without the Python
checks in front of them: every malformed index tensor or option is refused by the operator
itself with a message naming the argument, before any kernel reads memory through it."""

from __future__ import annotations

import pytest
import torch

from aigc_ext.backends.cpu import ops  # noqa: F401  (registers the operators)

FWD = torch.ops.aigc_ext.flash_forward
BWD = torch.ops.aigc_ext.flash_backward


def _dense(b=2, lq=5, lk=7, h=4, hkv=2, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, lq, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, lk, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(b, lk, hkv, d, generator=g, dtype=dtype)
    return q, k, v


def _packed(lens=(3, 0, 5), h=4, hkv=2, d=8):
    g = torch.Generator().manual_seed(1)
    t = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(t, h, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g)
    v = torch.randn(t, hkv, d, generator=g)
    return q, k, v, cu, max(lens)


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(RuntimeError, match=match):
        fn(*args, **kwargs)


def test_varlen_cu_seqlens_must_be_valid():
    q, k, v, cu, m = _packed()
    FWD(q, k, v, cu, cu, m, m)  # valid
    bad_order = cu.clone()
    bad_order[2] = 1  # 3, 1: decreasing
    _raises("cu_seqlens_q must be non-decreasing", FWD, q, k, v, bad_order, cu, m, m)
    past_end = cu.clone()
    past_end[-1] = q.shape[0] + 4
    _raises(r"cu_seqlens_k ends at 12 .* only 8 rows", FWD, q, k, v, cu, past_end, m, 100)
    _raises("cu_seqlens_q must start at 0", FWD, q, k, v, cu + 1, cu, m, m)
    _raises("must be int32", FWD, q, k, v, cu.long(), cu, m, m)
    _raises("more than max_seqlen_q", FWD, q, k, v, cu, cu, m - 1, m)
    _raises("must be given together", FWD, q, k, v, cu, None, m, m)
    _raises("cu_seqlens_k must have shape", FWD, q, k, v, cu, cu[:-1], m, m)


def test_kv_cache_arguments_must_stay_inside_the_cache():
    q, k, v = _dense(lq=1, lk=16)
    used = torch.tensor([16, 3], dtype=torch.int32)
    FWD(q, k, v, seqused_k=used)  # valid
    _raises(
        r"seqused_k\[0\] = 17 exceeds the cache's capacity of 16",
        FWD,
        q,
        k,
        v,
        seqused_k=torch.tensor([17, 3], dtype=torch.int32),
    )
    _raises(
        r"leftpad_k\[1\] = 4 must be in \[0, seqused_k\[1\] = 3\]",
        FWD,
        q,
        k,
        v,
        seqused_k=used,
        leftpad_k=torch.tensor([0, 4], dtype=torch.int32),
    )
    _raises(
        r"kv_batch_idx\[1\] = 2 is outside",
        FWD,
        q,
        k,
        v,
        kv_batch_idx=torch.tensor([0, 2], dtype=torch.int32),
    )
    _raises("seqused_k must be int32", FWD, q, k, v, seqused_k=used.long())


def test_block_table_must_point_inside_the_cache():
    q, _, _ = _dense(lq=1)
    pages = torch.randn(6, 4, 2, 8)  # 6 pages of 4 rows
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    used = torch.tensor([12, 9], dtype=torch.int32)
    FWD(q, pages, pages, seqused_k=used, block_table=table)  # valid
    bad = table.clone()
    bad[1, 2] = 6
    _raises(
        r"block_table\[1, 2\] = 6 points outside the cache's 6 pages",
        FWD,
        q,
        pages,
        pages,
        seqused_k=used,
        block_table=bad,
    )
    bad[1, 2] = -1
    _raises(r"block_table\[1, 2\] = -1", FWD, q, pages, pages, seqused_k=used, block_table=bad)
    _raises(
        "exceeds the cache's capacity of 12",
        FWD,
        q,
        pages,
        pages,
        seqused_k=torch.tensor([13, 9], dtype=torch.int32),
        block_table=table,
    )
    _raises(
        "block_table must be int32", FWD, q, pages, pages, seqused_k=used, block_table=table.long()
    )
    # Pages past the used length are never read: a garbage entry there is fine.
    spare = table.clone()
    spare[0, 2] = 99
    FWD(q, pages, pages, seqused_k=torch.tensor([8, 9], dtype=torch.int32), block_table=spare)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window_left": -2}, "window_size"),
        ({"window_right": -5}, "window_size"),
        ({"softcap": -1.0}, "softcap must be >= 0"),
        ({"softcap": float("nan")}, "softcap must be >= 0"),
        ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
        ({"dropout_p": 0.5}, "needs rng_state"),
        (
            {"dropout_p": 0.5, "rng_state": torch.zeros(2, dtype=torch.int32)},
            "rng_state must be int64",
        ),
        ({"alibi_slopes": torch.ones(3)}, "alibi_slopes must have shape"),
        ({"alibi_slopes": torch.ones(4, dtype=torch.float64)}, "alibi_slopes must be float32"),
        ({"sinks": torch.ones(2, 4)}, "sinks must have shape"),
        ({"scale": float("inf")}, "scale must be finite"),
        ({"num_splits": -1}, "num_splits must be >= 0"),
        ({"attn_mask": torch.ones(2, 1, 5, 6, dtype=torch.bool)}, "does not broadcast"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    q, k, v = _dense()
    _raises(match, FWD, q, k, v, **kwargs)


def test_bad_shapes_are_refused():
    q, k, v = _dense()
    _raises("q must be 4-D", FWD, q[0], k, v)
    _raises("heads of q must be a multiple", FWD, q[:, :, :3], k, v)
    _raises("head dims differ", FWD, q[..., :4], k, v)
    _raises("k has dtype", FWD, q, k.double(), v)
    _raises("batch sizes differ", FWD, q, k[:1], v[:1])


def test_backward_checks_out_and_lse():
    q, k, v = _dense()
    out, lse = FWD(q, k, v, scale=0.3)
    g = torch.randn_like(out)
    BWD(g, q, k, v, out, lse, scale=0.3)  # valid
    _raises("lse must be Float of shape", BWD, g, q, k, v, out, lse[:, :, :-1])
    _raises("grad_out must be", BWD, g[:, :-1], q, k, v, out, lse)
    _raises("out must be", BWD, g, q, k, v, out.double(), lse)


def test_a_varlen_tail_past_the_last_sequence_is_zero():
    q, k, v, cu, m = _packed()
    q = torch.cat([q, torch.randn(2, *q.shape[1:])])
    out, lse = FWD(q, k, v, cu, cu, m, m)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    assert torch.isneginf(lse[:, -2:]).all()
