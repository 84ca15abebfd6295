"""A faulty plugin cannot take aigc_ext down: imports that exit, checks that raise, wrong results;
and ``AIGC_EXT_PLUGINS`` takes distribution names as well as entry-point names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from sdpa_testing import make_qkv

import aigc_ext
from aigc_ext import dispatch, hookimpl, plugins
from aigc_ext.backends.cpu import backend as builtin_cpu
from aigc_ext.backends.reference.ops import sdpa_reference
from aigc_ext.bench.impls import available_impls
from aigc_ext.cli import main
from aigc_ext.plugins import PluginError, PluginWarning
from aigc_ext.testing import register_plugin

EXAMPLE = "aigc-ext-plugin-example"  # distribution of examples/aigc-ext-plugin-example
EXAMPLE_EP = "example"  # its entry point


def _qkv():
    return make_qkv(2, 2, 2, 5, 7, 8, seed=4)


def _row(name):
    return next(r for r in aigc_ext.backends() if r.name == name)


def _messages(record, category=Warning):
    return [str(w.message) for w in record if issubclass(w.category, category)]


# --- fake entry points ------------------------------------------------------------------------


class FakeDist:
    def __init__(self, name):
        self.metadata = {"Name": name}
        self.version = "0.1"


class FakeEntryPoint:
    """An installed entry point whose ``load`` returns ``target``, or raises it (any
    BaseException, SystemExit and KeyboardInterrupt included)."""

    def __init__(self, name, target, dist):
        self.name = name
        self.group = plugins.ENTRY_POINT_GROUP
        self._target = target
        self.dist = FakeDist(dist) if dist else None

    def load(self):
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


@pytest.fixture
def installed(monkeypatch):
    """installed(*eps): the third-party plugins are these fakes (the real built-ins stay); the
    plugins load afresh, and once more after the test."""
    for var in ("AIGC_EXT_PLUGINS", "AIGC_EXT_NO_PLUGINS", "AIGC_EXT_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    real = plugins.metadata.entry_points
    builtin = [
        ep
        for ep in real(group=plugins.ENTRY_POINT_GROUP)
        if plugins._is_own_distribution(ep.dist.metadata["Name"])
    ]

    def _set(*eps):
        monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: builtin + list(eps))
        plugins._reset()

    yield _set
    monkeypatch.undo()
    plugins._reset()
    plugins.load()


@pytest.fixture
def reload_plugins(monkeypatch):
    """Loads the really installed plugins afresh under the environment the test sets."""
    for var in ("AIGC_EXT_PLUGINS", "AIGC_EXT_NO_PLUGINS", "AIGC_EXT_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)

    def _load(**env):
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        plugins._reset()
        plugins.load()

    yield _load
    monkeypatch.undo()
    plugins._reset()
    plugins.load()


class AugPlugin:
    @hookimpl
    def aigc_register_augmentations(self, register):
        register("iso-aug", lambda batch, *, generator=None: batch)


# --- SystemExit at import or registration ------------------------------------------------------


def test_entry_point_that_exits_at_import_is_reported_and_skipped(installed):
    installed(
        FakeEntryPoint("exiter", SystemExit(7), "exiter-dist"),
        FakeEntryPoint("good", AugPlugin(), "good-dist"),
    )
    with pytest.warns(
        PluginWarning,
        match=r"'exiter' \(distribution exiter-dist\) failed to import: SystemExit: 7; skipped",
    ):
        names = {r.name for r in aigc_ext.backends()}
    assert {"cpu", "reference"} <= names
    assert [i.name for i in plugins.get_plugins()] == ["good"]
    assert [(f.name, f.distribution) for f in plugins.failures()] == [("exiter", "exiter-dist")]


def test_entry_point_that_exits_is_a_plugin_error_when_strict(installed, monkeypatch):
    monkeypatch.setenv("AIGC_EXT_STRICT_PLUGINS", "1")
    installed(FakeEntryPoint("exiter", SystemExit(7), "exiter-dist"))
    with pytest.raises(PluginError, match=r"exiter-dist.*SystemExit: 7"):
        aigc_ext.backends()


def test_keyboard_interrupt_at_import_is_not_swallowed(installed):
    installed(FakeEntryPoint("interrupted", KeyboardInterrupt(), "int-dist"))
    with pytest.raises(KeyboardInterrupt):
        aigc_ext.backends()


def test_registration_hook_that_exits_is_rolled_back():
    class ExitsWhileRegistering:
        @hookimpl
        def aigc_register_attention_backends(self, register):
            register("exits-half-done", sdpa_reference)

        @hookimpl
        def aigc_register_augmentations(self, register):
            sys.exit(3)

    with pytest.warns(PluginWarning, match=r"'exits' .*failed: SystemExit: 3; skipped"):
        assert plugins.add_plugin(ExitsWhileRegistering(), "exits", strict=False) is None
    assert "exits-half-done" not in {r.name for r in aigc_ext.backends()}
    assert plugins.pm.get_plugin("exits") is None


@pytest.fixture
def exiting_plugin_path(tmp_path):
    """A folder holding an installed distribution (``exit-plugin``, entry point ``exiter``)
    whose module calls ``sys.exit(7)`` when imported."""
    (tmp_path / "exit_plugin").mkdir()
    (tmp_path / "exit_plugin" / "__init__.py").write_text("import sys\nsys.exit(7)\n")
    info = tmp_path / "exit_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exit-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[aigc_ext]\nexiter = exit_plugin\n")
    return tmp_path


def _run(args, extra_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_EXT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(extra_path), *sys.path])
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_info_survives_a_plugin_that_exits_at_import(exiting_plugin_path):
    out = _run(["-m", "aigc_ext.cli", "info", "--json"], exiting_plugin_path)
    assert out.returncode == 0, out.stderr
    assert "'exiter' (distribution exit-plugin) failed to import: SystemExit: 7" in out.stderr
    assert "cpu" in [b["name"] for b in json.loads(out.stdout)["backends"]]


def test_attention_call_survives_a_plugin_that_exits_at_import(exiting_plugin_path):
    code = textwrap.dedent(
        """
        import torch, aigc_ext
        q = torch.randn(1, 2, 4, 8)
        out = aigc_ext.scaled_dot_product_attention(q, q, q)
        print("shape", tuple(out.shape))
        """
    )
    out = _run(["-c", code], exiting_plugin_path)
    assert out.returncode == 0, out.stderr
    assert "shape (1, 2, 4, 8)" in out.stdout
    assert "SystemExit: 7" in out.stderr


# --- checks that raise ------------------------------------------------------------------------


def _raise(*_):
    raise ValueError("probe failed")


class CountingBackend:
    """A backend function that counts its calls and returns what ``result`` makes of the
    reference output."""

    def __init__(self, result=lambda out, q: out):
        self.calls = 0
        self.result = result

    def __call__(self, q, k, v, *args):
        self.calls += 1
        return self.result(sdpa_reference(q, k, v, *args), q)


def _backend_plugin(name, fn, **kwargs):
    class Plugin:
        @hookimpl
        def aigc_register_attention_backends(self, register):
            register(name, fn, devices=("cpu",), **kwargs)

    return Plugin()


def test_unavailable_reason_that_raises_makes_the_backend_unavailable(capsys):
    plugin = _backend_plugin("probe-raises", CountingBackend(), unavailable_reason=_raise)
    with register_plugin(plugin, name="probe-plugin"):
        row = _row("probe-raises")
        assert not row.available
        assert row.reason == (
            "its unavailable_reason check raised ValueError: probe failed (plugin probe-plugin)"
        )
        assert main(["info", "--json"]) == 0
        listed = {b["name"]: b for b in json.loads(capsys.readouterr().out)["backends"]}
        assert not listed["probe-raises"]["available"]
        assert "ValueError: probe failed" in listed["probe-raises"]["reason"]
        assert main(["info"]) == 0
        assert "ValueError: probe failed (plugin probe-plugin)" in capsys.readouterr().out
        (impl,) = [i for i in available_impls("cpu") if i.name == "probe-raises"]
        assert "ValueError: probe failed" in impl.unavailable
        with pytest.raises(aigc_ext.BackendError, match=r"'probe-raises' is not available.*probe"):
            with aigc_ext.use_backend("probe-raises"):
                pass


def test_unsupported_reason_that_raises_skips_the_backend(fresh_warnings):
    fn = CountingBackend()
    plugin = _backend_plugin("check-raises", fn, priority=1000, unsupported_reason=_raise)
    q, k, v = _qkv()
    with register_plugin(plugin, name="check-plugin"):
        with pytest.warns(PluginWarning) as record:
            out = aigc_ext.scaled_dot_product_attention(q, k, v)
        (message,) = _messages(record)
        assert "'check-raises'" in message and "plugin check-plugin" in message
        assert "ValueError: probe failed" in message
        assert record[0].filename == __file__
        torch.testing.assert_close(out, sdpa_reference(q, k, v))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once
            aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert fn.calls == 0
        assert dispatch.backend_usage().get("check-raises", 0) == 0
        with aigc_ext.use_backend("check-raises"):
            with pytest.raises(
                aigc_ext.BackendError,
                match=r"'check-raises' cannot serve this call: its unsupported_reason check "
                r"raised ValueError: probe failed \(plugin check-plugin\)",
            ):
                aigc_ext.scaled_dot_product_attention(q, k, v)
        assert fn.calls == 0


# --- results that are not attention's --------------------------------------------------------


WRONG_RESULTS = {
    "shape": (
        lambda out, q: torch.zeros(3, 3),
        r"returned shape \(3, 3\), expected \(2, 2, 5, 8\)",
    ),
    "type": (lambda out, q: "not a tensor", r"returned str, not a Tensor"),
    "dtype": (lambda out, q: out.double(), r"returned dtype torch.float64, expected .*float32"),
    "device": (lambda out, q: out.to("meta"), r"returned a tensor on meta, expected .* cpu"),
}


@pytest.mark.parametrize("kind", WRONG_RESULTS)
def test_wrong_result_disables_the_backend_and_the_call_falls_back(kind, fresh_warnings):
    result, problem = WRONG_RESULTS[kind]
    fn = CountingBackend(result)
    q, k, v = _qkv()
    with register_plugin(_backend_plugin("wrong", fn, priority=1000), name="wrong-plugin"):
        with pytest.warns(
            PluginWarning, match=rf"'wrong' \(plugin wrong-plugin\) {problem}.*disabled"
        ) as record:
            out = aigc_ext.scaled_dot_product_attention(q, k, v)
        assert record[0].filename == __file__
        assert fn.calls == 1
        torch.testing.assert_close(out, sdpa_reference(q, k, v))  # served by the next backend
        row = _row("wrong")
        assert not row.available and row.reason.startswith("disabled: it returned")
        out = aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert fn.calls == 1  # never called again
        torch.testing.assert_close(out, sdpa_reference(q, k, v, is_causal=True))
    # a backend registered again under that name starts afresh
    good = CountingBackend()
    with register_plugin(_backend_plugin("wrong", good), name="wrong-plugin"):
        assert _row("wrong").available


def test_wrong_result_under_patch_sdpa_falls_back(fresh_warnings):
    fn = CountingBackend(WRONG_RESULTS["shape"][0])
    q, k, v = _qkv()
    with register_plugin(_backend_plugin("wrong", fn, priority=1000), name="wrong-plugin"):
        with aigc_ext.patch_sdpa():
            with pytest.warns(PluginWarning, match=r"'wrong' \(plugin wrong-plugin\) returned"):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            torch.testing.assert_close(out, sdpa_reference(q, k, v))
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert fn.calls == 1


@pytest.mark.parametrize("kind", WRONG_RESULTS)
def test_wrong_result_of_a_forced_backend_raises(kind):
    result, problem = WRONG_RESULTS[kind]
    q, k, v = _qkv()
    with register_plugin(_backend_plugin("wrong", CountingBackend(result)), name="wrong-plugin"):
        with aigc_ext.use_backend("wrong"):
            with pytest.raises(
                aigc_ext.BackendError, match=rf"'wrong' \(plugin wrong-plugin\) {problem}"
            ):
                aigc_ext.scaled_dot_product_attention(q, k, v)
        assert _row("wrong").available  # the caller asked for it: told, not disabled


def test_forced_calls_are_checked_after_the_first_calls():
    # Right for the first CHECKED_CALLS calls, then wrong: a forced call is still caught.
    state = {"n": 0}

    def result(out, q):
        state["n"] += 1
        return out if state["n"] <= dispatch.CHECKED_CALLS else out[..., :1]

    q, k, v = _qkv()
    with register_plugin(_backend_plugin("late", CountingBackend(result)), name="late-plugin"):
        with aigc_ext.use_backend("late"):
            for _ in range(dispatch.CHECKED_CALLS):
                aigc_ext.scaled_dot_product_attention(q, k, v)
            with pytest.raises(aigc_ext.BackendError, match=r"'late' .*shape \(2, 2, 5, 1\)"):
                aigc_ext.scaled_dot_product_attention(q, k, v)


def test_plugin_backends_are_checked_and_builtins_trusted():
    fn = CountingBackend()
    with register_plugin(_backend_plugin("checked", fn), name="checked-plugin"):
        plugin_backend = dispatch.get_backend("checked")
        assert not plugin_backend.trusted and plugin_backend.fn.__wrapped__ is fn
    cpu = dispatch.get_backend("cpu")
    assert cpu.trusted and cpu.fn is builtin_cpu.serve  # called as it is: no per-call cost
    assert dispatch.get_backend("reference").trusted


def test_a_plugin_cannot_make_its_backend_trusted():
    class Sneaky:
        @hookimpl
        def aigc_register_attention_backends(self, register):
            register("sneaky", CountingBackend(), trusted=True)

    with register_plugin(Sneaky(), name="sneaky"):
        assert not dispatch.get_backend("sneaky").trusted


# --- AIGC_EXT_PLUGINS: entry-point or distribution names --------------------------------------


def test_env_plugins_takes_distribution_names(installed, monkeypatch):
    class Other:
        @hookimpl
        def aigc_register_objectives(self, register):
            register("iso-objective", lambda model, batch: 0.0)

    eps = (
        FakeEntryPoint("aug", AugPlugin(), "My_Aug.Plugin"),
        FakeEntryPoint("other", Other(), "other-dist"),
    )
    for wanted in ("my-aug-plugin", "MY_AUG_PLUGIN", "my.aug--plugin", "My_Aug.Plugin", "aug"):
        monkeypatch.setenv("AIGC_EXT_PLUGINS", wanted)
        installed(*eps)
        with warnings.catch_warnings():
            warnings.simplefilter("error", PluginWarning)
            assert [i.name for i in plugins.get_plugins()] == ["aug"], wanted
    monkeypatch.setenv("AIGC_EXT_PLUGINS", "other-dist, aug")
    installed(*eps)
    assert sorted(i.name for i in plugins.get_plugins()) == ["aug", "other"]


def test_env_plugins_unknown_name_lists_the_names_that_exist(installed, monkeypatch):
    monkeypatch.setenv("AIGC_EXT_PLUGINS", "augg")
    installed(FakeEntryPoint("aug", AugPlugin(), "aug-dist"))
    with pytest.warns(PluginWarning) as record:
        assert plugins.get_plugins() == []
    (message,) = _messages(record, PluginWarning)
    assert "'augg' is named in AIGC_EXT_PLUGINS but not installed" in message
    assert "'aug' (distribution 'aug-dist')" in message
    assert (
        "built-in, always loaded: 'aigc_ext.default_plugins.backends' (distribution 'aigc-ext')"
        in message
    )
    monkeypatch.setenv("AIGC_EXT_STRICT_PLUGINS", "1")
    installed(FakeEntryPoint("aug", AugPlugin(), "aug-dist"))
    with pytest.raises(PluginError, match=r"'augg' is named.*'aug' \(distribution 'aug-dist'\)"):
        plugins.get_plugins()


def test_env_plugins_accepts_builtin_names_without_a_warning(installed, monkeypatch):
    monkeypatch.setenv("AIGC_EXT_PLUGINS", "aigc_ext.default_plugins.strategies,aigc_ext")
    installed(FakeEntryPoint("aug", AugPlugin(), "aug-dist"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        assert plugins.get_plugins() == []
    assert "aigc_ext.default_plugins.strategies" in {
        i.name for i in plugins.get_plugins(include_builtins=True)
    }


example_installed = pytest.mark.skipif(
    not any(ep.name == EXAMPLE_EP for ep in plugins.metadata.entry_points(group="aigc_ext")),
    reason="examples/aigc-ext-plugin-example is not installed",
)


@example_installed
@pytest.mark.parametrize(
    "wanted",
    [
        EXAMPLE,
        "AIGC_EXT_Plugin.Example",
        EXAMPLE_EP,
        f"aigc_ext.default_plugins.strategies,{EXAMPLE}",
    ],
)
def test_env_plugins_selects_the_example_by_either_name(wanted, reload_plugins):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        reload_plugins(AIGC_EXT_PLUGINS=wanted)
    assert [(i.distribution, i.entry_point) for i in plugins.get_plugins()] == [
        (EXAMPLE, EXAMPLE_EP)
    ]
    assert "example-naive" in {r.name for r in aigc_ext.backends()}


@example_installed
def test_env_plugins_unknown_name_names_the_example(reload_plugins):
    with pytest.warns(PluginWarning) as record:
        reload_plugins(AIGC_EXT_PLUGINS="aigc-ext-plugin-exampel")
    (message,) = _messages(record, PluginWarning)
    assert f"'{EXAMPLE_EP}' (distribution '{EXAMPLE}')" in message
    assert plugins.get_plugins() == []
    assert "example-naive" not in {r.name for r in aigc_ext.backends()}


@example_installed
def test_cli_plugins_shows_distribution_and_entry_point(reload_plugins, capsys):
    reload_plugins()
    assert main(["plugins", "--all"]) == 0
    out = capsys.readouterr().out
    assert f"{EXAMPLE} 0.1.0 (entry point '{EXAMPLE_EP}')" in out
    assert "(built-in, plugin 'aigc_ext.default_plugins.strategies')" in out
    assert "(built-in, plugin 'aigc_ext.default_plugins.backends')" in out
    assert main(["plugins", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (example,) = [p for p in doc["plugins"] if p["name"] == EXAMPLE_EP]
    assert (example["distribution"], example["entry_point"]) == (EXAMPLE, EXAMPLE_EP)
