"""``python -m aigc_ext``: the command line as a module (``torchrun -m aigc_ext train ...``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "aigc_ext", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_module_help_lists_the_commands():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: aigc-ext")
    for command in ("plugins", "info", "bench", "train"):
        assert command in proc.stdout


def test_module_info():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    assert "cpu" in proc.stdout and "reference" in proc.stdout


def test_module_info_json():
    proc = _run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "cpu" in {b["name"] for b in info["backends"]}


def test_module_without_a_command_fails_like_the_script():
    proc = _run()
    assert proc.returncode == 2 and "required" in proc.stderr
