"""Fixtures shared by the test suite.

Tests of the attention contract are parametrised by backend: ``backend`` takes the name of every
available fused backend that runs on the device under test (``AIGC_EXT_TEST_DEVICE``, default
``cpu``), so a new backend (triton, cuda) runs the same tests by registering itself.
"""

from __future__ import annotations

import pytest
import torch
from sdpa_testing import DEVICE, fused_backends

from aigc_ext import dispatch

FUSED_BACKENDS = fused_backends(DEVICE)


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

        ops.cpu_kernel_config(isa="auto", use_brgemm=True)
