"""Fixtures shared by the test suite.

Tests of the attention contract are parametrised by backend: ``backend`` takes the name of every
available fused backend that runs on the device under test (``AIGC_EXT_TEST_DEVICE``, default
``cpu``), so a new backend (triton, cuda) runs the same tests by registering itself.

Without a CUDA device the triton backend is exercised on CPU tensors through Triton's
interpreter (turned on here, before anything imports Triton); it then runs its own small-shape
suite (``tests/attention/test_triton.py``) rather than this whole contract suite.
"""

from __future__ import annotations

import os

import torch


def _turn_on_triton_interpreter() -> None:
    """Tests the triton backend on CPU tensors through Triton's interpreter when there is no GPU.

    Triton reads ``TRITON_INTERPRET`` when its kernels are decorated and the backend registry
    reads it when the plugins load, so it is set here, before either happens. An explicit
    setting (``TRITON_INTERPRET=0`` or ``=1``) is left alone; with a CUDA device the interpreter
    is never turned on.
    """
    if "TRITON_INTERPRET" in os.environ or os.environ.get("AIGC_EXT_TEST_DEVICE", "cpu") != "cpu":
        return
    if torch.cuda.is_available():
        return
    os.environ["TRITON_INTERPRET"] = "1"


_turn_on_triton_interpreter()

import pytest  # noqa: E402
from sdpa_testing import DEVICE, fused_backends  # noqa: E402

from aigc_ext import dispatch  # noqa: E402

# Backends that run on the device under test only through an interpreter: far too slow for the
# whole contract suite, they run their own tests on small shapes (tests/attention/test_triton.py) unless
# AIGC_EXT_TEST_INTERPRETED=1 asks for the contract suite too.
INTERPRETED_BACKENDS = (
    {"triton"} if DEVICE == "cpu" and os.environ.get("AIGC_EXT_TEST_INTERPRETED") != "1" else set()
)
FUSED_BACKENDS = [b for b in fused_backends(DEVICE) if b not in INTERPRETED_BACKENDS]


def pytest_report_header(config):
    return f"aigc_ext: device under test {DEVICE}; fused backends {FUSED_BACKENDS}"


@pytest.fixture(
    params=FUSED_BACKENDS
    or [pytest.param(None, marks=pytest.mark.skip(reason=f"no fused backend on {DEVICE}"))]
)
def backend(request) -> str:
    """Name of a fused backend under test; use it with ``aigc_ext.use_backend(backend)``."""
    return request.param


@pytest.fixture
def cpu_backend(backend) -> str:
    """Like ``backend``, for tests of the C++ CPU kernel's own settings."""
    if backend != "cpu":
        pytest.skip("CPU kernel settings apply to the cpu backend only")
    return backend


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forgets which one-time fallback warnings were already shown."""
    monkeypatch.setattr(dispatch, "_warned", set())


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """No backend forced from the environment, default kernel settings, a fixed seed."""
    monkeypatch.delenv("AIGC_EXT_BACKEND", raising=False)
    torch.manual_seed(0)
    yield
    if DEVICE == "cpu":
        from aigc_ext import ops

        ops.cpu_kernel_config(isa="auto", use_brgemm=True, use_amx=True, use_avx512_bf16="auto")
