"""Emulated CPU families (aigc_ext.bench.emulate): the environment, the restart, the roofline."""

from __future__ import annotations

import os
import sys

import pytest
from bench_scripts import load_benchmark

from aigc_ext.bench import emulate, measure, roofline

ALL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


class Restarted(Exception):
    def __init__(self, path, argv, env):
        super().__init__(path)
        self.path, self.argv, self.env = path, argv, env


@pytest.fixture
def no_emulation(monkeypatch):
    for emulation in emulate.EMULATIONS.values():
        for key in emulation.env:
            monkeypatch.delenv(key, raising=False)


def _set_env(monkeypatch, name):
    for key, value in emulate.EMULATIONS[name].env.items():
        monkeypatch.setenv(key, value)


def _capture_exec(monkeypatch):
    def fake_execve(path, argv, env):
        raise Restarted(path, argv, env)

    monkeypatch.setattr(os, "execve", fake_execve)


@pytest.mark.parametrize("name", sorted(emulate.EMULATIONS))
def test_active_needs_the_whole_environment(name):
    emulation = emulate.EMULATIONS[name]
    assert emulate.active(dict(emulation.env)) is emulation
    partial = dict(emulation.env)
    partial.pop(next(iter(partial)))
    assert emulate.active(partial) is None
    assert emulate.active({}) is None


@pytest.mark.parametrize("name", sorted(emulate.EMULATIONS))
def test_reexec_restarts_python_with_the_limits_set(monkeypatch, no_emulation, name):
    _capture_exec(monkeypatch)
    with pytest.raises(Restarted) as e:
        emulate.reexec(name, ["script.py", "--emulate", name], ALL_FLAGS)
    assert e.value.path == sys.executable
    assert e.value.argv == [sys.executable, "script.py", "--emulate", name]
    for key, value in emulate.EMULATIONS[name].env.items():
        assert e.value.env[key] == value
    assert e.value.env.get("PATH") == os.environ.get("PATH")  # the rest of the environment kept


def test_reexec_returns_once_the_limits_are_in_effect(monkeypatch):
    _capture_exec(monkeypatch)
    _set_env(monkeypatch, "avx2")
    assert emulate.reexec("avx2", ["script.py"], ALL_FLAGS) is None


def test_reexec_refuses_unknown_families_and_missing_hardware(monkeypatch, no_emulation):
    _capture_exec(monkeypatch)
    with pytest.raises(ValueError, match="unknown CPU family 'zen9'"):
        emulate.reexec("zen9", ["script.py"], ALL_FLAGS)
    with pytest.raises(ValueError, match="lacks avx512_bf16"):
        emulate.reexec("avx512", ["script.py"], ("avx2", "fma", "avx512f"))


@pytest.mark.parametrize("via_probe", [True, False])
def test_the_roofline_hides_what_the_emulated_family_lacks(monkeypatch, no_emulation, via_probe):
    info = {k: "1" for k in ALL_FLAGS}
    monkeypatch.setattr(measure, "fma_info", lambda: info if via_probe else None)
    if not via_probe:
        import builtins
        import io

        real_open = builtins.open

        def fake_open(path, *a, **k):
            if path == "/proc/cpuinfo":
                return io.StringIO("flags\t\t: " + " ".join(ALL_FLAGS) + "\n")
            return real_open(path, *a, **k)

        monkeypatch.setattr(builtins, "open", fake_open)
    assert all(roofline.cpu_features().values())
    _set_env(monkeypatch, "avx512")
    features = roofline.cpu_features()
    assert features["avx512_bf16"] and not features["amx_bf16"] and not features["amx_fp16"]
    _set_env(monkeypatch, "avx2")
    assert not any(roofline.cpu_features().values())


def _load_script(monkeypatch):
    return load_benchmark("bench_cpu_attention", monkeypatch, "bench_cpu_attention_emulate")


def test_the_benchmark_restarts_itself_and_sets_the_kernel(monkeypatch, no_emulation):
    script = _load_script(monkeypatch)
    _capture_exec(monkeypatch)
    argv = ["--emulate", "avx2", "--seqs", "64", "--quick"]
    if "avx2" not in script._cpu_flags():
        pytest.skip("the CPU has no AVX2")
    with pytest.raises(Restarted) as e:
        script.parse_args(argv)
    assert e.value.argv[-len(argv) :] == argv
    assert e.value.env["ATEN_CPU_CAPABILITY"] == "avx2"
    # In the restarted process the limits are set: the kernel follows, an explicit setting wins.
    _set_env(monkeypatch, "avx2")
    assert script.parse_args(argv).cpu_kernel == {"isa": "avx2"}
    args = script.parse_args([*argv, "--cpu-kernel", "isa=default"])
    assert args.cpu_kernel == {"isa": "default"}


def test_the_benchmark_names_a_family_the_cpu_cannot_stand_in_for(monkeypatch, no_emulation):
    script = _load_script(monkeypatch)
    monkeypatch.setattr(script, "_cpu_flags", lambda: ["avx2", "fma"])
    with pytest.raises(SystemExit):
        script.parse_args(["--emulate", "avx512"])
