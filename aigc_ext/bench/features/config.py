"""What the feature benchmarks run: the features, their problem sizes and the presets.

Four features of the FlashAttention operators (docs/flash-contract.md) are measured, each with
the problem the project tracks (:data:`FULL_SIZES`) or a smaller one (:data:`QUICK_SIZES`,
``--quick``). bf16 runs at the full sizes only on a CPU with bf16 matmul instructions
(AVX512_BF16 or AMX-BF16); elsewhere torch computes bf16 matmuls at about 0.3 GFLOP/s and
bf16 rows fall back to :attr:`FeatureConfig.bf16_fallback` (the quick sizes) with a warning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from aigc_ext.bench.config import SEED_RANGE, UsageError

__all__ = [
    "DTYPES",
    "FEATURES",
    "FEATURE_MODES",
    "FULL_SIZES",
    "QUICK_SIZES",
    "FeatureConfig",
    "PagedSizes",
    "Sizes",
    "SoftcapSizes",
    "UsageError",
    "VarlenSizes",
    "WindowSizes",
    "full_feature_config",
    "parse_features",
    "quick_feature_config",
]

FEATURES = ("varlen", "window", "softcap", "paged-decode")
# The modes each feature is measured in (``--mode`` selects among them).
FEATURE_MODES: dict[str, tuple[str, ...]] = {
    "varlen": ("fwd", "fwd+bwd"),
    "window": ("fwd",),
    "softcap": ("fwd",),
    "paged-decode": ("decode",),
}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class VarlenSizes:
    """A packed batch of ``sequences`` sequences with lengths drawn from ``[min_len,
    max_len]``; measured with ``heads`` query and key heads, and again with ``gqa_kv_heads``
    key heads (grouped-query attention)."""

    sequences: int = 16
    min_len: int = 64
    max_len: int = 2048
    heads: int = 8
    gqa_kv_heads: int = 2
    head_dim: int = 64


@dataclass(frozen=True)
class WindowSizes:
    """Causal attention with the window ``(window, 0)`` at length ``seq`` (batch 1)."""

    seq: int = 16384
    window: int = 1024
    heads: int = 8
    head_dim: int = 64


@dataclass(frozen=True)
class SoftcapSizes:
    """``L = S = seq`` (batch 1), with ``softcap`` and without."""

    seq: int = 2048
    heads: int = 8
    head_dim: int = 64
    softcap: float = 30.0


@dataclass(frozen=True)
class PagedSizes:
    """One decode step (one query row per batch row) against a full cache of ``cache``
    positions, paged with each of ``page_sizes`` and contiguous."""

    batch: int = 8
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    cache: int = 8192
    page_sizes: tuple[int, ...] = (256, 16)


@dataclass(frozen=True)
class Sizes:
    """The problem of every feature."""

    varlen: VarlenSizes = field(default_factory=VarlenSizes)
    window: WindowSizes = field(default_factory=WindowSizes)
    softcap: SoftcapSizes = field(default_factory=SoftcapSizes)
    paged: PagedSizes = field(default_factory=PagedSizes)

    def validate(self, where: str = "sizes") -> None:
        """Raises :class:`UsageError` naming the first impossible size."""
        v, w, s, p = self.varlen, self.window, self.softcap, self.paged
        for name, value in (
            ("varlen.sequences", v.sequences),
            ("varlen.min_len", v.min_len),
            ("varlen.heads", v.heads),
            ("varlen.gqa_kv_heads", v.gqa_kv_heads),
            ("varlen.head_dim", v.head_dim),
            ("window.window", w.window),
            ("window.heads", w.heads),
            ("window.head_dim", w.head_dim),
            ("softcap.seq", s.seq),
            ("softcap.heads", s.heads),
            ("softcap.head_dim", s.head_dim),
            ("paged.batch", p.batch),
            ("paged.heads", p.heads),
            ("paged.kv_heads", p.kv_heads),
            ("paged.head_dim", p.head_dim),
            ("paged.cache", p.cache),
        ):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"{where}.{name}: must be an integer >= 1, got {value!r}")
        if v.max_len < v.min_len:
            raise UsageError(
                f"{where}.varlen: max_len ({v.max_len}) must be >= min_len ({v.min_len})"
            )
        if v.heads % v.gqa_kv_heads:
            raise UsageError(
                f"{where}.varlen: heads ({v.heads}) must be a multiple of gqa_kv_heads "
                f"({v.gqa_kv_heads})"
            )
        if w.seq <= w.window:
            raise UsageError(
                f"{where}.window: seq ({w.seq}) must be longer than the window ({w.window})"
            )
        if not s.softcap > 0:
            raise UsageError(f"{where}.softcap.softcap: must be > 0, got {s.softcap!r}")
        if p.heads % p.kv_heads:
            raise UsageError(
                f"{where}.paged: heads ({p.heads}) must be a multiple of kv_heads ({p.kv_heads})"
            )
        if not p.page_sizes:
            raise UsageError(f"{where}.paged.page_sizes: needs at least one page size")
        for size in p.page_sizes:
            if not isinstance(size, int) or size < 1 or p.cache % size:
                raise UsageError(
                    f"{where}.paged.page_sizes: {size!r} must be an integer >= 1 that divides "
                    f"the cache length {p.cache}"
                )


FULL_SIZES = Sizes()
QUICK_SIZES = Sizes(
    varlen=VarlenSizes(min_len=64, max_len=512),
    window=WindowSizes(seq=4096, window=256),
    softcap=SoftcapSizes(seq=512),
    paged=PagedSizes(cache=2048),
)


@dataclass(frozen=True)
class FeatureConfig:
    """Which features, dtypes and modes to measure, at which sizes, and how often.

    ``modes`` None: every mode of each feature (:data:`FEATURE_MODES`). ``bf16_fallback``: the
    sizes bf16 rows use on a CPU without bf16 matmul instructions.
    """

    features: tuple[str, ...] = FEATURES
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    modes: tuple[str, ...] | None = None
    sizes: Sizes = FULL_SIZES
    bf16_fallback: Sizes = QUICK_SIZES
    reps: int = 5
    warmup: int = 1
    # A comparison stops timing once its runs add up to this (after at least 3 runs; None: all
    # ``reps`` runs): the forward+backward of a padded batch takes seconds per run.
    max_time_s: float | None = 40.0
    seed: int = 0
    threads: int | None = None  # None: torch's current thread count
    preset: str = "full"

    def with_overrides(self, **overrides: object) -> FeatureConfig:
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def modes_of(self, feature: str) -> tuple[str, ...]:
        """The modes ``feature`` is measured in under this configuration (maybe none)."""
        own = FEATURE_MODES[feature]
        return own if self.modes is None else tuple(m for m in own if m in self.modes)

    def validate(self) -> None:
        """Raises :class:`UsageError` naming the first bad field."""
        _known("features (--feature)", self.features, FEATURES)
        _known("dtypes (--dtype)", self.dtypes, DTYPES)
        if self.modes is not None:
            _known(
                "modes (--mode)", self.modes, tuple(dict.fromkeys(sum(FEATURE_MODES.values(), ())))
            )
            if not any(self.modes_of(f) for f in self.features):
                wanted = ", ".join(f"{f}: {' '.join(FEATURE_MODES[f])}" for f in self.features)
                raise UsageError(
                    f"modes (--mode): none of {' '.join(self.modes)} is measured by the selected "
                    f"features ({wanted})"
                )
        if not isinstance(self.reps, int) or self.reps < 1:
            raise UsageError(f"reps (--reps): must be an integer >= 1, got {self.reps!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise UsageError(f"warmup (--warmup): must be an integer >= 0, got {self.warmup!r}")
        if self.max_time_s is not None and not (
            isinstance(self.max_time_s, int | float) and 0 < self.max_time_s < float("inf")
        ):
            raise UsageError(
                f"max_time_s (--max-time): must be a finite number of seconds > 0, "
                f"got {self.max_time_s!r}"
            )
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UsageError(f"threads (--threads): must be an integer >= 1, got {self.threads!r}")
        low, high = SEED_RANGE
        if not isinstance(self.seed, int) or not low <= self.seed < high:
            raise UsageError(
                f"seed (--seed): must be an integer in [-2**63, 2**64), got {self.seed!r}"
            )
        self.sizes.validate("sizes")
        self.bf16_fallback.validate("bf16_fallback")

    def as_dict(self) -> dict:
        return asdict(self)


def _known(name: str, values: tuple[str, ...], allowed: tuple[str, ...] | dict) -> None:
    if not values:
        raise UsageError(f"{name}: needs at least one value")
    for v in values:
        if v not in allowed:
            raise UsageError(f"{name}: unknown value {v!r}; expected one of {', '.join(allowed)}")


def parse_features(values: list[str]) -> tuple[str, ...]:
    """``--feature`` values (space- or comma-separated, ``all`` for every feature) as the
    feature names, in :data:`FEATURES` order; :class:`UsageError` on an unknown name."""
    names = [part.strip().lower() for v in values for part in v.split(",") if part.strip()]
    if not names:
        raise UsageError("--feature: needs a value: " + ", ".join((*FEATURES, "all")))
    chosen = set()
    for name in names:
        if name == "all":
            chosen.update(FEATURES)
        elif name in FEATURES:
            chosen.add(name)
        else:
            raise UsageError(
                f"--feature: unknown feature {name!r}; expected one of "
                + ", ".join((*FEATURES, "all"))
            )
    return tuple(f for f in FEATURES if f in chosen)


def full_feature_config() -> FeatureConfig:
    """The tracked problems, 5 runs per comparison or fewer (at least 3) past 40 s of timed
    runs: a few minutes on 2 cores."""
    return FeatureConfig()


def quick_feature_config() -> FeatureConfig:
    """Smaller problems and 3 runs per comparison: about a minute on 2 cores."""
    return FeatureConfig(
        sizes=QUICK_SIZES, bf16_fallback=QUICK_SIZES, reps=3, max_time_s=None, preset="quick"
    )
