"""Backend registry and per-call choice: backends(), use_backend, AIGC_EXT_BACKEND, fallbacks."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from sdpa_testing import DEVICE, make_qkv, random_mask

import aigc_ext
from aigc_ext import dispatch
from aigc_ext.backends.reference.ops import sdpa_reference


class Spy:
    """A backend function that counts its calls and computes with the reference."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return sdpa_reference(*args, **kwargs)


@pytest.fixture
def register():
    """register(name, **kwargs) -> Spy; every backend registered here is removed afterwards."""
    names = []

    def _register(name, *, devices=(DEVICE,), source="tests", **kwargs):
        spy = Spy()
        aigc_ext.register_backend(name, spy, devices=devices, source=source, **kwargs)
        names.append(name)
        return spy

    yield _register
    for name in names:
        dispatch._unregister_backend(name)


def _qkv(**kw):
    return make_qkv(2, 2, 2, 12, 17, 16, seed=1, **kw)


def _aigc_warnings(record):
    return [w for w in record if "aigc_ext" in str(w.message)]


# ---------------------------------------------------------------------------------------------
# backends()
# ---------------------------------------------------------------------------------------------


def test_backends_lists_builtins():
    rows = aigc_ext.backends()
    assert all(isinstance(r, aigc_ext.BackendInfo) for r in rows)
    by_name = {r.name: r for r in rows}
    assert {"cpu", "reference"} <= set(by_name)
    assert len(by_name) == len(rows)
    ref = by_name["reference"]
    assert ref.available and ref.reason is None and ref.source == "aigc_ext"
    assert "cpu" in ref.devices and ref.description
    cpu = by_name["cpu"]
    assert cpu.devices == ("cpu",) and cpu.source == "aigc_ext" and cpu.description
    assert cpu.priority > ref.priority
    for r in rows:
        assert r.available == (r.reason is None)
    priorities = [r.priority for r in rows]
    assert priorities == sorted(priorities, reverse=True)
    assert rows[-1].name == "reference"


def test_fused_backend_under_test_is_available(backend):
    row = next(r for r in aigc_ext.backends() if r.name == backend)
    assert row.available and DEVICE in row.devices


def test_backends_reports_unavailable_with_reason(register):
    register("broken", unavailable_reason=lambda: "its library failed to load", priority=1000)
    row = next(r for r in aigc_ext.backends() if r.name == "broken")
    assert not row.available and row.reason == "its library failed to load"
    assert row.source == "tests"


# ---------------------------------------------------------------------------------------------
# use_backend
# ---------------------------------------------------------------------------------------------


def test_use_backend_forces_and_nests(register):
    spy = register("spy", priority=-50)
    q, k, v = _qkv()
    aigc_ext.scaled_dot_product_attention(q, k, v)
    assert spy.calls == 0  # a fused backend has priority
    with aigc_ext.use_backend("spy") as chosen:
        assert chosen.name == "spy"
        out = aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert spy.calls == 1
        with aigc_ext.use_backend("reference"):
            aigc_ext.scaled_dot_product_attention(q, k, v)
        assert spy.calls == 1
        aigc_ext.scaled_dot_product_attention(q, k, v)
        assert spy.calls == 2
    aigc_ext.scaled_dot_product_attention(q, k, v)
    assert spy.calls == 2
    torch.testing.assert_close(out, sdpa_reference(q, k, v, is_causal=True))


def test_use_backend_is_per_thread(register):
    spy = register("spy", priority=-50)
    q, k, v = _qkv()
    errors = []

    def worker():
        try:
            aigc_ext.scaled_dot_product_attention(q, k, v)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with aigc_ext.use_backend("spy"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert not errors and spy.calls == 0


def test_use_backend_unknown_name():
    with pytest.raises(aigc_ext.BackendError, match=r"unknown attention backend 'nope'.*reference"):
        with aigc_ext.use_backend("nope"):
            pass
    assert issubclass(aigc_ext.BackendError, RuntimeError)


def test_use_backend_unavailable(register):
    register("broken", unavailable_reason=lambda: "its library failed to load")
    with pytest.raises(
        aigc_ext.BackendError, match=r"broken.*not available.*its library failed to load"
    ):
        with aigc_ext.use_backend("broken"):
            pass


def test_unavailable_and_foreign_device_backends_are_skipped(register):
    broken = register("broken", unavailable_reason=lambda: "no library", priority=1000)
    foreign = register("foreign", devices=("xla",), priority=1000)
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fused backend serves the call: no fallback warning
        aigc_ext.scaled_dot_product_attention(q, k, v)
    assert broken.calls == 0 and foreign.calls == 0
    with pytest.raises(
        aigc_ext.BackendError, match=f"'foreign' cannot serve.*runs on xla, not {DEVICE}"
    ):
        with aigc_ext.use_backend("foreign"):
            aigc_ext.scaled_dot_product_attention(q, k, v)


def test_priority_and_unsupported_reason(register):
    eager = register("eager", priority=1000)
    q, k, v = _qkv()
    aigc_ext.scaled_dot_product_attention(q, k, v)
    assert eager.calls == 1
    dispatch._unregister_backend("eager")
    picky = register(
        "picky",
        priority=1000,
        unsupported_reason=lambda call: "only causal" if not call.is_causal else None,
    )
    aigc_ext.scaled_dot_product_attention(q, k, v)
    assert picky.calls == 0
    aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert picky.calls == 1
    with pytest.raises(aigc_ext.BackendError, match="'picky' cannot serve this call: only causal"):
        with aigc_ext.use_backend("picky"):
            aigc_ext.scaled_dot_product_attention(q, k, v)


def test_forced_backend_rejects_dropout(backend):
    q, k, v = _qkv()
    with aigc_ext.use_backend(backend):
        with pytest.raises(aigc_ext.BackendError, match=rf"'{backend}' cannot serve.*dropout"):
            aigc_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.5)


def test_forced_backend_rejects_mask_requiring_grad(backend):
    q, k, v = _qkv()
    mask = random_mask((12, 17), "float", torch.float32).clamp(min=-1e4).requires_grad_()
    with aigc_ext.use_backend(backend):
        with pytest.raises(
            aigc_ext.BackendError, match=rf"'{backend}' cannot serve.*requires grad"
        ):
            aigc_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_forced_reference_serves_everything(fresh_warnings):
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with aigc_ext.use_backend("reference"):
            torch.manual_seed(3)
            out = aigc_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(3)
    torch.testing.assert_close(out, sdpa_reference(q, k, v, dropout_p=0.25), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# AIGC_EXT_BACKEND
# ---------------------------------------------------------------------------------------------


def test_environment_variable_forces_backend(register, monkeypatch):
    spy = register("spy", priority=-50)
    q, k, v = _qkv()
    monkeypatch.setenv("AIGC_EXT_BACKEND", "spy")
    assert dispatch.current_backend_override() == "spy"
    aigc_ext.scaled_dot_product_attention(q, k, v)
    assert spy.calls == 1
    with aigc_ext.use_backend("reference"):  # use_backend wins over the environment
        aigc_ext.scaled_dot_product_attention(q, k, v)
    assert spy.calls == 1
    monkeypatch.delenv("AIGC_EXT_BACKEND")  # read at each call
    aigc_ext.scaled_dot_product_attention(q, k, v)
    assert spy.calls == 1
    monkeypatch.setenv("AIGC_EXT_BACKEND", "")  # empty: not forced
    aigc_ext.scaled_dot_product_attention(q, k, v)
    assert spy.calls == 1


def test_environment_variable_errors(monkeypatch, backend):
    q, k, v = _qkv()
    monkeypatch.setenv("AIGC_EXT_BACKEND", "no_such_backend")
    with pytest.raises(aigc_ext.BackendError, match="unknown attention backend 'no_such_backend'"):
        aigc_ext.scaled_dot_product_attention(q, k, v)
    monkeypatch.setenv("AIGC_EXT_BACKEND", backend)
    aigc_ext.scaled_dot_product_attention(q, k, v)
    with pytest.raises(aigc_ext.BackendError, match="dropout"):
        aigc_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


# ---------------------------------------------------------------------------------------------
# fallback to the reference path
# ---------------------------------------------------------------------------------------------


def test_dropout_falls_back_with_one_warning(fresh_warnings):
    q, k, v = _qkv()
    torch.manual_seed(11)
    with pytest.warns(UserWarning, match=r"dropout_p > 0.*reference path") as record:
        out = aigc_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    assert len(_aigc_warnings(record)) == 1
    torch.manual_seed(11)
    ref = sdpa_reference(q, k, v, dropout_p=0.3, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.equal(out, sdpa_reference(q, k, v, is_causal=True))  # dropout did happen
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        aigc_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert not _aigc_warnings(again)


def test_mask_requiring_grad_falls_back_with_one_warning(fresh_warnings):
    q, k, v = (t.requires_grad_() for t in _qkv())
    base = random_mask((2, 1, 12, 17), "float", torch.float32, seed=4).clamp(min=-1e4)
    mask = base.clone().requires_grad_()
    with pytest.warns(UserWarning, match=r"attn_mask requires grad.*reference path") as record:
        out = aigc_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len(_aigc_warnings(record)) == 1
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, mask), grad_out)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    mask_ref = base.clone().requires_grad_()
    ref = sdpa_reference(*leaves, attn_mask=mask_ref)
    ref_grads = torch.autograd.grad(ref, (*leaves, mask_ref), grad_out)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    assert grads[3].shape == mask.shape and grads[3].abs().sum() > 0

    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        aigc_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not _aigc_warnings(again)


def test_each_fallback_reason_warns_once(fresh_warnings):
    q, k, v = _qkv()
    mask = torch.zeros(12, 17, requires_grad=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            aigc_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
            aigc_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    messages = [str(w.message) for w in _aigc_warnings(record)]
    assert len(messages) == 2
    assert any("dropout" in m for m in messages) and any("requires grad" in m for m in messages)


def test_fallback_warning_points_at_the_caller(fresh_warnings):
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match="reference path") as record:
        aigc_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    assert record[0].filename == __file__


# ---------------------------------------------------------------------------------------------
# register_backend
# ---------------------------------------------------------------------------------------------


def test_duplicate_builtin_name_names_both_sources():
    with pytest.raises(
        ValueError, match=r"'cpu' is registered twice: by aigc_ext and by my_plugin"
    ):
        aigc_ext.register_backend("cpu", sdpa_reference, source="my_plugin")
    assert dispatch.get_backend("cpu").source == "aigc_ext"


def test_duplicate_plugin_name_names_both_sources(register):
    register("shared_name", source="plugin_a")
    with pytest.raises(
        ValueError, match=r"'shared_name' is registered twice: by plugin_a and by plugin_b"
    ):
        aigc_ext.register_backend("shared_name", sdpa_reference, source="plugin_b")
    assert dispatch.get_backend("shared_name").source == "plugin_a"


def test_unregister_backend_cleans_up():
    aigc_ext.register_backend("temporary", sdpa_reference, source="tests")
    try:
        assert "temporary" in {r.name for r in aigc_ext.backends()}
    finally:
        dispatch._unregister_backend("temporary")
    assert "temporary" not in {r.name for r in aigc_ext.backends()}
    with pytest.raises(aigc_ext.BackendError, match="unknown"):
        dispatch.get_backend("temporary")


def test_backend_usage_counts_the_backend_that_served(backend):
    q, k, v = (t.to(DEVICE) for t in make_qkv(1, 2, 2, 5, 7, 16))
    dispatch.backend_usage(reset=True)
    with aigc_ext.use_backend(backend):
        aigc_ext.scaled_dot_product_attention(q, k, v)
        aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    with aigc_ext.use_backend("reference"):
        aigc_ext.scaled_dot_product_attention(q, k, v)
    assert dispatch.backend_usage(reset=True) == {backend: 2, "reference": 1}
    assert dispatch.backend_usage() == {}
