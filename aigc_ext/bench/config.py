"""What to benchmark: the sweep (:class:`BenchConfig`), its rows (:class:`Case`) and the presets.

A sweep is the Cartesian product of its dimensions (batch, query heads, KV heads, query and key
lengths, head dims, dtype, causal, mask kind, mode). Decode rows are the exception: a decode
step is one new query (``L = 1``) attending to a KV cache of length ``S``, so decode rows take
their cache lengths from ``decode_seq`` (else ``kv_seq``, else ``seq``) and are never causal
(the new query sees the whole cache).

A row's FLOPs (:attr:`Case.flop`) follow :func:`aigc_ext.bench.flops.attention_flop`, the FLOP
model the scripts in ``benchmarks/`` share; ``attention_flop`` is importable from here too.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from aigc_ext.bench.flops import attention_flop

__all__ = [
    "DTYPES",
    "MASKS",
    "MAX_HEAD_DIM",
    "MODES",
    "BenchConfig",
    "Case",
    "UsageError",
    "attention_flop",
    "full_config",
    "quick_config",
]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
MODES = ("fwd", "bwd", "fwd+bwd", "decode")
MASKS = ("none", "padding", "arbitrary")
# The largest query/key and value head dims the fused kernels serve (cpu and triton: 256, see
# README.md and docs/triton.md); larger ones are refused up front rather than left to run for
# minutes on the reference paths.
MAX_HEAD_DIM = 256
# torch's generators take seeds in [-2**63, 2**64).
SEED_RANGE = (-(1 << 63), 1 << 64)


class UsageError(ValueError):
    """A benchmark configuration that cannot run (the command exits with code 2)."""


@dataclass(frozen=True)
class Case:
    """One benchmark row without its backend: a problem shape, dtype, masking and mode."""

    mode: str
    dtype: str
    batch: int
    heads: int
    kv_heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    head_dim_v: int
    causal: bool
    mask: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def backward(self) -> bool:
        """Whether the mode runs the backward (and gradients are checked)."""
        return self.mode in ("bwd", "fwd+bwd")

    @property
    def key(self) -> str:
        """A stable identifier: rows of two runs with the same key are compared."""
        return (
            f"{self.mode}/{self.dtype}/B{self.batch}/H{self.heads}/KV{self.kv_heads}"
            f"/L{self.seq_q}/S{self.seq_kv}/E{self.head_dim}/Ev{self.head_dim_v}"
            f"/{'causal' if self.causal else 'full'}/mask={self.mask}"
        )

    @property
    def flop(self) -> float:
        """FLOPs of the row (:func:`~aigc_ext.bench.flops.attention_flop`)."""
        return attention_flop(
            self.batch,
            self.heads,
            self.seq_q,
            self.seq_kv,
            self.head_dim,
            self.head_dim_v,
            self.causal,
            self.mode,
        )

    @property
    def input_bytes(self) -> int:
        """Bytes of the row's inputs as :func:`~aigc_ext.bench.problem.make_problem` builds
        them: query, key, value, the output gradient (backward modes) and the bool mask."""
        b, h, kv, lq, lk = self.batch, self.heads, self.kv_heads, self.seq_q, self.seq_kv
        elements = b * h * lq * self.head_dim + b * kv * lk * (self.head_dim + self.head_dim_v)
        if self.backward:
            elements += b * h * lq * self.head_dim_v
        mask = {"none": 0, "padding": b * lk, "arbitrary": h * lq * lk}[self.mask]
        return elements * self.torch_dtype.itemsize + mask

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchConfig:
    """A sweep and how to measure it. ``None`` dimensions follow another one (see each field).

    :meth:`validate` raises :class:`UsageError` naming the field, the value and what is allowed.
    """

    batch: list[int] = field(default_factory=lambda: [1])
    heads: list[int] = field(default_factory=lambda: [8])
    kv_heads: list[int] | None = None  # None: one KV head per query head
    seq: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])  # L
    kv_seq: list[int] | None = None  # S; None: S = L
    decode_seq: list[int] | None = None  # KV cache lengths of decode rows; None: kv_seq or seq
    head_dim: list[int] = field(default_factory=lambda: [64, 128])  # E
    head_dim_v: list[int] | None = None  # Ev; None: Ev = E
    dtype: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    causal: list[bool] = field(default_factory=lambda: [False, True])
    mask: list[str] = field(default_factory=lambda: ["none"])
    mode: list[str] = field(default_factory=lambda: ["fwd", "fwd+bwd"])
    # Explicit problems, each ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)) as the operator
    # contract shapes query, key and value; when given they replace the shape dimensions above.
    shapes: list[tuple[tuple[int, ...], ...]] | None = None
    backends: list[str] | None = None  # None: every backend known here
    reps: int = 5
    warmup: int = 1
    threads: int | None = None  # None: torch's current intra-op thread count
    device: str = "cpu"
    seed: int = 0
    # Stop timing an implementation on a row once its timed runs add up to this (it always
    # gets one): keeps slow reference implementations from dominating a sweep. None: no limit.
    max_time_s: float | None = 10.0
    memory: bool = True  # measure peak memory per row (during the first warm-up call)
    flex_compile_budget_s: float = 120.0  # total torch.compile time FlexAttention may spend

    def with_overrides(self, **overrides: object) -> BenchConfig:
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> None:
        """Checks every dimension; raises :class:`UsageError` on the first bad one."""
        for name in ("batch", "heads", "seq", "head_dim"):
            _positive_ints(name, getattr(self, name))
        for name in ("kv_heads", "kv_seq", "decode_seq", "head_dim_v"):
            if getattr(self, name) is not None:
                _positive_ints(name, getattr(self, name))
        for name in ("head_dim", "head_dim_v"):
            _head_dims(name, getattr(self, name) or [])
        for name, allowed in (("dtype", DTYPES), ("mask", MASKS), ("mode", MODES)):
            values = getattr(self, name)
            if not values:
                raise UsageError(f"{name}: needs at least one value")
            for v in values:
                if v not in allowed:
                    raise UsageError(
                        f"{name}: unknown value {v!r}; expected one of {', '.join(allowed)}"
                    )
        if not self.causal or any(not isinstance(c, bool) for c in self.causal):
            raise UsageError(f"causal: expected one or more of on, off; got {self.causal!r}")
        for h, kv in itertools.product(self.heads, self.kv_heads or self.heads):
            if h % kv:
                raise UsageError(
                    f"heads/kv_heads: query heads ({h}) must be a multiple of KV heads ({kv}) "
                    "for grouped-query attention"
                )
        for i, shape in enumerate(self.shapes or []):
            _check_shapes(f"shapes[{i}] (--shape)", shape)
        if self.reps < 1:
            raise UsageError(f"reps: must be >= 1, got {self.reps}")
        if self.warmup < 0:
            raise UsageError(f"warmup: must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads: must be >= 1, got {self.threads}")
        if self.max_time_s is not None and not _finite(self.max_time_s, above=0.0):
            raise UsageError(
                f"max_time_s (--max-time): must be a finite number of seconds > 0, "
                f"got {self.max_time_s!r}"
            )
        if not _finite(self.flex_compile_budget_s, at_least=0.0):
            raise UsageError(
                "flex_compile_budget_s (--flex-compile-budget): must be a finite number of "
                f"seconds >= 0, got {self.flex_compile_budget_s!r}"
            )
        low, high = SEED_RANGE
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"seed: must be an integer, got {self.seed!r}")
        if not low <= self.seed < high:
            raise UsageError(f"seed: must be in [-2**63, 2**64) as torch takes it, got {self.seed}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"device: unknown value {self.device!r}; expected cpu, cuda, cuda:N")

    def _shapes(self, decode: bool) -> list[tuple[int, int, int, int, int, int, int]]:
        """(B, Hq, Hkv, L, S, E, Ev) of every problem of the sweep."""
        if self.shapes:
            return [
                (q[0], q[1], k[1], 1 if decode else q[2], k[2], q[3], v[3])
                for q, k, v in self.shapes
            ]
        if decode:
            lengths = [(1, s) for s in (self.decode_seq or self.kv_seq or self.seq)]
        else:
            lengths = [(lq, lk) for lq in self.seq for lk in (self.kv_seq or [lq])]
        return [
            (b, h, h if kv is None else kv, lq, lk, e, e if ev is None else ev)
            for b, h, kv, (lq, lk), e, ev in itertools.product(
                self.batch,
                self.heads,
                self.kv_heads or [None],
                lengths,
                self.head_dim,
                self.head_dim_v or [None],
            )
        ]

    def cases(self) -> list[Case]:
        """The rows of the sweep, in a fixed order (dtype, mode, causal, mask, shape)."""
        cases: list[Case] = []
        for dtype, mode, causal, mask in itertools.product(
            self.dtype, self.mode, self.causal, self.mask
        ):
            decode = mode == "decode"
            for b, h, kv, lq, lk, e, ev in self._shapes(decode):
                case = Case(
                    mode=mode,
                    dtype=dtype,
                    batch=b,
                    heads=h,
                    kv_heads=kv,
                    seq_q=lq,
                    seq_kv=lk,
                    head_dim=e,
                    head_dim_v=ev,
                    causal=causal and not decode,
                    mask=mask,
                )
                if case not in cases:
                    cases.append(case)
        return cases

    def as_dict(self) -> dict:
        return asdict(self)


def _positive_ints(name: str, values: object) -> None:
    if not isinstance(values, list | tuple) or not values:
        raise UsageError(f"{name}: expected one or more positive integers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{name}: sizes must be positive integers, got {v!r}")


def _head_dims(name: str, values: list[int]) -> None:
    for v in values:
        if v > MAX_HEAD_DIM:
            raise UsageError(
                f"{name}: {v} is above {MAX_HEAD_DIM}, the largest head dim the fused kernels serve"
            )


def _finite(value: object, *, above: float | None = None, at_least: float | None = None) -> bool:
    """A real number (not a bool), finite, and ``> above`` / ``>= at_least`` when given."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        value = float(value)
    except OverflowError:
        return False
    if not math.isfinite(value):
        return False
    return (above is None or value > above) and (at_least is None or value >= at_least)


def _check_shapes(name: str, shapes: object) -> None:
    """One explicit problem: query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev)."""
    if not isinstance(shapes, list | tuple) or len(shapes) != 3:
        raise UsageError(f"{name}: expected three shapes (query, key, value), got {shapes!r}")
    for what, shape in zip(("query", "key", "value"), shapes, strict=True):
        if not isinstance(shape, list | tuple) or len(shape) != 4:
            raise UsageError(f"{name}: {what} shape must have 4 dims (B, H, L, E), got {shape!r}")
        _positive_ints(f"{name}: {what} shape", list(shape))
    q, k, v = shapes
    _head_dims(f"{name}: query/key head dim", [q[3]])
    _head_dims(f"{name}: value head dim", [v[3]])
    if q[3] != k[3]:
        raise UsageError(
            f"{name}: query and key head dims differ: query {tuple(q)}, key {tuple(k)} "
            "(the last dims must be equal)"
        )
    if not q[0] == k[0] == v[0]:
        raise UsageError(f"{name}: batch sizes differ: {tuple(q)}, {tuple(k)}, {tuple(v)}")
    if tuple(k[:3]) != tuple(v[:3]):
        raise UsageError(
            f"{name}: key {tuple(k)} and value {tuple(v)} must agree on every dim but the last"
        )
    if q[1] % k[1]:
        raise UsageError(
            f"{name}: query heads ({q[1]}) must be a multiple of KV heads ({k[1]}) "
            "for grouped-query attention"
        )


def quick_config() -> BenchConfig:
    """``--quick``: a small sweep that finishes within a minute on a 2-core CPU.

    fp32 and bf16, causal ``L = S`` in 256 and 1024, ``E = 64``, 8 heads, forward and
    forward+backward, plus one decode step per dtype against a 4096-long KV cache; no separate
    warm-up (the checked call comes first), 3 timed runs, at most 0.15 s of them per
    implementation and row (so slow reference implementations run twice per row).
    FlexAttention is skipped: its first torch.compile alone takes 5-20 s on such a machine
    (``flex_compile_budget_s`` 0).
    """
    return BenchConfig(
        batch=[1],
        heads=[8],
        seq=[256, 1024],
        decode_seq=[4096],
        head_dim=[64],
        dtype=["fp32", "bf16"],
        causal=[True],
        mask=["none"],
        mode=["fwd", "fwd+bwd", "decode"],
        reps=3,
        warmup=0,
        max_time_s=0.15,
        flex_compile_budget_s=0.0,
    )


def full_config() -> BenchConfig:
    """``--full``: fp32, bf16 and fp16; ``L = S`` from 512 to 4096; ``E`` 64 and 128; causal
    and not; no mask and key padding; forward, backward and forward+backward; decode against
    caches of 4096 and 16384 keys."""
    return BenchConfig(
        batch=[1],
        heads=[8],
        seq=[512, 1024, 2048, 4096],
        decode_seq=[4096, 16384],
        head_dim=[64, 128],
        dtype=["fp32", "bf16", "fp16"],
        causal=[False, True],
        mask=["none", "padding"],
        mode=["fwd", "bwd", "fwd+bwd", "decode"],
        reps=5,
        warmup=1,
    )
