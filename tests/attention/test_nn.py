"""aigc_ext.nn.MultiheadAttention against torch.nn.MultiheadAttention: state, outputs, gradients."""

from __future__ import annotations

import pytest
import torch
from sdpa_testing import fused_backends
from torch.profiler import ProfilerActivity, profile

import aigc_ext.nn

F32, BF16 = torch.float32, torch.bfloat16
E, H, N, L, S = 32, 4, 3, 6, 9
KDIM, VDIM = 24, 20
ATOL = RTOL = 1e-5

needs_cpu_kernel = pytest.mark.skipif(
    "cpu" not in fused_backends("cpu"), reason="the cpu backend is not available"
)


def _pair(seed=0, dtype=F32, **kw):
    """(torch module, our module) with the same parameters."""
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(E, H, dtype=dtype, **kw)
    if kw.get("add_bias_kv") or kw.get("bias", True):  # non-zero biases exercise the math
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "bias" in name:
                    p.normal_()
    ours = aigc_ext.nn.MultiheadAttention(E, H, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _x(shape, seed, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _inputs(batch_first, unbatched, kdim=E, vdim=E, self_attn=False, dtype=F32):
    def shape(n, d):
        if unbatched:
            return (n, d)
        return (N, n, d) if batch_first else (n, N, d)

    q = _x(shape(L, E), 1, dtype)
    if self_attn:
        return q, q, q
    return q, _x(shape(S, kdim), 2, dtype), _x(shape(S, vdim), 3, dtype)


def _keep_first_key(hidden: torch.Tensor) -> torch.Tensor:
    """No query row may hide every key (torch's weights would be NaN there)."""
    hidden = hidden.clone()
    hidden[..., 0] = False
    return hidden


def _kpm(kind, unbatched, src=S):
    hidden = _keep_first_key(torch.rand((src,) if unbatched else (N, src)) < 0.3)
    if kind == "bool":
        return hidden
    return torch.randn(hidden.shape).masked_fill(hidden, float("-inf"))


def _attn_mask(kind, dims, unbatched, tgt=L, src=S):
    shape = (tgt, src) if dims == 2 else ((H if unbatched else N * H), tgt, src)
    hidden = _keep_first_key(torch.rand(shape) < 0.3)
    if kind == "bool":
        return hidden
    return torch.randn(shape).masked_fill(hidden, float("-inf"))


def _run(module, inputs, grad_seed=7, **kwargs):
    """Output, weights and gradients of every input and parameter."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if inputs[0] is inputs[1] is inputs[2]:
        leaves = [leaves[0]] * 3
    module.zero_grad()
    out, weights = module(*leaves, **kwargs)
    out.backward(_x(out.shape, grad_seed, out.dtype))
    grads = [t.grad for t in leaves[: 1 if leaves[0] is leaves[1] else 3]]
    grads += [p.grad for _, p in sorted(module.named_parameters())]
    return out, weights, grads


def _assert_same(ref, ours, inputs, atol=ATOL, rtol=RTOL, **kwargs):
    r_out, r_w, r_grads = _run(ref, inputs, **kwargs)
    o_out, o_w, o_grads = _run(ours, inputs, **kwargs)
    torch.testing.assert_close(o_out, r_out, atol=atol, rtol=rtol)
    if r_w is None:
        assert o_w is None
    else:
        torch.testing.assert_close(o_w, r_w, atol=atol, rtol=rtol)
    assert len(o_grads) == len(r_grads)
    for o, r in zip(o_grads, r_grads, strict=True):
        torch.testing.assert_close(o, r, atol=atol, rtol=rtol)


def _profiled_names(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


# ---------------------------------------------------------------------------------------------
# the module and its state
# ---------------------------------------------------------------------------------------------

MODULE_CONFIGS = {
    "packed": {},
    "kdim-vdim": {"kdim": KDIM, "vdim": VDIM},
    "bias-kv-zero-attn": {"add_bias_kv": True, "add_zero_attn": True},
    "no-bias": {"bias": False},
}


@pytest.mark.parametrize("config", MODULE_CONFIGS)
def test_state_dict_round_trip(config):
    kw = MODULE_CONFIGS[config]
    torch.manual_seed(1)
    ref = torch.nn.MultiheadAttention(E, H, **kw)
    ours = aigc_ext.nn.MultiheadAttention(E, H, **kw)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]

    ours.load_state_dict(ref.state_dict())  # torch -> ours
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key

    torch.manual_seed(2)
    ours2 = aigc_ext.nn.MultiheadAttention(E, H, **kw)
    back = torch.nn.MultiheadAttention(E, H, **kw)
    back.load_state_dict(ours2.state_dict())  # ours -> torch
    for key, value in ours2.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_constructor_arguments():
    m = aigc_ext.nn.MultiheadAttention(
        E, H, dropout=0.1, bias=False, add_bias_kv=True, add_zero_attn=True, kdim=KDIM,
        vdim=VDIM, batch_first=True, device="cpu", dtype=torch.float64,
    )  # fmt: skip
    assert (m.embed_dim, m.num_heads, m.dropout, m.kdim, m.vdim) == (E, H, 0.1, KDIM, VDIM)
    assert m.batch_first and m.add_zero_attn and m.in_proj_bias is None
    assert m.k_proj_weight.shape == (E, KDIM) and m.v_proj_weight.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# outputs and gradients
# ---------------------------------------------------------------------------------------------

LAYOUTS = {"batch-first": (True, False), "seq-first": (False, False), "unbatched": (False, True)}


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", ["packed", "self-attn", "kdim-vdim", "bias-kv-zero-attn"])
def test_matches_torch(config, layout, need_weights):
    batch_first, unbatched = LAYOUTS[layout]
    kw = dict(MODULE_CONFIGS.get(config, {}))
    ref, ours = _pair(batch_first=batch_first, **kw)
    inputs = _inputs(
        batch_first,
        unbatched,
        kdim=kw.get("kdim", E),
        vdim=kw.get("vdim", E),
        self_attn=config == "self-attn",
    )
    _assert_same(ref, ours, inputs, need_weights=need_weights)
    # with both masks, so that the padding of the masks for bias_k and the zero key is covered
    src = L if config == "self-attn" else S
    masks = {
        "attn_mask": _attn_mask("bool", 2, unbatched, src=src),
        "key_padding_mask": _kpm("bool", unbatched, src=src),
    }
    _assert_same(ref, ours, inputs, need_weights=need_weights, **masks)


MASK_CASES = {
    "kpm-bool": ("bool", None, None),
    "kpm-float": ("float", None, None),
    "mask2d-bool": (None, "bool", 2),
    "mask2d-float": (None, "float", 2),
    "mask3d-bool": (None, "bool", 3),
    "mask3d-float": (None, "float", 3),
    "both-bool-3d": ("bool", "bool", 3),
    "both-float-2d": ("float", "float", 2),
}


@pytest.mark.parametrize("layout", ["batch-first", "seq-first", "unbatched"])
@pytest.mark.parametrize("case", MASK_CASES)
def test_masks_match_torch(case, layout):
    kpm_kind, mask_kind, mask_dims = MASK_CASES[case]
    batch_first, unbatched = LAYOUTS[layout]
    ref, ours = _pair(batch_first=batch_first)
    inputs = _inputs(batch_first, unbatched)
    kwargs = {}
    if kpm_kind:
        kwargs["key_padding_mask"] = _kpm(kpm_kind, unbatched)
    if mask_kind:
        kwargs["attn_mask"] = _attn_mask(mask_kind, mask_dims, unbatched)
    _assert_same(ref, ours, inputs, need_weights=False, **kwargs)


@pytest.mark.parametrize("with_kpm", [False, True], ids=["causal", "causal+kpm"])
@pytest.mark.parametrize("layout", ["batch-first", "seq-first", "unbatched"])
def test_is_causal_matches_torch(layout, with_kpm):
    batch_first, unbatched = LAYOUTS[layout]
    ref, ours = _pair(batch_first=batch_first)
    inputs = _inputs(batch_first, unbatched, self_attn=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    kwargs = {"attn_mask": causal, "is_causal": True}
    if with_kpm:
        kwargs["key_padding_mask"] = _kpm("float", unbatched, src=L)
    _assert_same(ref, ours, inputs, need_weights=False, **kwargs)


def test_is_causal_needs_attn_mask():
    _, ours = _pair(batch_first=True)
    q = _x((N, L, E), 1)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(q, q, q, need_weights=False, is_causal=True)


@pytest.mark.parametrize("layout", ["batch-first", "unbatched"])
def test_need_weights_per_head(layout):
    batch_first, unbatched = LAYOUTS[layout]
    ref, ours = _pair(batch_first=batch_first)
    inputs = _inputs(batch_first, unbatched)
    kwargs = {"attn_mask": _attn_mask("float", 2, unbatched), "average_attn_weights": False}
    _assert_same(ref, ours, inputs, need_weights=True, **kwargs)
    _, weights = ours(*inputs, need_weights=True, average_attn_weights=False)
    assert weights.shape == ((H, L, S) if unbatched else (N, H, L, S))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_eval_matches_torch_fast_path(grad):
    """In eval mode without autograd, torch takes its fused C++ path; ours its own kernel."""
    ref, ours = _pair(batch_first=True, dropout=0.5)
    ref.eval()
    ours.eval()
    q = _x((N, L, E), 1)
    kpm = _kpm("bool", False, src=L)
    with torch.set_grad_enabled(grad):
        expected, _ = ref(q, q, q, key_padding_mask=kpm, need_weights=False)
        got, _ = ours(q, q, q, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# which implementation runs
# ---------------------------------------------------------------------------------------------


@needs_cpu_kernel
def test_need_weights_false_runs_the_fused_kernel():
    _, ours = _pair(batch_first=True)
    q = _x((N, L, E), 1).requires_grad_()
    mask = _attn_mask("bool", 3, False, src=L)

    def step():
        out, _ = ours(q, q, q, attn_mask=mask, need_weights=False)
        out.sum().backward()

    names = _profiled_names(step)
    assert "aigc_ext::attention_forward" in names
    assert "aigc_ext::attention_backward" in names
    assert "aten::scaled_dot_product_attention" not in names


def test_need_weights_true_runs_torch():
    _, ours = _pair(batch_first=True)
    q = _x((N, L, E), 1)
    names = _profiled_names(lambda: ours(q, q, q, need_weights=True))
    assert "aigc_ext::attention_forward" not in names


def test_dropout_in_training(fresh_warnings):
    """Training-mode dropout goes through aigc_ext's API (the reference path)."""
    _, ours = _pair(batch_first=True, dropout=1.0)
    q = _x((N, L, E), 1)
    with pytest.warns(UserWarning, match="reference path"):
        out, _ = ours(q, q, q, need_weights=False)
    # every attention weight dropped: only the output projection's bias is left
    torch.testing.assert_close(out, ours.out_proj.bias.detach().expand(N, L, E))
    ours.eval()  # no dropout in eval mode: the fused kernel, no warning
    ref, _ = _pair(batch_first=True, dropout=1.0)
    ref.eval()
    torch.testing.assert_close(
        ours(q, q, q, need_weights=False)[0],
        ref(q, q, q, need_weights=False)[0],
        atol=ATOL,
        rtol=RTOL,
    )


def test_bfloat16_smoke():
    ref, ours = _pair(batch_first=True, kdim=KDIM, vdim=VDIM)
    ours.to(BF16)
    q, k, v = _inputs(True, False, kdim=KDIM, vdim=VDIM)
    kpm = _kpm("bool", False)
    expected, _ = ref(q, k, v, key_padding_mask=kpm, need_weights=False)
    leaves = [t.to(BF16).requires_grad_() for t in (q, k, v)]
    got, _ = ours(*leaves, key_padding_mask=kpm, need_weights=False)
    assert got.dtype == BF16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected, atol=5e-2, rtol=5e-2)
    got.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
