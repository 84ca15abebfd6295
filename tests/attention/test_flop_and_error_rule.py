"""The one FLOP model (``aigc_ext.bench.flops``) and the one error rule (``aigc_ext.testing``).

The benchmark scripts count FLOPs with the package's model, and the test suite's
``assert_error_rule`` and ``aigc-ext bench``'s ``ErrorRule`` judge results by the same rule.
"""

from __future__ import annotations

import math

import pytest
import torch
from bench_scripts import load_benchmark
from sdpa_testing import assert_error_rule

from aigc_ext.bench import config, flops
from aigc_ext.bench.correctness import ErrorRule
from aigc_ext.testing import (
    ERROR_ATOL,
    ERROR_FACTOR,
    check_error_rule,
    error_bound,
    max_abs_error,
    within_bound,
)

F64 = torch.float64


def _load_script(name: str, monkeypatch):
    return load_benchmark(name, monkeypatch)


# ----------------------------------------------------------------------------- FLOPs


def test_modes_of_the_flop_model_are_the_sweep_modes():
    assert tuple(flops.MODE_FLOP_FACTOR) == config.MODES
    assert config.attention_flop is flops.attention_flop
    case = config.Case("fwd+bwd", "fp32", 2, 4, 2, 33, 65, 16, 8, True, "none")
    assert case.flop == flops.attention_flop(2, 4, 33, 65, 16, 8, True, "fwd+bwd")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("lq", "lk"), [(1024, 1024), (7, 7), (2, 4), (9, 3)])
def test_gpu_benchmark_counts_with_the_package_model(monkeypatch, causal, lq, lk):
    bench = _load_script("bench_gpu", monkeypatch)
    for mode, package_mode in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
        expected = flops.attention_flop(2, 16, lq, lk, 128, causal=causal, mode=package_mode)
        assert bench.flops(2, 16, lq, lk, 128, causal, mode) == expected
    with pytest.raises(ValueError, match=r"mode: unknown value 'bwd'; expected one of fwd, fwdbwd"):
        bench.flops(1, 1, 4, 4, 8, False, "bwd")


def test_cpu_benchmark_has_no_flop_model_of_its_own(monkeypatch):
    bench = _load_script("bench_cpu_attention", monkeypatch)
    assert bench.attention_flop is flops.attention_flop
    assert not hasattr(bench, "forward_flop") and not hasattr(bench, "BWD_FACTOR")


def test_unknown_mode_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"mode: unknown value 'x'; expected one of fwd, bwd"):
        flops.attention_flop(1, 1, 1, 1, 1, mode="x")


# ----------------------------------------------------------------------------- the error rule


def test_rule_passes_at_the_bound_and_fails_beyond_it():
    ref = torch.zeros(5, dtype=F64)
    base = torch.full((5,), 1e-3)
    assert error_bound(1e-3) == ERROR_FACTOR * 1e-3 + ERROR_ATOL
    at = check_error_rule(torch.full((5,), 2e-3), ref, base)
    assert at.ok and at.baseline_error == pytest.approx(1e-3) and at.error == pytest.approx(2e-3)
    assert at.bound == pytest.approx(2e-3 + 1e-5)
    beyond = check_error_rule(torch.full((5,), 2.02e-3), ref, base)
    assert not beyond.ok
    assert beyond.describe("dq").startswith("dq: max|ours - ref_fp64| = 2.020e-03 > 2 * ")
    loose = check_error_rule(torch.full((5,), 2.02e-3), ref, base, factor=4.0, atol=0.0)
    assert loose.ok and loose.bound == pytest.approx(4e-3)


def test_non_finite_results_fail_and_non_finite_baselines_are_left_out():
    ref = torch.zeros(4, dtype=F64)
    base = torch.tensor([1e-3, float("inf"), 0.0, float("nan")])
    for bad in (float("nan"), float("inf"), float("-inf")):
        result = check_error_rule(torch.tensor([0.0, bad, 0.0, 0.0]), ref, base)
        assert not result.ok and math.isinf(result.error)
    result = check_error_rule(torch.zeros(4), ref, base)
    assert result.ok and result.baseline_error == pytest.approx(1e-3)
    # Without finite_only (the benchmark's measure of torch's error) the bound becomes infinite.
    assert math.isinf(max_abs_error(base, ref)) and max_abs_error(base, ref, finite_only=True) > 0
    assert within_bound(1.0, math.inf) and not within_bound(math.nan, math.inf)


def test_empty_tensors_have_no_error():
    empty = torch.zeros(0, 3, dtype=F64)
    assert max_abs_error(empty.float(), empty) == 0.0
    assert check_error_rule(empty.float(), empty, empty.float()).ok


def test_shapes_that_differ_are_refused_not_broadcast():
    ref = torch.zeros(4, dtype=F64)
    with pytest.raises(
        ValueError, match=r"value has shape \(4, 1\) but reference has shape \(4,\)"
    ):
        max_abs_error(torch.zeros(4, 1), ref)
    with pytest.raises(ValueError, match=r"ours has shape \(1, 4\) but ref64 has shape \(4,\)"):
        check_error_rule(torch.zeros(1, 4), ref, torch.zeros(4))
    with pytest.raises(ValueError, match=r"baseline has shape \(1,\) but ref64 has shape \(4,\)"):
        check_error_rule(torch.zeros(4), ref, torch.zeros(1))


@pytest.mark.parametrize("err", [0.0, 1.9e-3, 2.0e-3, 2.02e-3, 5e-2, float("nan")])
def test_tests_and_benchmark_judge_alike(err):
    ref = torch.linspace(-1, 1, 6, dtype=F64)
    base = (ref + torch.tensor([0.0, 1e-3, -1e-3, 0.0, 5e-4, 0.0], dtype=F64)).float()
    ours = (ref + torch.tensor([0.0, 0.0, err, 0.0, 0.0, 0.0], dtype=F64)).float()
    expected = check_error_rule(ours, ref, base)
    bench = ErrorRule([ref], [base]).check([ours])
    assert bench.ok == expected.ok
    assert bench.bounds["out"] == expected.bound
    if expected.ok:
        assert_error_rule("out", ours, ref, base)
    else:
        with pytest.raises(AssertionError, match=r"out: (max\|ours - ref_fp64\| = |\d+ non-fin)"):
            assert_error_rule("out", ours, ref, base)
