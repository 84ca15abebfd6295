"""Pieces of ``aigc_ext.bench``: the float64 reference, the error rule, sweeps, percentiles."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from aigc_ext import bench
from aigc_ext.backends.reference.ops import sdpa_reference
from aigc_ext.bench import correctness, measure, runner
from aigc_ext.bench.config import BenchConfig, Case, UsageError, quick_config
from aigc_ext.bench.correctness import ErrorRule, reference64, run_with_grads
from aigc_ext.bench.problem import make_problem


@pytest.mark.parametrize("mask", ["none", "padding", "arbitrary"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference64_matches_sdpa_reference_with_autograd(monkeypatch, mask, causal):
    # GQA, L != S, Ev != E, and blocks of 3 query rows so that the blocking is exercised.
    case = Case("fwd+bwd", "bf16", 2, 4, 2, 13, 17, 8, 5, causal, mask)
    p = make_problem(case, seed=3)
    monkeypatch.setattr(correctness, "_SCORE_BLOCK_BYTES", 8 * 2 * 17 * 3)
    ours = reference64(p)

    def attn(q, k, v):
        return sdpa_reference(
            q, k, v, attn_mask=p.mask, is_causal=causal, scale=p.scale, enable_gqa=True
        )

    p64 = dataclasses.replace(p, grad_out=p.grad_out.double())
    q, k, v = (t.double() for t in (p.query, p.key, p.value))
    expected = run_with_grads(attn, p64, q, k, v)
    assert len(ours) == len(expected) == 4
    for name, a, b in zip(correctness.TENSOR_NAMES, ours, expected, strict=True):
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        assert (a - b).abs().max().item() < 1e-12, name


def test_reference64_keeps_the_thread_count():
    threads = torch.get_num_threads()
    reference64(make_problem(Case("fwd", "fp32", 1, 2, 2, 8, 8, 4, 4, False, "none")))
    assert torch.get_num_threads() == threads


def test_error_rule_bounds_and_non_finite_results():
    ref = [torch.zeros(4, dtype=torch.float64)]
    rule = ErrorRule(ref, [torch.full((4,), 1e-3)])
    assert rule.bounds["out"] == pytest.approx(2e-3 + 1e-5)
    assert rule.check([torch.full((4,), 2e-3)]).ok
    bad = rule.check([torch.full((4,), 3e-3)])
    assert not bad.ok and "out: max err 3.00e-03 > bound" in bad.describe_failure()
    nan = rule.check([torch.tensor([0.0, float("nan"), 0.0, 0.0])])
    assert not nan.ok and math.isinf(nan.max_err)


def test_rows_stay_unchecked_with_a_reason_when_the_yardstick_fails(monkeypatch):
    def broken(p):
        raise RuntimeError("no yardstick")

    monkeypatch.setattr(runner, "torch_baseline", broken)
    config = BenchConfig(
        heads=[2], seq=[8], head_dim=[4], dtype=["fp32"], causal=[False], mode=["fwd"],
        backends=["cpu"], reps=1, warmup=0,
    )  # fmt: skip
    (row,) = bench.run(config, peaks={"fp32": 1.0})
    assert row.status == "ok" and row.correct is None
    assert "not checked" in row.reason and "no yardstick" in row.reason


def test_percentile_interpolates():
    assert measure.percentile([3.0], 20) == 3.0
    assert measure.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert measure.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 20) == pytest.approx(1.8)
    assert measure.percentile([5.0, 1.0], 80) == pytest.approx(4.2)
    with pytest.raises(ValueError, match="empty"):
        measure.percentile([], 50)


def test_peak_memory_counts_a_large_allocation():
    mib = measure.peak_memory_mib(lambda: torch.ones(64 * 2**20 // 4), "cpu")
    if mib is None:
        pytest.skip("the peak resident set cannot be reset here")
    assert 48 <= mib <= 256


def test_sweep_product_and_decode_rows():
    config = BenchConfig(
        batch=[1],
        heads=[8],
        kv_heads=[2],
        seq=[64, 128],
        decode_seq=[1024],
        head_dim=[32],
        dtype=["fp32", "bf16"],
        causal=[False, True],
        mask=["none"],
        mode=["fwd", "decode"],
    )
    cases = config.cases()
    fwd = [c for c in cases if c.mode == "fwd"]
    decode = [c for c in cases if c.mode == "decode"]
    assert len(fwd) == 2 * 2 * 2  # dtype x causal x seq
    assert len(decode) == 2  # one per dtype: decode rows are never causal
    assert all((c.seq_q, c.seq_kv, c.causal) == (1, 1024, False) for c in decode)
    assert all((c.heads, c.kv_heads) == (8, 2) for c in cases)
    assert len({c.key for c in cases}) == len(cases)


def test_explicit_shapes_replace_the_shape_dimensions():
    config = BenchConfig(
        shapes=[((2, 8, 64, 32), (2, 2, 96, 32), (2, 2, 96, 16))],
        dtype=["fp32"],
        causal=[False],
        mode=["fwd", "decode"],
    )
    config.validate()
    fwd, decode = config.cases()
    assert (fwd.batch, fwd.heads, fwd.kv_heads, fwd.seq_q, fwd.seq_kv) == (2, 8, 2, 64, 96)
    assert (fwd.head_dim, fwd.head_dim_v) == (32, 16)
    assert (decode.seq_q, decode.seq_kv) == (1, 96)
    with pytest.raises(UsageError, match="must agree on every dim but the last"):
        BenchConfig(shapes=[((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 9, 4))]).validate()


def test_quick_preset_is_small_and_valid():
    config = quick_config()
    config.validate()
    cases = config.cases()
    assert {c.dtype for c in cases} == {"fp32", "bf16"}
    assert {c.mode for c in cases} == {"fwd", "fwd+bwd", "decode"}
    assert len(cases) <= 12
    assert config.flex_compile_budget_s == 0  # compiling alone would take most of the minute
    bench.full_config().validate()


def test_flex_without_budget_is_skipped_with_a_reason():
    config = BenchConfig(
        heads=[2], seq=[8], head_dim=[4], dtype=["fp32"], causal=[False], mode=["fwd"],
        backends=["torch-flex"], reps=1, warmup=0, flex_compile_budget_s=0,
    )  # fmt: skip
    (row,) = bench.run(config, peaks={"fp32": 1.0})
    assert row.status == "skipped" and "flex-compile-budget" in row.reason
