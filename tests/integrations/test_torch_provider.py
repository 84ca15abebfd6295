"""aigc_ext.integrations.torch_provider: aigc_ext behind torch's flash SDPA operators.

Each test shows with the profiler that our operator served the call (or, for fallbacks, that it
did not), compares forward and backward with torch's own kernels (the provider restored), and
leaves the provider restored (fixture ``provider`` and the autouse leak check).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from sdpa_testing import fused_backends
from torch.nn.attention import (
    activate_flash_attention_impl,
    current_flash_attention_impl,
    list_flash_attention_impls,
    restore_flash_attention_impl,
)
from torch.nn.functional import scaled_dot_product_attention as sdpa_bound_at_import
from torch.profiler import ProfilerActivity, profile

import aigc_ext  # noqa: F401  (registers the provider)
from aigc_ext.integrations import torch_provider as tp

pytestmark = pytest.mark.skipif(
    "cpu" not in fused_backends("cpu"), reason="the cpu backend is not available"
)

OURS = "aigc_ext::attention_forward"
OURS_BWD = "aigc_ext::attention_backward"
FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.fixture(autouse=True)
def _restored():
    """Each test starts and must end with torch's own kernels, and with fresh counters."""
    assert current_flash_attention_impl() is None and not tp.is_active()
    tp.usage(reset=True)
    yield
    leaked = tp.is_active()
    tp.restore()
    assert not leaked, "the test left the provider active"
    assert current_flash_attention_impl() is None


@pytest.fixture
def provider():
    """The provider activated through torch's registry; restored however the test ends."""
    activate_flash_attention_impl(tp.IMPL_NAME)
    try:
        yield tp
    finally:
        restore_flash_attention_impl()


def _profiled(fn):
    """``fn()`` and the names of the operators it ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


def _x(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _blhe(b, h, length, e, seed, dtype=torch.float32):
    """(B, H, L, E) views of (B, L, H, E) memory, the layout transformers and MHA produce."""
    return _x((b, length, h, e), seed, dtype).transpose(1, 2)


def _forward_backward(fn, *inputs):
    """``fn(*leaves)`` and the gradients of the leaves (copies of ``inputs``) for a fixed
    random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grad = _x(out.shape, 99, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), grads


def _assert_close_all(got, expected, tol):
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **tol)


def _our_kernel_is_registered() -> bool:
    return "torch_provider.py" in torch._C._dispatch_dump("aten::" + tp._CPU_FWD)


# --- registration, activation, restore ---------------------------------------------------------


def test_import_registers_without_activating():
    assert tp.IMPL_NAME in list_flash_attention_impls()
    assert current_flash_attention_impl() is None
    assert not _our_kernel_is_registered()
    q = _x((1, 2, 4, 8))
    _, names = _profiled(lambda: F.scaled_dot_product_attention(q, q, q))
    assert OURS not in names and "aten::_scaled_dot_product_flash_attention_for_cpu" in names


def test_activate_and_restore_swap_the_kernels():
    q = _x((1, 2, 4, 8))
    activate_flash_attention_impl(tp.IMPL_NAME)
    try:
        assert current_flash_attention_impl() == tp.IMPL_NAME and tp.is_active()
        assert _our_kernel_is_registered()
        activate_flash_attention_impl(tp.IMPL_NAME)  # again: torch restores ours first
        assert _our_kernel_is_registered()
        _, names = _profiled(lambda: F.scaled_dot_product_attention(q, q, q))
        assert OURS in names
        assert tp.usage()[tp._CPU_FWD] == {tp.IMPL_NAME: 1}  # one override, not two stacked
    finally:
        restore_flash_attention_impl()
    assert not tp.is_active() and not _our_kernel_is_registered()
    _, names = _profiled(lambda: F.scaled_dot_product_attention(q, q, q))
    assert OURS not in names and "aten::_scaled_dot_product_flash_attention_for_cpu" in names


def test_activated_block_restores_when_it_raises():
    with pytest.raises(KeyError), tp.activated():
        assert current_flash_attention_impl() == tp.IMPL_NAME
        raise KeyError("boom")
    assert not tp.is_active() and not _our_kernel_is_registered()


@pytest.mark.parametrize("value", ["1", "0"])
def test_environment_variable_activates_at_import(value):
    code = textwrap.dedent(
        """
        import torch
        import aigc_ext
        from aigc_ext.integrations import torch_provider as tp
        from torch.nn.attention import current_flash_attention_impl
        q = torch.randn(1, 2, 4, 8)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        print(current_flash_attention_impl(), tp.usage().get(tp._CPU_FWD))
        """
    )
    env = {**os.environ, tp.ENV_ACTIVATE: value}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == ("aigc_ext {'aigc_ext': 1}" if value == "1" else "None None")


# --- the CPU flash operator: callers, numerics, layouts ---------------------------------------


CASES = {
    "plain": {},
    "causal-gqa": {"is_causal": True, "enable_gqa": True},
    "bool-mask-gqa": {"mask": "bool", "enable_gqa": True, "scale": 0.3},
    "float-mask-causal": {"mask": "float", "is_causal": True},
}


def _case(name, dtype):
    kwargs = dict(CASES[name])
    heads_kv = 2 if kwargs.get("enable_gqa") else 4
    q = _blhe(2, 4, 6, 16, 1, dtype)
    k, v = _blhe(2, heads_kv, 9, 16, 2, dtype), _blhe(2, heads_kv, 9, 16, 3, dtype)
    mask = kwargs.pop("mask", None)
    if mask == "bool":
        kwargs["attn_mask"] = _x((2, 1, 6, 9), 4) > -0.8
        kwargs["attn_mask"][0, 0, 2] = False  # a row with no visible key: zeros
    elif mask == "float":
        kwargs["attn_mask"] = _x((6, 9), 4, dtype)
    return (q, k, v), kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_function_bound_before_activation_runs_our_kernel(provider, name, dtype):
    inputs, kwargs = _case(name, dtype)

    def fn(q, k, v):
        return sdpa_bound_at_import(q, k, v, **kwargs)

    (out, grads), names = _profiled(lambda: _forward_backward(fn, *inputs))
    assert {OURS, OURS_BWD} <= names
    provider.restore()
    (ref, ref_grads), names = _profiled(lambda: _forward_backward(fn, *inputs))
    assert not names & {OURS, OURS_BWD}
    _assert_close_all((out, *grads), (ref, *ref_grads), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_operator_outputs_match_torchs_layouts_and_logsumexp(dtype):
    q, k, v = _blhe(2, 4, 5, 8, 1, dtype), _blhe(2, 2, 7, 8, 2, dtype), _blhe(2, 2, 7, 8, 3, dtype)
    mask = torch.zeros(2, 1, 5, 7, dtype=dtype)
    mask[0, :, 1] = float("-inf")  # row 1 of batch 0 sees no key
    ref_out, ref_lse = FLASH(q, k, v, 0.0, True, attn_mask=mask)
    grad = _x(ref_out.shape, 5, dtype)
    ref_grads = FLASH_BWD(grad, q, k, v, ref_out, ref_lse, 0.0, True, attn_mask=mask)
    with tp.activated():
        (out, lse), names = _profiled(lambda: FLASH(q, k, v, 0.0, True, attn_mask=mask))
        grads = FLASH_BWD(grad, q, k, v, out, lse, 0.0, True, attn_mask=mask)
        # Our backward on torch's forward results (activated between forward and backward).
        grads_on_torch_fwd = FLASH_BWD(grad, q, k, v, ref_out, ref_lse, 0.0, True, attn_mask=mask)
    assert OURS in names
    # Torch's backward on our forward results (restored between forward and backward).
    torch_on_our_fwd = FLASH_BWD(grad, q, k, v, out, lse, 0.0, True, attn_mask=mask)
    assert tp.usage()[tp._CPU_BWD] == {tp.IMPL_NAME: 2}
    assert out.stride() == ref_out.stride() and out.dtype == ref_out.dtype
    assert lse.shape == ref_lse.shape and lse.stride() == ref_lse.stride()
    assert (
        lse.dtype == ref_lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    )
    assert lse[0, :, 1].eq(0).all() and out[0, :, 1].eq(0).all()  # torch's convention
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(
        lse, ref_lse, **TOL[torch.float32 if dtype != torch.float64 else dtype]
    )
    for got in (grads, grads_on_torch_fwd, torch_on_our_fwd):
        assert [g.stride() for g in got] == [g.stride() for g in ref_grads]
        _assert_close_all(got, ref_grads, tol)


def test_fallback_runs_torchs_kernel(provider, monkeypatch):
    """A call our kernel declines is computed by torch's captured kernel, unchanged."""
    q, k, v = _x((2, 3, 5, 8), 1), _x((2, 3, 6, 8), 2), _x((2, 3, 6, 8), 3)
    monkeypatch.setattr(tp, "_cpu_flash_reason", lambda *args: "declined for the test")
    (out, grads), names = _profiled(
        lambda: _forward_backward(F.scaled_dot_product_attention, q, k, v)
    )
    assert not names & {OURS, OURS_BWD}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert tp.usage() == {
        tp._CPU_FWD: {"torch: declined for the test": 1},
        tp._CPU_BWD: {"torch: declined for the test": 1},
    }
    provider.restore()
    ref, ref_grads = _forward_backward(F.scaled_dot_product_attention, q, k, v)
    _assert_close_all((out, *grads), (ref, *ref_grads), {"atol": 0, "rtol": 0})  # torch's own


def test_calls_outside_our_contract_get_torchs_behaviour(provider):
    q = _x((1, 2, 4, 8))
    with pytest.raises(RuntimeError, match="do not support dropout"):  # torch's own error
        FLASH(q, q, q, 0.5, False)
    with pytest.raises(RuntimeError, match="same data type as query"):  # a bool mask
        FLASH(q, q, q, 0.0, False, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    empty = _x((1, 2, 4, 0))  # head dim 0: torch's kernel serves it
    out, lse = FLASH(empty, empty, empty, 0.0, False)
    provider.restore()
    ref_out, ref_lse = FLASH(empty, empty, empty, 0.0, False)
    assert out.shape == ref_out.shape and torch.equal(lse, ref_lse)
    assert set(tp.usage()[tp._CPU_FWD]) == {
        "torch: dropout_p > 0",
        "torch: attn_mask dtype torch.bool",
        "torch: head dims differ or are 0",
    }


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 4, 5, 8), (1, 4, 6, 8), (1, 4, 6, 8)), "batch sizes differ"),
        (((2, 4, 5, 8), (2, 2, 6, 8), (2, 4, 6, 8)), "key and value head counts differ"),
        (((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 7, 8)), "key and value sequence lengths differ"),
        (((2, 3, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8)), "multiple of key/value heads"),
    ],
)
def test_shapes_torchs_kernel_does_not_check_raise(provider, shapes, message):
    """Torch's CPU flash kernel accepts these and reads out of bounds; ours names the shapes."""
    q, k, v = (_x(s, i) for i, s in enumerate(shapes))
    with pytest.raises(ValueError, match=message) as info:
        FLASH(q, k, v, 0.0, False)
    assert str(tuple(q.shape)) in str(info.value) and str(tuple(v.shape)) in str(info.value)


def test_empty_sequences_are_served():
    """Torch's CPU flash kernel dies with SIGFPE on L = 0 or S = 0 (F.sdpa never sends it
    those); ours returns the empty output and zeros, as torch's math path does."""
    q, k = _blhe(1, 2, 3, 8, 1), _x((1, 2, 0, 8))
    with tp.activated():
        out, lse = FLASH(q, k, k, 0.0, False)
        empty_out, empty_lse = FLASH(k, q, q, 0.0, False)
    assert out.eq(0).all() and lse.eq(0).all() and out.stride() == torch.empty_like(q).stride()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, k))  # math path
    assert empty_out.shape == (1, 2, 0, 8) and empty_lse.shape == (1, 2, 0)


# --- other callers --------------------------------------------------------------------------


def test_multihead_attention_training_path(provider):
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)  # training mode: F.sdpa
    x = _x((2, 7, 32), 1)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True

    def run(x):
        return mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    (out, grads), names = _profiled(lambda: _forward_backward(run, x))
    assert {OURS, OURS_BWD} <= names
    provider.restore()
    ref, ref_grads = _forward_backward(run, x)
    _assert_close_all((out, *grads), (ref, *ref_grads), TOL[torch.float32])


@pytest.mark.parametrize("padding", [False, True])
def test_multihead_attention_fast_path(provider, padding):
    """Eval mode without autograd: torch's C++ fast path (aten::_native_multi_head_attention),
    which computes its attention without the flash operator, is served by our kernel."""
    assert torch.backends.mha.get_fastpath_enabled()
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = _x((3, 7, 32), 1)
    kpm = None
    if padding:
        kpm = torch.zeros(3, 7, dtype=torch.bool)
        kpm[1, 5:] = True

    def run():
        with torch.no_grad():
            return mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    def run_with_weights():
        with torch.no_grad():
            return mha(x, x, x, key_padding_mask=kpm)  # need_weights=True

    out, names = _profiled(run)
    assert OURS in names and "aten::_native_multi_head_attention" in names
    assert tp.usage()[tp._CPU_MHA] == {tp.IMPL_NAME: 1}
    weights_out, names = _profiled(run_with_weights)
    assert OURS not in names and "aten::_native_multi_head_attention" in names
    assert tp.usage()[tp._CPU_MHA]["torch: " + tp._mha_reason(x, x, x, 32, 4, (), True)] == 1
    provider.restore()
    torch.testing.assert_close(out, run(), **TOL[torch.float32])
    ref_out, ref_weights = run_with_weights()
    torch.testing.assert_close(weights_out[0], ref_out, atol=0, rtol=0)  # torch's kernel
    torch.testing.assert_close(weights_out[1], ref_weights, atol=0, rtol=0)


MASKS = {
    "none": (None, None),
    "attn-bool": (torch.ones(5, 5, dtype=torch.bool).triu(1), 0),
    "padding-bool": (torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 5]), 1),
    # A floating mask hides every nonzero entry in torch's kernel, -0.5 included.
    "padding-float": (torch.tensor([[0.0, -0.5, 0.0, 0.0, float("-inf")]]).expand(3, 5), 1),
    "merged-4d": (torch.rand(3, 4, 5, 5, generator=torch.Generator().manual_seed(7)) < 0.3, 2),
    "merged-4d-untyped": (
        torch.rand(3, 4, 5, 5, generator=torch.Generator().manual_seed(8)) < 0.3,
        None,
    ),
}


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_native_multi_head_attention_masks_match_torchs_kernel(mask_name, cross):
    mask, mask_type = MASKS[mask_name]
    if mask is not None and mask.dim() == 4:
        mask = mask.clone()
        mask[..., 0] = False  # every row keeps a key (torch's kernel gives NaN rows otherwise)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    weights = (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    x = _x((3, 5, 32), 1)
    kv = _x((3, 5, 32), 2) if cross else x

    def run():
        with torch.no_grad():
            return torch._native_multi_head_attention(
                x, kv, kv, 32, 4, *weights, mask, False, True, mask_type
            )

    ref_out, ref_weights = run()
    with tp.activated():
        (out, out_weights), names = _profiled(run)
    assert OURS in names and out_weights is None and ref_weights is None
    assert out.stride() == ref_out.stride()
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])


def test_native_multi_head_attention_row_without_keys_gives_zeros(provider):
    """A fully padded sequence: zeros as on torch's Python path (F.sdpa); torch's fast-path
    kernel gives NaN there."""
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = _x((2, 5, 32), 1)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True
    with torch.no_grad():
        out = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        provider.restore()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            python_path = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert tp.usage()[tp._CPU_MHA] == {tp.IMPL_NAME: 1}
    torch.testing.assert_close(out, python_path, **TOL[torch.float32])
    torch.testing.assert_close(out[1], mha.out_proj.bias.detach().expand(5, 32))


@pytest.mark.parametrize("masked", ["none", "causal", "padding"])
def test_transformer_encoder_layer_fast_path(provider, masked):
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x = _x((2, 9, 32), 1)
    kwargs = {}
    if masked == "causal":
        kwargs = {"src_mask": torch.nn.Transformer.generate_square_subsequent_mask(9)}
    elif masked == "padding":
        kwargs = {"src_key_padding_mask": torch.arange(9).expand(2, 9) >= torch.tensor([[9], [6]])}

    def run():
        with torch.no_grad():
            return layer(x, **kwargs)

    out, names = _profiled(run)
    assert OURS in names and "aten::_transformer_encoder_layer_fwd" in names
    provider.restore()
    ref, names = _profiled(run)
    assert OURS not in names
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


class _Attention(torch.nn.Module):
    """A self-attention block calling F.scaled_dot_product_attention (compiled and scripted)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length = x.shape[0], x.shape[1]
        qkv = self.qkv(x).view(b, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, length, 16))


def _module_step(module, params, x):
    """Output and parameter gradients of one forward/backward of ``module`` on ``x``."""
    out = module(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    return out.detach(), grads


def test_torch_compile(provider):
    model = _Attention()
    params = list(model.parameters())
    x = _x((2, 6, 16), 1)
    compiled = torch.compile(model)
    (out, grads), names = _profiled(lambda: _module_step(compiled, params, x))
    assert {OURS, OURS_BWD} <= names
    provider.restore()
    tp.usage(reset=True)
    (again, again_grads), names = _profiled(lambda: _module_step(compiled, params, x))
    assert not names & {OURS, OURS_BWD} and tp.usage() == {}  # torch's kernels, same graph
    ref, ref_grads = _module_step(model, params, x)
    _assert_close_all((out, *grads), (ref, *ref_grads), TOL[torch.float32])
    _assert_close_all((again, *again_grads), (ref, *ref_grads), TOL[torch.float32])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_reaches_the_operator(provider):
    """TorchScript calls aten::scaled_dot_product_attention, which dispatches to the flash
    operator like eager code does: the provider serves scripted modules too."""
    model = _Attention()
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    x = _x((2, 6, 16), 1)
    (out, grads), names = _profiled(lambda: _module_step(scripted, params, x))
    assert {OURS, OURS_BWD} <= names
    provider.restore()
    ref, ref_grads = _module_step(scripted, params, x)
    _assert_close_all((out, *grads), (ref, *ref_grads), TOL[torch.float32])


def test_transformers_sdpa_model(provider):
    pytest.importorskip("transformers")
    from tiny_models import tiny_bert

    model = tiny_bert()
    model.set_attn_implementation("sdpa")
    model.eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits
        grads = torch.autograd.grad(logits.square().sum(), params, allow_unused=True)
        return logits.detach(), [g for g in grads if g is not None]

    (out, grads), names = _profiled(step)
    assert {OURS, OURS_BWD} <= names
    assert tp.usage()[tp._CPU_FWD] == {tp.IMPL_NAME: 2}  # both layers
    provider.restore()
    ref, ref_grads = step()
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    _assert_close_all(grads, ref_grads, {"atol": 1e-5, "rtol": 1e-4})


# --- CUDA: the Triton kernels behind aten::_scaled_dot_product_flash_attention -----------------


@pytest.mark.skipif("triton" not in fused_backends("cpu"), reason="needs the Triton interpreter")
@pytest.mark.parametrize("is_causal", [False, True])
def test_triton_layouts_match_torchs_cuda_operator(is_causal):
    """The Triton half of the CUDA override, run on CPU tensors through the interpreter:
    output laid out like the query, float32 logsumexp (B, H, L), gradients like their inputs."""
    q, k, v = _blhe(1, 4, 5, 16, 1), _blhe(1, 2, 5, 16, 2), _blhe(1, 2, 5, 16, 3)
    out, lse = tp.triton_flash_forward(q, k, v, is_causal, None)
    ref, ref_lse = FLASH(q, k, v, 0.0, is_causal)
    assert out.stride() == torch.empty_like(q).stride() and lse.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (1, 4, 5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    grad = _x(out.shape, 4)
    grads = tp.triton_flash_backward(grad, q, k, v, out, lse, is_causal, None)
    ref_grads = FLASH_BWD(grad, q, k, v, ref, ref_lse, 0.0, is_causal)
    for g, x in zip(grads, (q, k, v), strict=True):
        assert g.shape == x.shape and g.stride() == torch.empty_like(x).stride()
    _assert_close_all(grads, ref_grads, {"atol": 1e-4, "rtol": 1e-4})


def _describe(outputs):
    return [
        (tuple(t.shape), t.dtype, t.stride()) if isinstance(t, torch.Tensor) else t for t in outputs
    ]


@pytest.mark.skipif("triton" not in fused_backends("cpu"), reason="needs the Triton interpreter")
def test_cuda_kernels_return_what_torchs_meta_kernels_describe(monkeypatch):
    """The CUDA overrides on CPU tensors through the interpreter (the device check bypassed):
    every output has the shape, dtype and strides of torch's meta kernel for the operator,
    which is what torch.compile plans with; the call falls back when torch's kernel must."""
    monkeypatch.setattr(tp, "_cuda_flash_reason", lambda *args: None)
    q = _blhe(1, 4, 5, 16, 1, torch.bfloat16)
    k, v = _blhe(1, 2, 5, 16, 2, torch.bfloat16), _blhe(1, 2, 5, 16, 3, torch.bfloat16)
    meta = [t.to("meta") for t in (q, k, v)]
    forward = torch.ops.aten._scaled_dot_product_flash_attention.default
    backward = torch.ops.aten._scaled_dot_product_flash_attention_backward.default

    ours = tp._cuda_forward(None, q, k, v, 0.0, True, scale=0.25)
    expected = forward(*meta, 0.0, True, scale=0.25)
    assert _describe(ours) == _describe(expected)
    ref_out, ref_lse = FLASH(q, k, v, 0.0, True, scale=0.25)
    torch.testing.assert_close(ours[0], ref_out, **TOL[q.dtype])

    grad = _x(q.shape, 4, q.dtype)
    rest = (None, None, 5, 5, 0.0, True)  # cum_seq_q, cum_seq_k, max_q, max_k, dropout, causal
    grads = tp._cuda_backward(None, grad, q, k, v, *ours[:2], *rest, *ours[6:8], scale=0.25)
    meta_grads = backward(grad.to("meta"), *meta, *expected[:2], *rest, *expected[6:8], scale=0.25)
    assert _describe(grads) == _describe(meta_grads)
    ref_grads = FLASH_BWD(grad, q, k, v, ref_out, ref_lse, 0.0, True, scale=0.25)
    _assert_close_all(grads, ref_grads, TOL[q.dtype])

    calls = []
    original = types.SimpleNamespace(call_boxed=lambda *args, **kw: calls.append((args, kw)))
    monkeypatch.setitem(tp._originals, tp._CUDA_FWD, original)
    tp._cuda_forward("keyset", q, k, v, 0.0, False, True)  # return_debug_mask: torch's kernel
    assert calls == [(("keyset", q, k, v, 0.0, False, True), {})]
    assert tp.usage()[tp._CUDA_FWD] == {tp.IMPL_NAME: 1, "torch: return_debug_mask=True": 1}


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TRITON_FWD = "aigc_ext::triton_attention_forward"
TRITON_BWD = "aigc_ext::triton_attention_backward"


def _cuda_qkv(dtype=torch.bfloat16, lengths=(128, 128)):
    q = _blhe(2, 8, lengths[0], 64, 1, dtype).cuda()
    k = _blhe(2, 8, lengths[1], 64, 2, dtype).cuda()
    v = _blhe(2, 8, lengths[1], 64, 3, dtype).cuda()
    return q, k, v


@cuda_only
@pytest.mark.parametrize("is_causal", [False, True])
def test_cuda_flash_runs_the_triton_kernels(provider, is_causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _cuda_qkv()

    def fn(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    (out, grads), names = _profiled(lambda: _forward_backward(fn, q, k, v))
    assert {TRITON_FWD, TRITON_BWD} <= names
    provider.restore()
    (ref, ref_grads), names = _profiled(lambda: _forward_backward(fn, q, k, v))
    assert not names & {TRITON_FWD, TRITON_BWD}
    _assert_close_all((out, *grads), (ref, *ref_grads), {"atol": 3e-2, "rtol": 3e-2})


@cuda_only
def test_cuda_flash_outputs_match_torchs_layouts(provider):
    q, k, v = _cuda_qkv(torch.float16)
    op = torch.ops.aten._scaled_dot_product_flash_attention.default
    ours = op(q, k, v, 0.0, True)
    provider.restore()
    ref = op(q, k, v, 0.0, True)
    assert ours[0].stride() == ref[0].stride() and ours[1].shape == ref[1].shape
    assert ours[1].dtype == ref[1].dtype == torch.float32 and ours[4:6] == ref[4:6]
    torch.testing.assert_close(ours[0], ref[0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-2, rtol=1e-3)


@cuda_only
def test_cuda_flash_fallbacks_run_torchs_kernel(provider):
    q, k, v = _cuda_qkv(lengths=(64, 128))
    op = torch.ops.aten._scaled_dot_product_flash_attention.default
    ours, names = _profiled(lambda: op(q, k, v, 0.0, True))  # causal, L != S
    assert TRITON_FWD not in names
    _, names = _profiled(lambda: op(q, k, v, 0.1, False))  # dropout
    assert TRITON_FWD not in names
    reasons = set(tp.usage()[tp._CUDA_FWD])
    assert any("is_causal" in r for r in reasons) and "torch: dropout_p > 0" in reasons
    provider.restore()
    ref = op(q, k, v, 0.0, True)
    torch.testing.assert_close(ours[0], ref[0], atol=0, rtol=0)  # torch's own kernel
