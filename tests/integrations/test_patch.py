"""aigc_ext.integrations.patch: routing torch.nn.functional.scaled_dot_product_attention to ours."""

from __future__ import annotations

import inspect
import random
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from sdpa_testing import fused_backends
from torch.profiler import ProfilerActivity, profile

import aigc_ext
from aigc_ext.integrations import patch

pytestmark = pytest.mark.skipif(
    "cpu" not in fused_backends("cpu"), reason="the cpu backend is not available"
)

OURS = "aigc_ext::attention_forward"
TORCH_OPS = {
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
    "aten::_native_multi_head_attention",
    "aten::_transformer_encoder_layer_fwd",
}
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
ATOL = RTOL = 1e-5


@pytest.fixture(autouse=True)
def _unpatched(monkeypatch):
    """Each test starts and must end unpatched, with fresh one-time warnings."""
    monkeypatch.setattr(patch, "_warned", set())
    assert not patch.is_enabled()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    yield
    leaked = patch.is_enabled()
    while patch.is_enabled():
        patch.disable()
    assert not leaked, "the test left the patch applied"
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert torch.backends.mha.get_fastpath_enabled()


def _names(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def _x(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------


def test_signature_is_torchs():
    params = inspect.signature(patch.scaled_dot_product_attention).parameters
    assert list(params) == [
        "query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa",
    ]  # fmt: skip
    assert params["scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["enable_gqa"].kind is inspect.Parameter.KEYWORD_ONLY
    q = _x((1, 2, 4, 8))
    with patch.patch_sdpa(), pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, q, q, None, 0.0, False, 0.5)  # torch: keyword-only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_direct_call_routes_to_ours(dtype):
    q, k, v = _x((2, 4, 10, 16), 1, dtype), _x((2, 2, 12, 16), 2, dtype), _x((2, 2, 12, 16), 3)
    v = v.to(dtype)
    mask = torch.rand(10, 12, generator=torch.Generator().manual_seed(4)) < 0.7
    mask[:, 0] = True
    kwargs = {"attn_mask": mask, "is_causal": True, "scale": 0.3, "enable_gqa": True}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, **kwargs)
    expected_grads = torch.autograd.grad(expected.float().sum(), leaves)
    with patch.patch_sdpa():
        assert F.scaled_dot_product_attention is patch.scaled_dot_product_attention
        names = _names(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs))
        got = F.scaled_dot_product_attention(*leaves, **kwargs)
        grads = torch.autograd.grad(got.float().sum(), leaves)
    assert OURS in names and not names & TORCH_OPS
    tol = {"atol": ATOL, "rtol": RTOL} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, expected, **tol)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, **tol)


@pytest.mark.parametrize("mode", ["eval-no-grad", "train-grad"])
def test_multihead_attention_routes_to_ours(mode):
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    mha.train(mode == "train-grad")  # dropout 0: training mode changes nothing but the path
    x = _x((2, 7, 32), 1)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True

    def run():
        with torch.set_grad_enabled(mode == "train-grad"):
            return mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    expected = run()
    assert OURS not in _names(run)
    with patch.patch_sdpa():
        names = _names(run)
        got = run()
    assert OURS in names and not names & TORCH_OPS
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_transformer_encoder_layer_routes_to_ours():
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x = _x((2, 9, 32), 1)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(9)

    def run():
        with torch.no_grad():  # torch's fused C++ fast path unless the patch turns it off
            return layer(x, src_mask=mask, is_causal=True)

    expected = run()
    with patch.patch_sdpa():
        assert not torch.backends.mha.get_fastpath_enabled()
        names = _names(run)
        got = run()
    assert OURS in names and not names & TORCH_OPS
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_compiled_while_patched():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    q = _x((1, 2, 8, 16), 1)
    compiled = torch.compile(fn, fullgraph=True)
    with patch.patch_sdpa():
        assert OURS in _names(lambda: compiled(q, q, q))
        got = compiled(q, q, q)
    assert OURS not in _names(lambda: compiled(q, q, q))  # recompiled for torch's function
    torch.testing.assert_close(got, fn(q, q, q), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# calls ours does not serve: torch's function, with a one-time warning
# ---------------------------------------------------------------------------------------------


def test_dropout_falls_back_to_torch_once():
    q = _x((1, 2, 8, 16), 1)
    with patch.patch_sdpa():
        with pytest.warns(UserWarning, match="dropout_p > 0.*torch's own function"):
            names = _names(lambda: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: no second warning
            torch.manual_seed(3)
            got = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert OURS not in names and "aten::scaled_dot_product_attention" in names
    torch.manual_seed(3)
    torch.testing.assert_close(got, TORCH_SDPA(q, q, q, dropout_p=0.5))  # same random draws


def test_mask_that_requires_grad_falls_back_to_torch():
    q = _x((1, 2, 8, 16), 1)
    mask = _x((8, 8), 2).requires_grad_()
    (expected,) = torch.autograd.grad(TORCH_SDPA(q, q, q, mask).sum(), mask)
    with patch.patch_sdpa(), pytest.warns(UserWarning, match="attn_mask requires grad"):
        (got,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q, mask).sum(), mask)
    torch.testing.assert_close(got, expected)


def test_rejected_arguments_behave_like_torch():
    q = _x((1, 2, 8, 16), 1)
    bad_mask = torch.zeros(8, 8, dtype=torch.float64)  # torch rejects it too
    with pytest.raises(RuntimeError) as torch_error:
        TORCH_SDPA(q, q, q, bad_mask)
    with patch.patch_sdpa(), pytest.warns(UserWarning, match="does not accept"):
        with pytest.raises(RuntimeError) as patched_error:
            F.scaled_dot_product_attention(q, q, q, bad_mask)
    assert str(patched_error.value) == str(torch_error.value)


def test_vmap_falls_back_to_torch():
    q = _x((3, 2, 8, 16), 1)
    expected = torch.vmap(lambda t: TORCH_SDPA(t, t, t))(q)
    with patch.patch_sdpa(), pytest.warns(UserWarning, match=r"torch\.func"):
        got = torch.vmap(lambda t: F.scaled_dot_product_attention(t, t, t))(q)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_forced_backend_is_honoured():
    q = _x((1, 2, 8, 16), 1)
    with patch.patch_sdpa():
        with aigc_ext.use_backend("reference"):
            names = _names(lambda: F.scaled_dot_product_attention(q, q, q))
        assert OURS not in names and not names & TORCH_OPS
        with aigc_ext.use_backend("cpu"), pytest.raises(aigc_ext.BackendError):
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)


# ---------------------------------------------------------------------------------------------
# applying and restoring
# ---------------------------------------------------------------------------------------------


def test_restores_originals_and_fastpath_setting():
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with patch.patch_sdpa():
            assert patch.is_enabled()
        assert F.scaled_dot_product_attention is TORCH_SDPA
        assert not torch.backends.mha.get_fastpath_enabled()  # the caller's setting, kept
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with patch.patch_sdpa():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled()
    assert torch.nn.functional.scaled_dot_product_attention is TORCH_SDPA


def test_exception_inside_block_restores():
    with pytest.raises(KeyError), patch.patch_sdpa():
        raise KeyError("boom")
    assert not patch.is_enabled()


def test_nesting():
    with patch.patch_sdpa():
        with patch.patch_sdpa():
            patch.enable()
            assert F.scaled_dot_product_attention is patch.scaled_dot_product_attention
            patch.disable()
        assert patch.is_enabled()
        assert F.scaled_dot_product_attention is patch.scaled_dot_product_attention
    assert not patch.is_enabled()

    patch.enable()
    patch.enable()
    patch.disable()
    assert patch.is_enabled()
    patch.disable()
    assert not patch.is_enabled()


def test_disable_more_than_enable_raises():
    with pytest.raises(RuntimeError, match="more disable"):
        patch.disable()
    patch.enable()
    patch.disable()
    with pytest.raises(RuntimeError, match="more disable"):
        patch.disable()
    assert not patch.is_enabled()


def test_decorator():
    @patch.patch_sdpa()
    def inside():
        return patch.is_enabled()

    assert inside() and inside()
    assert not patch.is_enabled()


def test_kept_reference_calls_torch_after_restore():
    with patch.patch_sdpa():
        kept = F.scaled_dot_product_attention
    q = _x((1, 2, 8, 16), 1)
    names = _names(lambda: kept(q, q, q))
    assert OURS not in names and "aten::scaled_dot_product_attention" in names


def test_replacement_by_other_code_is_left_in_place():
    def other(*args, **kwargs):
        return TORCH_SDPA(*args, **kwargs)

    patch.enable()
    F.scaled_dot_product_attention = other
    try:
        with pytest.warns(UserWarning, match="leaving that replacement in place"):
            patch.disable()
        assert F.scaled_dot_product_attention is other
    finally:
        F.scaled_dot_product_attention = TORCH_SDPA


def test_threads_entering_and_leaving():
    q = _x((1, 2, 8, 16), 1)
    expected = TORCH_SDPA(q, q, q)
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(seed):
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(20):
                with patch.patch_sdpa():
                    assert F.scaled_dot_product_attention is patch.scaled_dot_product_attention
                    if rng.random() < 0.3:
                        with patch.patch_sdpa():
                            out = F.scaled_dot_product_attention(q, q, q)
                    else:
                        out = F.scaled_dot_product_attention(q, q, q)
                    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
                    assert not torch.backends.mha.get_fastpath_enabled()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not patch.is_enabled()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert torch.backends.mha.get_fastpath_enabled()
