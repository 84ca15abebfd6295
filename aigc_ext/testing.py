"""Helpers for tests: plugin registration and FlashAttention's error rule.

::

    from aigc_ext import hookimpl
    from aigc_ext.testing import register_plugin

    class Plugin:
        @hookimpl
        def aigc_register_augmentations(self, register):
            register("noop", lambda batch, *, generator=None: batch)

    def test_noop():
        with register_plugin(Plugin()):
            assert "noop" in aigc_ext.plugins.get_registry("augmentations")

The error rule is FlashAttention's: an attention result in a given dtype may be at most twice as
far from a float64 reference as PyTorch's own ``scaled_dot_product_attention`` in that dtype,
plus a small absolute slack::

    max|ours - ref_fp64| <= ERROR_FACTOR * max|torch_same_dtype - ref_fp64| + ERROR_ATOL

:func:`check_error_rule` applies it to one tensor; the test suite (``tests/sdpa_testing.py``)
and ``aigc-ext bench`` (:mod:`aigc_ext.bench.correctness`) both build on its parts,
:func:`max_abs_error`, :func:`error_bound` and :func:`within_bound`, so that the two judge
results alike.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from aigc_ext import plugins

__all__ = [
    "ERROR_ATOL",
    "ERROR_FACTOR",
    "ErrorRuleResult",
    "check_error_rule",
    "error_bound",
    "max_abs_error",
    "register_plugin",
    "within_bound",
]

ERROR_FACTOR = 2.0  # ours may be this many times as far from float64 as torch in the same dtype
ERROR_ATOL = 1e-5  # plus this absolute slack (torch's error may be 0, e.g. on tiny problems)


@contextlib.contextmanager
def register_plugin(plugin: object, name: str | None = None) -> Iterator[plugins.PluginInfo]:
    """Registers ``plugin`` for the ``with`` block; afterwards it and its registrations are gone.

    Faults raise :class:`aigc_ext.plugins.PluginError` (strict mode) at entry.
    """
    plugins.load()
    info = plugins.add_plugin(plugin, name, strict=True)
    assert info is not None
    try:
        yield info
    finally:
        plugins.remove_plugin(info.name)


def max_abs_error(
    value: torch.Tensor, reference: torch.Tensor, *, finite_only: bool = False
) -> float:
    """``max|value - reference|``, computed in float64; 0.0 for empty tensors.

    A non-finite difference (NaN or infinity in ``value`` where ``reference`` is finite) makes
    the error infinite, so that such a result never passes :func:`within_bound`. With
    ``finite_only`` those entries are left out instead: the test suite measures torch's own
    error (the yardstick) that way, so that one overflow of torch's does not make the bound
    infinite. Raises ``ValueError`` naming both shapes when they differ (no broadcasting).
    """
    if value.shape != reference.shape:
        raise ValueError(
            f"max_abs_error: value has shape {tuple(value.shape)} but reference has shape "
            f"{tuple(reference.shape)}; they must be equal"
        )
    diff = (value.detach().to(torch.float64) - reference.detach().to(torch.float64)).abs_()
    if finite_only:
        diff = diff[torch.isfinite(diff)]
    if diff.numel() == 0:
        return 0.0
    err = diff.max().item()
    return err if math.isfinite(err) else math.inf  # NaN propagates through max


def error_bound(
    baseline_error: float, *, factor: float = ERROR_FACTOR, atol: float = ERROR_ATOL
) -> float:
    """The largest error the rule allows: ``factor * baseline_error + atol``."""
    return factor * baseline_error + atol


def within_bound(error: float, bound: float) -> bool:
    """Whether ``error`` passes: finite and at most ``bound``."""
    return math.isfinite(error) and error <= bound


@dataclass(frozen=True)
class ErrorRuleResult:
    """The rule applied to one tensor: its error, torch's, and the bound they give."""

    error: float  # max|ours - ref_fp64|
    baseline_error: float  # max|torch_same_dtype - ref_fp64| over its finite entries
    bound: float
    factor: float = ERROR_FACTOR
    atol: float = ERROR_ATOL

    @property
    def ok(self) -> bool:
        return within_bound(self.error, self.bound)

    def describe(self, name: str) -> str:
        """``name``'s error against its bound, spelt out (for failure messages)."""
        relation = "<=" if self.ok else ">"
        return (
            f"{name}: max|ours - ref_fp64| = {self.error:.3e} {relation} {self.factor:g} * "
            f"max|torch - ref_fp64| ({self.baseline_error:.3e}) + {self.atol:.1e} = "
            f"{self.bound:.3e}"
        )


def check_error_rule(
    ours: torch.Tensor,
    ref64: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float = ERROR_FACTOR,
    atol: float = ERROR_ATOL,
) -> ErrorRuleResult:
    """FlashAttention's rule for one tensor: ``ours`` and ``baseline`` against ``ref64``.

    ``baseline`` is torch's result in the dtype under test; its non-finite entries are left out
    of its error (``finite_only``). A non-finite entry of ``ours`` fails the rule. Raises
    ``ValueError`` naming the shapes when ``ours`` or ``baseline`` differs from ``ref64`` in
    shape.
    """
    if baseline.shape != ref64.shape:
        raise ValueError(
            f"check_error_rule: baseline has shape {tuple(baseline.shape)} but ref64 has shape "
            f"{tuple(ref64.shape)}; they must be equal"
        )
    if ours.shape != ref64.shape:
        raise ValueError(
            f"check_error_rule: ours has shape {tuple(ours.shape)} but ref64 has shape "
            f"{tuple(ref64.shape)}; they must be equal"
        )
    base_err = max_abs_error(baseline, ref64, finite_only=True)
    return ErrorRuleResult(
        error=max_abs_error(ours, ref64),
        baseline_error=base_err,
        bound=error_bound(base_err, factor=factor, atol=atol),
        factor=factor,
        atol=atol,
    )
