"""``torch.compile(fullgraph=True)`` of every ``aigc_ext.flash_attn_interface`` function.

``aot_eager`` keeps it cheap: it traces through dynamo and AOTAutograd (fake kernels, autograd,
functionalised mutation of the KV cache) without generating code. Each compiled call must equal
the eager one, gradients included.
"""

from __future__ import annotations

import pytest
import torch
from flash_testing import cu_seqlens, rand

from aigc_ext import flash_attn_interface as fa

F32 = torch.float32


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def leaves(*shapes, grad=True):
    return [rand(s, F32, seed=i).requires_grad_(grad) for i, s in enumerate(shapes)]


def same(eager_fn, inputs, *, grad=True):
    """Runs ``eager_fn`` eagerly and compiled on copies of ``inputs`` (after the same
    ``torch.manual_seed``); compares outputs and the gradients of the first output."""
    copies = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    torch.manual_seed(0)
    expected = eager_fn(*inputs)
    fn = compiled(eager_fn)
    torch.manual_seed(0)
    got = fn(*copies)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)
    if grad:
        wrt = [t for t in inputs if t.requires_grad]
        grads_e = torch.autograd.grad(expected[0].sum(), wrt)
        grads_g = torch.autograd.grad(got[0].sum(), [t for t in copies if t.requires_grad])
        for e, g in zip(grads_e, grads_g, strict=True):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=0)


def test_flash_attn_func():
    def fn(q, k, v):
        return fa.flash_attn_func(q, k, v, causal=True, softcap=3.0, window_size=(4, 0),
                                  return_attn_probs=True)  # fmt: skip

    same(fn, leaves((2, 7, 4, 16), (2, 9, 2, 16), (2, 9, 2, 16)))


def test_flash_attn_func_with_dropout_and_alibi():
    slopes = torch.tensor([0.5, 0.25])

    def fn(q, k, v):
        return fa.flash_attn_func(q, k, v, dropout_p=0.2, alibi_slopes=slopes)

    same(fn, leaves((1, 6, 2, 8), (1, 6, 2, 8), (1, 6, 2, 8)))


def test_packed_functions():
    same(lambda qkv: fa.flash_attn_qkvpacked_func(qkv, causal=True), leaves((2, 5, 3, 2, 8)))
    same(lambda q, kv: fa.flash_attn_kvpacked_func(q, kv), leaves((2, 5, 4, 8), (2, 6, 2, 2, 8)))


def test_varlen_functions():
    cq, ck = cu_seqlens([3, 0, 4]), cu_seqlens([2, 5, 1])

    def varlen(q, k, v):
        return fa.flash_attn_varlen_func(q, k, v, cq, ck, 4, 5, causal=True)

    same(varlen, leaves((7, 4, 8), (8, 2, 8), (8, 2, 8)))
    same(
        lambda qkv: fa.flash_attn_varlen_qkvpacked_func(qkv, cq, 4, softcap=2.0),
        leaves((7, 3, 2, 8)),
    )
    same(
        lambda q, kv: fa.flash_attn_varlen_kvpacked_func(q, kv, cq, ck, 4, 5),
        leaves((7, 4, 8), (8, 2, 2, 8)),
    )


@pytest.mark.parametrize("paged", [False, True])
def test_flash_attn_with_kvcache_appends_in_place(paged):
    q, k_new, v_new = leaves((2, 1, 4, 8), (2, 1, 2, 8), (2, 1, 2, 8), grad=False)
    seqlens = torch.tensor([3, 5], dtype=torch.int32)
    cos = torch.rand(8, 2, generator=torch.Generator().manual_seed(1))
    sin = torch.rand(8, 2, generator=torch.Generator().manual_seed(2))
    if paged:
        k_cache, v_cache = torch.zeros(5, 4, 2, 8), torch.zeros(5, 4, 2, 8)
        table = torch.tensor([[4, 0], [2, 3]], dtype=torch.int32)
    else:
        k_cache, v_cache = torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8)
        table = None
    k_cache[:] = rand(k_cache.shape, F32, seed=7)
    v_cache[:] = rand(v_cache.shape, F32, seed=8)
    k2, v2 = k_cache.clone(), v_cache.clone()

    def fn(q, k_cache, v_cache, k_new, v_new):
        return fa.flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cos, sin, seqlens, block_table=table,
            causal=True, return_softmax_lse=True,
        )  # fmt: skip

    expected = fn(q, k_cache, v_cache, k_new, v_new)
    got = compiled(fn)(q, k2, v2, k_new, v_new)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)
    torch.testing.assert_close(k2, k_cache, atol=0, rtol=0)  # the compiled call wrote it too
    torch.testing.assert_close(v2, v_cache, atol=0, rtol=0)
