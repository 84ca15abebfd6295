"""``aigc-ext bench --feature``: timings, ratios, rows, labels, checks, exit codes, bad options.

Every problem here is tiny (a few dozen tokens): the tests check the plumbing and the
arithmetic, not the speed.
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

import pytest
import torch

from aigc_ext import cli
from aigc_ext.bench import features
from aigc_ext.bench.features import config as fconfig
from aigc_ext.bench.features import paged_decode, runner, softcap, timing, varlen, window
from aigc_ext.bench.features.config import (
    FeatureConfig,
    PagedSizes,
    Sizes,
    SoftcapSizes,
    UsageError,
    VarlenSizes,
    WindowSizes,
    parse_features,
)
from aigc_ext.bench.features.rows import Target, check_status

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_flash_features.py"

TINY = Sizes(
    varlen=VarlenSizes(sequences=3, min_len=5, max_len=24, heads=4, gqa_kv_heads=2, head_dim=8),
    window=WindowSizes(seq=48, window=8, heads=2, head_dim=8),
    softcap=SoftcapSizes(seq=16, heads=2, head_dim=8),
    paged=PagedSizes(batch=2, heads=4, kv_heads=2, head_dim=8, cache=32, page_sizes=(8, 4)),
)
TINY_CONFIG = FeatureConfig(sizes=TINY, bf16_fallback=TINY, dtypes=("fp32",), reps=3)
TARGETED = {
    ("varlen", "torch padded + key mask"),
    ("window", "full / window"),
    ("window", "per query row"),
    ("softcap", "without / with"),
    ("paged-decode", "paged / contiguous"),
}


@pytest.fixture(scope="module")
def fp32_rows():
    return features.run_features(TINY_CONFIG)


@pytest.fixture
def tiny_quick(monkeypatch):
    """``--quick`` at the tiny sizes, so the command line runs in a second."""
    monkeypatch.setattr(fconfig, "QUICK_SIZES", TINY)


def _bench(*args: str) -> int:
    return cli.main(["bench", *args])


# ----------------------------------------------------------------------------- timing


def test_alternate_times_every_contender_once_per_run_in_rotating_order():
    calls: list[str] = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = timing.alternate(contenders, reps=4, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up round
    runs = [calls[3 + 3 * r : 6 + 3 * r] for r in range(4)]
    assert runs == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert all(len(t) == 4 and min(t) >= 0 for t in times.values())


def test_a_time_limit_stops_the_runs_but_not_below_three():
    def slow() -> None:
        time.sleep(0.002)

    limited = timing.alternate({"a": slow, "b": slow}, reps=10, max_time_s=1e-3)
    assert [len(t) for t in limited.values()] == [timing.MIN_REPS] * 2
    few = timing.alternate({"a": slow}, reps=2, max_time_s=1e-3)
    assert len(few["a"]) == 2
    unlimited = timing.alternate({"a": slow}, reps=5, max_time_s=60.0)
    assert len(unlimited["a"]) == 5
    checked = timing.Timing(reps=2, warmup=1)
    calls: list[int] = []
    checked.run({"a": lambda: calls.append(1)}, checked=True)
    assert len(calls) == 2  # the check call was the warm-up round


@pytest.mark.parametrize("reps, warmup", [(0, 0), (2, -1)])
def test_alternate_rejects_bad_counts(reps, warmup):
    with pytest.raises(ValueError, match=r"reps|warmup"):
        timing.alternate({"a": lambda: None}, reps=reps, warmup=warmup)


def test_paired_ratio_is_taken_run_by_run():
    num, den = [4.0, 9.0, 2.0], [2.0, 3.0, 2.0]
    stats = timing.paired_ratio(num, den)
    assert (stats.median, stats.min, stats.max, stats.n) == (2.0, 1.0, 3.0, 3)
    scaled = timing.paired_ratio(num, den, numerator_scale=1 / 4, denominator_scale=1 / 2)
    assert scaled.median == pytest.approx(stats.median / 2)
    with pytest.raises(ValueError, match="equally long"):
        timing.paired_ratio([1.0], [1.0, 2.0])


def test_target_and_check_status():
    assert Target(">=", 1.8).holds(1.8) and not Target(">=", 1.8).holds(1.79)
    assert Target("<=", 1.1).holds(1.0) and not Target("<=", 1.1).holds(1.2)
    assert str(Target("<=", 1.3)) == "<= 1.3x"
    with pytest.raises(ValueError, match="op"):
        Target("<", 1.0)
    assert check_status(1e-4, 1e-3) == "ok"
    assert check_status(2e-3, 1e-3) == "fail"
    assert check_status(float("nan"), 1e-3) == "fail"
    assert check_status(None, None) == "ok"


def test_milliseconds_print_without_exponents():
    from aigc_ext.bench.features.report import _ms

    assert _ms(timing.Stats(11283.4, 11110.2, 13220.9, 3)) == "11283 (11110-13221)"
    assert _ms(timing.Stats(12.34, 0.01234, 99.96, 3)) == "12.3 (0.0123-100)"
    assert _ms(None) == "-"


# ----------------------------------------------------------------------------- problems


def test_varlen_batch_layouts_hold_the_same_values():
    lengths = [3, 7, 1]
    b = varlen.make_batch(lengths, 4, 2, 8, torch.float32, torch.Generator().manual_seed(0))
    assert b.cu_seqlens.tolist() == [0, 3, 10, 11] and b.cu_seqlens.dtype == torch.int32
    assert b.q_pad.shape == (3, 4, 7, 8) and b.k_pad.shape == (3, 2, 7, 8)
    assert torch.equal(b.unpad(b.q_pad), b.q)
    assert b.mask.shape == (3, 1, 1, 7) and b.mask.sum(-1).flatten().tolist() == lengths
    assert torch.equal(b.per_seq[1][1][0].transpose(0, 1), b.k[3:10])
    assert b.gqa


def test_drawn_lengths_are_seeded_and_in_range():
    sizes = VarlenSizes(sequences=50, min_len=64, max_len=2048)
    a, again, other = (varlen.draw_lengths(sizes, s) for s in (0, 0, 1))
    assert a == again and a != other
    assert len(a) == 50 and min(a) >= 64 and max(a) <= 2048


def test_paged_copy_addresses_every_position_through_the_block_table():
    cache = torch.randn(2, 12, 3, 4)
    pages, table = paged_decode.paged_copy(cache, 4, torch.Generator().manual_seed(0))
    assert pages.shape == (6, 4, 3, 4) and table.shape == (2, 3) and table.dtype == torch.int32
    assert sorted(table.flatten().tolist()) == list(range(6))
    assert table.flatten().tolist() != list(range(6))  # a shuffled page order
    for b in range(2):
        for t in range(12):
            assert torch.equal(pages[table[b, t // 4], t % 4], cache[b, t])
    with pytest.raises(ValueError, match="page_size"):
        paged_decode.paged_copy(cache, 5, torch.Generator())


def test_excess_ratio_takes_the_diagonal_out_of_both_times():
    """Per run (full - diagonal) / (window - diagonal): 8 and 5 here."""
    r = window.excess_ratio([9.0, 11.0], [2.0, 3.0], [1.0, 1.0])
    assert (r.median, r.min, r.max, r.n) == (6.5, 5.0, 8.0, 2)


@pytest.mark.parametrize("seq, win", [(16, 4), (10, 9), (10, 30), (7, None)])
def test_visible_pairs_counts_the_window_mask(seq, win):
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    mask = j <= i
    if win is not None:
        mask &= j >= i - win
    assert window.visible_pairs(seq, win) == int(mask.sum())


# ----------------------------------------------------------------------------- rows


def test_every_feature_gives_its_rows_with_ratios_targets_and_checks(fp32_rows):
    by_feature: dict[str, list] = {}
    for r in fp32_rows:
        by_feature.setdefault(r.feature, []).append(r)
    # varlen: (MHA, GQA) x (fwd, fwd+bwd) x (padded, per sequence); window: 4; 2 each else.
    counts = {f: len(rows) for f, rows in by_feature.items()}
    assert counts == {"varlen": 8, "window": 4, "softcap": 2, "paged-decode": 2}
    assert {r.mode for r in by_feature["varlen"]} == {"fwd", "fwd+bwd"}
    assert {r.subject for r in by_feature["varlen"]} == {
        "ours packed, H=4",
        "ours packed, H=4 KV=2",
    }
    for r in fp32_rows:
        assert r.status == "ok", r
        assert r.dtype == "fp32"
        assert r.subject_ms.n == r.baseline_ms.n == r.ratio.n == 3
        assert 0 < r.ratio.min <= r.ratio.median <= r.ratio.max
        assert r.subject_ms.min <= r.subject_ms.median <= r.subject_ms.max
        targeted = (r.feature, r.baseline if r.feature == "varlen" else r.ratio_name)
        assert (r.target is not None) == (targeted in TARGETED), r
        assert r.holds == (None if r.target is None else r.target.holds(r.ratio.median))
        assert r.note and r.problem.startswith(r.feature.replace("-", " "))
        if r.max_diff is not None:
            assert r.max_diff <= r.tolerance
    # Outputs are compared where both sides compute the same attention.
    assert all(r.max_diff is not None for r in by_feature["varlen"] + by_feature["paged-decode"])
    assert by_feature["window"][0].max_diff is not None
    assert all(r.max_diff is None for r in by_feature["softcap"])
    assert [r.subject for r in by_feature["paged-decode"]] == [
        "paged, 8 per page",
        "paged, 4 per page",
    ]


def test_ratios_follow_the_times_of_the_same_runs(fp32_rows):
    """The window rows share one alternation: their ratios are the per-run quotients."""
    full, per_row, per_pair, less_diagonal = [r for r in fp32_rows if r.feature == "window"]
    assert full.subject_ms == per_row.subject_ms == per_pair.subject_ms == less_diagonal.subject_ms
    s, w = TINY.window.seq, TINY.window.window
    # per row / per pair differ by a constant factor in every run: the pair counts per row.
    factor = (window.visible_pairs(w, None) / w) / (window.visible_pairs(s, w) / s)
    assert per_pair.ratio.median == pytest.approx(per_row.ratio.median * factor, rel=1e-9)
    assert per_pair.ratio.max == pytest.approx(per_row.ratio.max * factor, rel=1e-9)


def test_bf16_rows_are_reduced_without_bf16_matmul_hardware():
    big = Sizes(softcap=SoftcapSizes(seq=64, heads=2, head_dim=8))
    small = Sizes(softcap=SoftcapSizes(seq=16, heads=2, head_dim=8))
    config = FeatureConfig(features=("softcap",), sizes=big, bf16_fallback=small, reps=1)
    jobs = runner.plan(config, bf16_hardware=False)
    assert [(j.dtype, j.reduced, j.sizes.softcap.seq) for j in jobs] == [
        ("fp32", False, 64),
        ("bf16", True, 16),
    ]
    assert not any(j.reduced for j in runner.plan(config, bf16_hardware=True))
    warned: list[str] = []
    rows = features.run_features(config, on_warning=warned.append, bf16_hardware=False)
    assert warned == [runner.BF16_WARNING]
    bf16 = [r for r in rows if r.dtype == "bf16"]
    assert bf16 and all("L=S=16" in r.problem and "reduced" in r.problem for r in bf16)
    assert all("reduced" not in r.problem for r in rows if r.dtype == "fp32")


def test_modes_select_rows_and_threads_are_restored():
    before = torch.get_num_threads()
    config = TINY_CONFIG.with_overrides(modes=("decode",), threads=1)
    assert [j.feature for j in runner.plan(config)] == ["paged-decode"]
    rows = features.run_features(config)
    assert {r.feature for r in rows} == {"paged-decode"}
    assert torch.get_num_threads() == before


def test_an_operator_that_raises_gives_an_error_row_and_the_run_goes_on(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(softcap, "measure_softcap", broken)
    config = TINY_CONFIG.with_overrides(features=("softcap", "paged-decode"))
    rows = features.run_features(config)
    assert [r.status for r in rows] == ["error", "ok", "ok"]
    assert "kernel exploded" in rows[0].reason and rows[0].holds is None
    assert features.exit_code(rows) == 1


# ----------------------------------------------------------------------------- config


def test_parse_features():
    assert parse_features(["all"]) == fconfig.FEATURES
    assert parse_features(["softcap,varlen", "varlen"]) == ("varlen", "softcap")
    with pytest.raises(UsageError, match="unknown feature 'paged'"):
        parse_features(["paged"])


def test_presets_are_the_tracked_problems():
    full, quick = features.full_feature_config(), features.quick_feature_config()
    assert full.sizes.varlen == VarlenSizes(16, 64, 2048, 8, 2, 64)
    assert (full.sizes.window.seq, full.sizes.window.window) == (16384, 1024)
    assert (full.sizes.softcap.seq, full.sizes.softcap.softcap) == (2048, 30.0)
    assert full.sizes.paged == PagedSizes(8, 32, 8, 128, 8192, (256, 16))
    assert quick.reps < full.reps and quick.sizes.window.seq < full.sizes.window.seq
    for c in (full, quick):
        c.validate()


@pytest.mark.parametrize(
    "sizes, match",
    [
        (Sizes(window=WindowSizes(seq=64, window=64)), "window"),
        (Sizes(paged=PagedSizes(cache=100, page_sizes=(16,))), "divides"),
        (Sizes(varlen=VarlenSizes(heads=6, gqa_kv_heads=4)), "multiple"),
        (Sizes(varlen=VarlenSizes(min_len=10, max_len=5)), "max_len"),
    ],
)
def test_impossible_sizes_are_usage_errors(sizes, match):
    with pytest.raises(UsageError, match=match):
        FeatureConfig(sizes=sizes).validate()


# ----------------------------------------------------------------------------- command line


def test_command_prints_tables_and_writes_json(tiny_quick, tmp_path, capsys):
    out = tmp_path / "features.json"
    code = _bench(
        "--feature", "softcap,paged-decode", "--quick", "--dtype", "fp32", "--reps", "2",
        "--max-time", "30", "--no-progress", "--json", str(out),
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.startswith("machine: ")
    assert "softcap: L=S=16" in printed and "paged decode: one step" in printed
    assert "paged / contiguous" in printed and "without / with" in printed
    assert "targets: " in printed and " of 4 hold" in printed
    doc = json.loads(out.read_text())
    assert doc["schema"] == "aigc_ext.bench.features/1" and doc["complete"] is True
    assert [r["feature"] for r in doc["rows"]] == ["softcap"] * 2 + ["paged-decode"] * 2
    assert all(r["ratio"]["n"] == 2 and r["holds"] in (True, False) for r in doc["rows"])
    assert doc["config"]["features"] == ["softcap", "paged-decode"]
    assert doc["config"]["max_time_s"] == 30.0 and doc["config"]["preset"] == "quick"


def test_failed_output_check_exits_1(tiny_quick, monkeypatch, capsys):
    monkeypatch.setitem(varlen.OUTPUT_TOLERANCE, torch.float32, -1.0)  # nothing passes
    code = _bench("--feature", "varlen", "--quick", "--dtype", "fp32", "--mode", "fwd",
                  "--reps", "1", "--no-progress")  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in printed and "failed the output check" in printed


@pytest.mark.parametrize(
    "args, names",
    [
        (["--feature", "nope"], "--feature"),
        (["--feature", "varlen", "--seq", "128"], "--seq"),
        (["--feature", "all", "--backends", "cpu"], "--backends"),
        (["--feature", "all", "--dtype", "fp16"], "--dtype"),
        (["--feature", "window", "--mode", "fwd+bwd"], "--mode"),
        (["--feature", "all", "--reps", "0"], "--reps"),
        (["--feature", "all", "--threads", "0"], "--threads"),
        (["--feature", "all", "--device", "cuda"], "--device"),
        (["--feature", "all", "--max-time", "0"], "--max-time"),
        (["--feature", "all", "--plot", "x.png"], "--plot"),
    ],
)
def test_bad_options_exit_2_with_one_line(args, names, capsys):
    assert _bench(*args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("aigc-ext bench: error: ") and names in lines[0]
    assert captured.out == ""


def test_script_runs_the_same_command(tiny_quick, monkeypatch, capsys):
    argv = [str(SCRIPT), "--quick", "--dtype", "fp32", "--mode", "decode", "--reps", "1",
            "--no-progress"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "paged decode" in printed and "varlen" not in printed


def test_script_bad_feature_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--feature", "warp"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "aigc-ext bench: error: --feature: unknown feature 'warp'; expected one of varlen, "
        "window, softcap, paged-decode, all"
    ]
