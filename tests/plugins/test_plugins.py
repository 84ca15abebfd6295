"""Plugin system: hook specs, registration, duplicates, faults, env vars, CLI, lifecycle hooks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from sdpa_testing import make_qkv

import aigc_ext
from aigc_ext import hookimpl, hookspecs, plugins
from aigc_ext.backends.reference.ops import sdpa_reference
from aigc_ext.cli import main
from aigc_ext.lifecycle import RunState, notify
from aigc_ext.plugins import PluginError, PluginWarning
from aigc_ext.testing import register_plugin

REGISTRATION_HOOKS = [
    "aigc_register_attention_backends",
    "aigc_register_objectives",
    "aigc_register_finetuners",
    "aigc_register_augmentations",
    "aigc_register_transfer_strategies",
]
LIFECYCLE_HOOKS = [
    "aigc_on_train_begin",
    "aigc_on_step_end",
    "aigc_on_evaluate",
    "aigc_on_save",
    "aigc_on_train_end",
]


def noop(batch, *, generator=None):
    return batch


def _names():
    return {r.name for r in aigc_ext.backends()}


# --- fake entry points ------------------------------------------------------------------------


class FakeDist:
    def __init__(self, name, version="1.2.3"):
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    def __init__(self, name, target, dist="fake-dist"):
        self.name = name
        self.group = plugins.ENTRY_POINT_GROUP
        self._target = target
        self.dist = FakeDist(dist)

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


@pytest.fixture
def entry_points(monkeypatch):
    """entry_points(*eps): the installed plugins are these fakes; plugins load afresh."""
    for var in ("AIGC_EXT_PLUGINS", "AIGC_EXT_NO_PLUGINS", "AIGC_EXT_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)

    def _set(*eps):
        monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: list(eps))
        plugins._reset()

    yield _set
    monkeypatch.undo()
    plugins._reset()
    plugins.load()


class AugPlugin:
    @hookimpl
    def aigc_register_augmentations(self, register):
        register("shared-aug", noop)


# --- hook specs -------------------------------------------------------------------------------


def test_hookimpl_is_exported_and_specs_exist():
    assert aigc_ext.hookimpl is hookspecs.hookimpl
    for name in REGISTRATION_HOOKS + LIFECYCLE_HOOKS:
        assert getattr(plugins.pm.hook, name).has_spec(), name


def test_import_does_not_load_plugins():
    code = "import sys, aigc_ext; print('aigc_ext.plugins' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_builtins_register_through_the_hook():
    builtins = {i.name: i for i in plugins.get_plugins(include_builtins=True) if i.builtin}
    assert set(builtins) == {
        "aigc_ext.default_plugins.backends",
        "aigc_ext.default_plugins.strategies",
        "aigc_ext.default_plugins.training",
    }
    assert builtins["aigc_ext.default_plugins.backends"].hooks == [
        "aigc_register_attention_backends"
    ]
    assert {"cpu", "reference"} <= set(
        builtins["aigc_ext.default_plugins.backends"].registered["attention_backends"]
    )
    assert all(not i.builtin for i in plugins.get_plugins())


def test_builtin_strategies_load_as_a_default_plugin(entry_points, monkeypatch):
    # The strategies are a default plugin of aigc_ext, loaded by module name: built-in, and
    # loaded even when third-party plugins are switched off. An entry point of aigc_ext's own
    # distribution (left in the metadata of an older install) is not loaded.
    assert "aigc_ext.default_plugins.strategies" in plugins.DEFAULT_PLUGINS
    monkeypatch.setenv("AIGC_EXT_NO_PLUGINS", "1")
    entry_points(
        FakeEntryPoint("strategies", RuntimeError("must not be loaded"), dist="aigc_ext"),
        FakeEntryPoint("example", AugPlugin()),
    )
    names = {i.name for i in plugins.get_plugins(include_builtins=True)}
    assert "aigc_ext.default_plugins.strategies" in names
    assert "example" not in names and "strategies" not in names
    assert "causal-lm" in plugins.get_registry("objectives")
    assert plugins.failures() == []


# --- registration -----------------------------------------------------------------------------


class EverythingPlugin:
    @hookimpl
    def aigc_register_attention_backends(self, register):
        register("plugin-ref", sdpa_reference, devices=("cpu",), priority=-1000)

    @hookimpl
    def aigc_register_objectives(self, register):
        register("mse", lambda model, batch: torch.tensor(0.0), description="zero")

    @hookimpl
    def aigc_register_finetuners(self, register):
        register("identity", lambda model, **options: model)

    @hookimpl
    def aigc_register_augmentations(self, register):
        register("noop", noop)

    @hookimpl
    def aigc_register_transfer_strategies(self, register):
        register("keep", lambda source, target: target)


def test_register_every_family_and_clean_up():
    with register_plugin(EverythingPlugin(), name="everything") as info:
        assert info.registered == {
            "attention_backends": ["plugin-ref"],
            "objectives": ["mse"],
            "finetuners": ["identity"],
            "augmentations": ["noop"],
            "transfer_strategies": ["keep"],
        }
        row = next(r for r in aigc_ext.backends() if r.name == "plugin-ref")
        assert row.source == "everything" and row.available
        q, k, v = make_qkv(1, 2, 2, 5, 7, 8, seed=0)
        with aigc_ext.use_backend("plugin-ref"):
            torch.testing.assert_close(
                aigc_ext.scaled_dot_product_attention(q, k, v), sdpa_reference(q, k, v)
            )
        assert plugins.get_registry("augmentations").get("noop") is noop
        (mse,) = [e for e in plugins.get_registry("objectives").entries() if e.name == "mse"]
        assert mse.description == "zero" and mse.source == "everything"
        assert "keep" in plugins.get_registry("transfer_strategies")
        assert "identity" in plugins.get_registry("finetuners").names()
        registered = dict(info.registered)
    assert "plugin-ref" not in _names()
    for family, (name,) in registered.items():
        if family != "attention_backends":
            assert name not in plugins.get_registry(family)
    assert plugins.pm.get_plugin("everything") is None


def test_unknown_family_and_name():
    with pytest.raises(KeyError, match="unknown plugin family 'colours'"):
        plugins.get_registry("colours")
    with pytest.raises(KeyError, match="unknown augmentation 'nope'"):
        plugins.get_registry("augmentations").get("nope")


def test_duplicate_names_error_names_both():
    with register_plugin(AugPlugin(), name="first"):
        with pytest.raises(
            PluginError, match="'shared-aug' is registered twice: by first and by second"
        ):
            with register_plugin(AugPlugin(), name="second"):
                pass
        entries = {e.name: e for e in plugins.get_registry("augmentations").entries()}
        assert entries["shared-aug"].source == "first"

    class Clash:
        @hookimpl
        def aigc_register_attention_backends(self, register):
            register("cpu", sdpa_reference)

    with pytest.raises(PluginError, match="'cpu' is registered twice: by aigc_ext and by clash"):
        with register_plugin(Clash(), name="clash"):
            pass
    assert aigc_ext.dispatch.get_backend("cpu").source == "aigc_ext"


# --- faults -----------------------------------------------------------------------------------


class Raises:
    @hookimpl
    def aigc_register_attention_backends(self, register):
        register("half-done", sdpa_reference)

    @hookimpl
    def aigc_register_augmentations(self, register):
        raise RuntimeError("boom")


def test_hook_that_raises_is_reported_and_rolled_back():
    with pytest.warns(
        PluginWarning,
        match=r"'raises' \(distribution raises-dist\) failed: RuntimeError: boom; skipped",
    ):
        assert (
            plugins.add_plugin(Raises(), "raises", distribution="raises-dist", strict=False) is None
        )
    assert "half-done" not in _names()
    assert plugins.pm.get_plugin("raises") is None
    with pytest.raises(PluginError, match="boom"):
        with register_plugin(Raises(), name="raises"):
            pass
    assert "half-done" not in _names()


def test_non_callable_is_rejected():
    class Bad:
        @hookimpl
        def aigc_register_objectives(self, register):
            register("bad", 42)

    with pytest.raises(PluginError, match="'bad' must be callable"):
        with register_plugin(Bad(), name="bad"):
            pass


class Typo:
    @hookimpl
    def aigc_register_augmentation(self, register):  # missing "s"
        pass


def test_unknown_hook_warns_or_fails_when_strict():
    with pytest.warns(PluginWarning, match="unknown hook.*aigc_register_augmentation"):
        info = plugins.add_plugin(Typo(), "typo", strict=False)
    assert info is not None
    plugins.remove_plugin("typo")
    with pytest.raises(PluginError, match="unknown hook"):
        with register_plugin(Typo(), name="typo"):
            pass
    assert plugins.pm.get_plugin("typo") is None


def test_entry_point_import_failure_is_reported_and_skipped(entry_points):
    entry_points(
        FakeEntryPoint("broken", ImportError("no module named nowhere"), dist="broken-dist"),
        FakeEntryPoint("good", AugPlugin(), dist="good-dist"),
    )
    with pytest.warns(
        PluginWarning, match=r"'broken' \(distribution broken-dist\) failed to import: ImportError"
    ):
        names = _names()
    assert {"cpu", "reference"} <= names
    assert [i.name for i in plugins.get_plugins()] == ["good"]
    assert plugins.get_plugins()[0].version == "1.2.3"
    assert [f.name for f in plugins.failures()] == ["broken"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        aigc_ext.backends()
        plugins.get_registry("augmentations")


def test_strict_env_raises(entry_points, monkeypatch):
    monkeypatch.setenv("AIGC_EXT_STRICT_PLUGINS", "1")
    entry_points(FakeEntryPoint("broken", ImportError("nope"), dist="broken-dist"))
    for _ in range(2):  # a failed load is retried, and fails again
        with pytest.raises(PluginError, match=r"broken-dist.*ImportError: nope"):
            aigc_ext.backends()
    monkeypatch.delenv("AIGC_EXT_STRICT_PLUGINS")
    with pytest.warns(PluginWarning):
        assert "cpu" in _names()


# --- environment variables --------------------------------------------------------------------


class OtherPlugin:
    @hookimpl
    def aigc_register_objectives(self, register):
        register("other-objective", lambda model, batch: 0.0)


def test_env_no_plugins_keeps_builtins(entry_points, monkeypatch):
    monkeypatch.setenv("AIGC_EXT_NO_PLUGINS", "1")
    entry_points(FakeEntryPoint("aug", AugPlugin()), FakeEntryPoint("other", OtherPlugin()))
    assert plugins.get_plugins() == []
    assert {"cpu", "reference"} <= _names()
    assert all(e.builtin for e in plugins.get_registry("augmentations").entries())


def test_env_plugins_selects(entry_points, monkeypatch):
    monkeypatch.setenv("AIGC_EXT_PLUGINS", " other ,")
    entry_points(FakeEntryPoint("aug", AugPlugin()), FakeEntryPoint("other", OtherPlugin()))
    assert [i.name for i in plugins.get_plugins()] == ["other"]
    assert "shared-aug" not in plugins.get_registry("augmentations")
    assert "other-objective" in plugins.get_registry("objectives")


def test_env_plugins_names_a_missing_plugin(entry_points, monkeypatch):
    monkeypatch.setenv("AIGC_EXT_PLUGINS", "absent")
    entry_points(FakeEntryPoint("aug", AugPlugin()))
    with pytest.warns(
        PluginWarning, match="'absent' is named in AIGC_EXT_PLUGINS but not installed"
    ):
        assert plugins.get_plugins() == []


# --- CLI --------------------------------------------------------------------------------------


def test_cli_json_all(capsys):
    assert main(["plugins", "--json", "--all"]) == 0
    doc = json.loads(capsys.readouterr().out)
    builtin = next(p for p in doc["plugins"] if p["name"] == "aigc_ext.default_plugins.backends")
    assert builtin["builtin"] and builtin["distribution"] == "aigc_ext"
    assert builtin["hooks"] == ["aigc_register_attention_backends"]
    assert "cpu" in builtin["registered"]["attention_backends"]


def test_cli_text_lists_plugin_and_registrations(entry_points, capsys):
    entry_points(FakeEntryPoint("aug", AugPlugin(), dist="aug-dist"))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "aug-dist 1.2.3 (entry point 'aug')" in out
    assert "hooks: aigc_register_augmentations" in out
    assert "augmentations: shared-aug" in out
    assert "aigc_ext.default_plugins.backends" not in out and "built-in" not in out


def test_cli_strict_fails_on_broken_plugin(entry_points, capsys):
    entry_points(FakeEntryPoint("broken", ImportError("gone"), dist="broken-dist"))
    with pytest.warns(PluginWarning):
        assert main(["plugins", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["failures"][0]["distribution"] == "broken-dist"
    assert main(["plugins", "--strict"]) == 1
    assert "broken-dist" in capsys.readouterr().err


def test_cli_strict_env(entry_points, monkeypatch, capsys):
    monkeypatch.setenv("AIGC_EXT_STRICT_PLUGINS", "1")
    entry_points(FakeEntryPoint("broken", ImportError("gone"), dist="broken-dist"))
    assert main(["plugins"]) == 1
    assert "broken-dist" in capsys.readouterr().err


def test_cli_subprocess_json():
    out = subprocess.run(
        [sys.executable, "-m", "aigc_ext.cli", "plugins", "--json", "--all"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert "aigc_ext.default_plugins.backends" in [p["name"] for p in doc["plugins"]]


# --- lifecycle hooks --------------------------------------------------------------------------


def test_lifecycle_ordering_wrapper_and_flags():
    calls = []

    class First:
        @hookimpl(tryfirst=True)
        def aigc_on_step_end(self, state):
            calls.append("first")

    class Last:
        @hookimpl(trylast=True)
        def aigc_on_step_end(self, state):
            calls.append("last")
            if state.step >= 3:
                state.should_stop = True

    class Plain:
        @hookimpl
        def aigc_on_step_end(self, state):
            calls.append("plain")

        @hookimpl
        def aigc_on_evaluate(self, state, metrics):
            state.should_save = metrics["loss"] < 1.0

        @hookimpl
        def aigc_on_save(self, state, path):
            calls.append(("save", path))

    class Wrapper:
        @hookimpl(wrapper=True)
        def aigc_on_step_end(self, state):
            calls.append("before")
            result = yield
            calls.append("after")
            return result

    # registered so that plain registration order would give the opposite order
    with (
        register_plugin(Last(), name="last"),
        register_plugin(Plain(), name="plain"),
        register_plugin(First(), name="first"),
        register_plugin(Wrapper(), name="wrapper"),
    ):
        state = RunState()
        notify("train_begin", state)
        while not state.should_stop:
            state.step += 1
            notify("step_end", state)
        assert state.step == 3
        assert calls[:5] == ["before", "first", "plain", "last", "after"]
        notify("evaluate", state, metrics={"loss": 0.5})
        assert state.should_save and state.metrics == {"loss": 0.5}
        notify("save", state, path="ckpt.pt")
        assert calls[-1] == ("save", "ckpt.pt")
        notify("train_end", state)
    calls.clear()
    notify("step_end", RunState())
    assert calls == []


def test_lifecycle_bad_event():
    with pytest.raises(ValueError, match="unknown event 'stepend'"):
        notify("stepend", RunState())
    with pytest.raises(TypeError, match="'save' takes path"):
        notify("save", RunState())


# --- the example package (examples/aigc-ext-plugin-example) -----------------------------------

example_installed = pytest.mark.skipif(
    importlib.util.find_spec("aigc_ext_plugin_example") is None,
    reason="examples/aigc-ext-plugin-example is not installed",
)


def _run_json(env_extra):
    env = {**os.environ, **env_extra}
    for var in ("AIGC_EXT_PLUGINS", "AIGC_EXT_NO_PLUGINS"):
        if var not in env_extra:
            env.pop(var, None)
    code = (
        "import json, aigc_ext; from aigc_ext import plugins;"
        "print(json.dumps({'backends': [b.name for b in aigc_ext.backends()],"
        "'augmentations': plugins.get_registry('augmentations').names(),"
        "'plugins': [p.name for p in plugins.get_plugins()]}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout)


@example_installed
def test_example_plugin_is_listed_and_works():
    out = subprocess.run(
        [sys.executable, "-m", "aigc_ext.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    example = next(p for p in json.loads(out.stdout)["plugins"] if p["name"] == "example")
    assert example["distribution"] == "aigc-ext-plugin-example"
    assert example["registered"] == {
        "attention_backends": ["example-naive"],
        "augmentations": ["example-gaussian-noise"],
    }
    q, k, v = make_qkv(2, 4, 2, 9, 13, 16, seed=3)
    mask = torch.rand(9, 13, generator=torch.Generator().manual_seed(0)) > 0.3
    with aigc_ext.use_backend("example-naive"):
        for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}):
            got = aigc_ext.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
            ref = sdpa_reference(q, k, v, enable_gqa=True, **kwargs)
            torch.testing.assert_close(got, ref)
    # never chosen unless asked for
    example_backend = aigc_ext.dispatch.get_backend("example-naive")
    assert "use_backend" in example_backend.unsupported_reason(None)  # never chosen unasked
    augment = plugins.get_registry("augmentations").get("example-gaussian-noise")
    batch = torch.zeros(4, 3)
    g = torch.Generator().manual_seed(0)
    assert augment(batch, generator=g).abs().max() > 0


@example_installed
def test_example_plugin_removed_leaves_no_trace():
    present = _run_json({})
    assert "example-naive" in present["backends"]
    assert "example-gaussian-noise" in present["augmentations"]
    for env in ({"AIGC_EXT_NO_PLUGINS": "1"}, {"AIGC_EXT_PLUGINS": "not-example"}):
        absent = _run_json(env)
        assert "example-naive" not in absent["backends"]
        assert "example-gaussian-noise" not in absent["augmentations"]
        assert absent["plugins"] == []
        assert {"cpu", "reference"} <= set(absent["backends"])
