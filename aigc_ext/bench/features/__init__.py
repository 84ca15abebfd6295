"""Benchmarks of the FlashAttention features of the CPU operators, against torch and themselves.

``aigc-ext bench --feature varlen|window|softcap|paged-decode|all [--quick]`` (and
``benchmarks/bench_flash_features.py``) runs them; from Python::

    from aigc_ext.bench import features

    config = features.quick_feature_config().with_overrides(features=("softcap",))
    rows = features.run_features(config)   # one FeatureRow per comparison
    features.print_feature_tables(rows)

Each feature times its contenders in one process, alternating them run by run
(:mod:`~aigc_ext.bench.features.timing`), and reports ratios with their targets:
:mod:`~aigc_ext.bench.features.varlen` (packed batch vs torch SDPA padded and per sequence),
:mod:`~aigc_ext.bench.features.window` (sliding window vs full causal),
:mod:`~aigc_ext.bench.features.softcap` (with vs without) and
:mod:`~aigc_ext.bench.features.paged_decode` (block table vs contiguous cache).
"""

from __future__ import annotations

from aigc_ext.bench.features.config import (
    FEATURE_MODES,
    FEATURES,
    FULL_SIZES,
    QUICK_SIZES,
    FeatureConfig,
    PagedSizes,
    Sizes,
    SoftcapSizes,
    VarlenSizes,
    WindowSizes,
    full_feature_config,
    quick_feature_config,
)
from aigc_ext.bench.features.report import print_feature_tables, write_json
from aigc_ext.bench.features.rows import FeatureRow, Target
from aigc_ext.bench.features.runner import exit_code, plan, run_features

__all__ = [
    "FEATURES",
    "FEATURE_MODES",
    "FULL_SIZES",
    "QUICK_SIZES",
    "FeatureConfig",
    "FeatureRow",
    "PagedSizes",
    "Sizes",
    "SoftcapSizes",
    "Target",
    "VarlenSizes",
    "WindowSizes",
    "exit_code",
    "full_feature_config",
    "plan",
    "print_feature_tables",
    "quick_feature_config",
    "run_features",
    "write_json",
]
