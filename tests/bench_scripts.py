"""Loading the scripts of benchmarks/ as modules in tests (they are not part of the package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str, monkeypatch, module_name: str | None = None) -> ModuleType:
    """Imports ``benchmarks/<name>.py`` as ``module_name`` (default ``name``) for one test: it is
    in ``sys.modules`` while the test runs, which its dataclasses need."""
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module_name, module)
    spec.loader.exec_module(module)
    return module
