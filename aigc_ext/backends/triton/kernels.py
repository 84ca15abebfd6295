"""Triton kernels of the ``triton`` backend: FlashAttention-2 forward and backward.

Layout and conventions shared by every kernel:

* q ``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)``, out ``(B, Hq, L, Ev)``, with
  arbitrary strides (stride 0 on expanded dims included); query head ``h`` reads key/value head
  ``h // (Hq // Hkv)`` (grouped-query attention without copies).
* Scores are kept in the base-2 domain: ``s2 = (q . k) * scale * log2(e) + bias * log2(e)``, so
  the softmax uses ``exp2``. The stored logsumexp is natural-log (``lse = log2-lse * ln 2``),
  float32, ``-inf`` for a row that sees no key (its output is zero).
* The optional mask is a ``(B, Hq, L, S)`` view with broadcast strides. ``MASK_MODE`` 1 is a key
  vector (the L stride is 0, e.g. a key-padding mask ``(B, 1, 1, S)``): one ``BLOCK_N`` vector
  is read per key block instead of a tile. ``MASK_MODE`` 2 reads tiles. ``MASK_BOOL`` masks are
  passed as uint8 (non-zero = the key takes part). Both kinds are added to the scores (bool as
  0 / -inf).
* Head dims are padded to ``BLOCK_D`` / ``BLOCK_DV`` (powers of two, at least 16) with masked
  loads; ``EVEN_D`` / ``EVEN_DV`` drop those masks when no padding is needed.
* Each key (or query) loop runs in stages: full blocks that need no causal or boundary
  masking, and the diagonal / tail blocks with masking.
* Non-finite values follow torch's math backend. A NaN score (NaN in q, k or a float mask;
  ``inf * 0`` or ``inf - inf`` from +-inf in q or k) makes its row NaN: the running max drops
  NaN (``maxnum``, on the GPU as in the interpreter) but ``exp2(NaN - m)`` carries it into the
  row sum and the output, and the backward reads the row's NaN logsumexp. Masks, bool ones
  included, are added to the scores (0 / -inf), so a NaN score at a hidden position still makes
  its row NaN, as in torch; -inf from masking alone is not NaN (a row that sees no key gives
  zeros). Causally hidden scores and the padding of ragged tiles are set to -inf instead: the
  kernels never read the key blocks above the diagonal, which torch's math (adding the causal
  mask) does see, so a NaN there reaches torch's rows and not ours. NaN in v reaches a row
  through ``P V`` (``0 * NaN``) wherever the row reads that key's block.
* Huge finite scores: the forward subtracts the running max from exactly rounded scores (no
  FMA of the scale into the exponent; see :func:`_scale_scores`), so the top score's
  probability is 1 at any scale. The backward recomputes probabilities from the stored
  logsumexp and clamps their exponent at 0 (``p <= 1``), so rounding in that round trip can
  make them inexact at extreme scales but never infinite.
* ``PRECISE``: float32 inputs, dots in IEEE float32 (no TF32). ``UPCAST``: dots on float32
  copies of the operands; set only under the Triton interpreter for bfloat16, whose bfloat16
  dot is wrong there.

Autotuning: every kernel is tuned per (bucketed sequence lengths, head dims, causal, mask mode,
dtypes). ``AIGC_EXT_TRITON_AUTOTUNE=fast`` (read at import) keeps the two most likely configs
per kernel; under the interpreter a single small config is used.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.language.extra import libdevice

__all__ = [
    "AUTOTUNE_MODE",
    "DKDV_CONFIGS",
    "DQ_CONFIGS",
    "FWD_CONFIGS",
    "INTERPRET",
    "LN2",
    "LOG2E",
    "attn_bwd_dkdv",
    "attn_bwd_dq",
    "attn_bwd_preprocess",
    "attn_fwd",
    "select_configs",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Triton decides at decoration time whether @triton.jit compiles or interprets.
INTERPRET = bool(knobs.runtime.interpret)
# Compiled CUDA code multiplies scores by the scale with an explicitly rounded multiply that the
# compiler cannot fuse (see _scale_scores); the interpreter has no libdevice and does not fuse,
# ROCm's libdevice has no mul_rn.
_ROUNDED_MUL = tl.constexpr(not INTERPRET and torch.version.hip is None)
AUTOTUNE_MODE = os.environ.get("AIGC_EXT_TRITON_AUTOTUNE", "full").strip().lower() or "full"
if AUTOTUNE_MODE not in ("full", "fast"):
    raise ValueError(f"AIGC_EXT_TRITON_AUTOTUNE must be 'full' or 'fast'; got {AUTOTUNE_MODE!r}")

# Block sizes under the interpreter (one config per kernel): test shapes of a few dozen rows
# still span several query and key blocks, ragged tails and the causal diagonal, and the dK/dV
# kernel gets BLOCK_M < BLOCK_N as its GPU configs have.
INTERPRET_FWD = (64, 32)
INTERPRET_DKDV = (32, 64)
INTERPRET_DQ = (64, 32)

# Shared memory a config may plan for, in bytes (per block: sm80 163 KB, sm90 227 KB; a config
# that still does not fit is skipped by the autotuner when it fails to compile).
_SMEM_BUDGET = 220 * 1024


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages
    )


# Forward: the first configs are the likely winners on sm90 / sm80 for head dims 64-128.
FWD_CONFIGS = [
    _cfg(128, 64, 8, 3),
    _cfg(128, 128, 8, 3),
    _cfg(128, 64, 4, 3),
    _cfg(128, 32, 4, 4),
    _cfg(64, 64, 4, 3),
    _cfg(64, 128, 4, 3),
    _cfg(128, 128, 8, 2),
    _cfg(64, 32, 4, 2),
    _cfg(64, 64, 8, 2),
]
# dK/dV: BLOCK_N keys stay in registers, BLOCK_M queries stream by.
DKDV_CONFIGS = [
    _cfg(32, 128, 4, 3),
    _cfg(64, 128, 8, 3),
    _cfg(32, 64, 4, 3),
    _cfg(64, 64, 4, 2),
]
# dQ: BLOCK_M queries stay in registers, BLOCK_N keys stream by.
DQ_CONFIGS = [
    _cfg(128, 32, 4, 3),
    _cfg(128, 64, 8, 3),
    _cfg(64, 64, 4, 3),
    _cfg(64, 32, 4, 2),
]


def _configs(configs: list[triton.Config], interpret: tuple[int, int]) -> list[triton.Config]:
    if INTERPRET:
        return [_cfg(*interpret, 4, 1)]
    return list(configs)


def select_configs(
    configs: list[triton.Config],
    block_d: int,
    block_dv: int,
    precise: bool,
    mode: str = "full",
    streamed: str = "n",
) -> list[triton.Config]:
    """The configs worth tuning for padded head dims ``block_d`` / ``block_dv``.

    Drops configs whose pipelined tiles would not fit in shared memory: ``num_stages`` buffers
    of the streamed tiles (``BLOCK_N`` key/value rows for the forward and dQ kernels, ``BLOCK_M``
    query/grad rows for dK/dV: ``streamed="m"``) plus the resident ones. float32 (``precise``:
    IEEE FMA dots) and head dims above 128 keep tiles of at most 64 x 64. The smallest config
    always survives. In ``fast`` mode only the first two survivors remain.
    """
    elt = 4 if precise else 2
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        stream, resident = (bn, bm) if streamed == "n" else (bm, bn)
        smem = (c.num_stages * stream + resident) * (block_d + block_dv) * elt
        if smem > _SMEM_BUDGET:
            continue
        if (precise or max(block_d, block_dv) > 128) and bm * bn > 64 * 64:
            continue
        kept.append(c)
    if not kept:
        smallest = min(
            configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages)
        )
        kept = [smallest]
    if mode == "fast":
        kept = kept[:2]
    return kept


def _pruner(streamed: str):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        """``early_config_prune`` hook of an autotuner (see :func:`select_configs`)."""
        if INTERPRET:
            return configs
        args = {**named_args, **kwargs}
        return select_configs(
            configs,
            args["BLOCK_D"],
            args["BLOCK_DV"],
            bool(args["PRECISE"]),
            AUTOTUNE_MODE,
            streamed,
        )

    return prune


# Sizes are runtime values in every kernel (masks handle any value): not specialising on them
# (== 1, multiple of 16) keeps one compiled kernel per config for all sequence lengths. Strides
# stay specialised: a unit head-dim stride is what makes loads vectorised.
_NO_SPECIALIZE = ["H", "L", "S", "E", "EV", "L_KEY", "S_KEY"]
_TUNE_KEY = ["L_KEY", "S_KEY", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_MODE", "GROUP"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load2d(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A tile load with only the bounds checks that are needed (zeros outside)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _dot(a, b, acc, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation (IEEE float32 for float32 inputs)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif PRECISE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _mask_bias(x, MASK_BOOL: tl.constexpr):
    """Mask values as a base-2 bias added to the scores: bool (uint8) masks give 0 where the key
    takes part and -inf where hidden. Added rather than selected, so that a NaN score under a
    hidden position stays NaN, as in torch's math backend (which adds masks)."""
    if MASK_BOOL:
        b = tl.where(x != 0, 0.0, float("-inf"))
    else:
        b = x.to(tl.float32) * 1.4426950408889634
    return b


@triton.jit
def _apply_mask_tile(s, m_ptrs, tile_ok, MASK_BOOL: tl.constexpr, CHECK: tl.constexpr):
    """Adds a mask tile (bool: -inf where hidden) to base-2 scores ``s``."""
    if CHECK:
        x = tl.load(m_ptrs, mask=tile_ok, other=0)
    else:
        x = tl.load(m_ptrs)
    return s + _mask_bias(x, MASK_BOOL)


@triton.jit
def _scale_scores(s, qk_scale, MASK_MODE: tl.constexpr):
    """``s * qk_scale``, rounded before the running max is subtracted from it.

    With FP fusion on, the compiler turns ``s * c - m`` into ``fma(s, c, -m)``: the exponent of
    the top score is then the rounding error of ``s * c``, not 0, which at scores of 1e12 makes
    ``exp2`` inf or 0 (a NaN or zero row). An added mask already rounds the product (into its
    own FMA); without a mask an explicitly rounded multiply (``mul.rn``, which is never fused)
    takes its place, at the same instruction count.
    """
    if MASK_MODE == 0 and _ROUNDED_MUL:
        s = libdevice.mul_rn(s, qk_scale)
    else:
        s = s * qk_scale
    return s


@triton.jit
def _exp2_prob(x):
    """``exp2(min(x, 0))`` with NaN kept: a probability recomputed from the stored logsumexp.

    ``x = s - lse`` is <= 0 up to rounding, which at huge scores is far above 1 in absolute
    terms; the clamp keeps ``p <= 1`` (never inf, so never ``inf * 0``)."""
    return tl.math.exp2(tl.minimum(x, 0.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _scores_tile(
    q,
    k,
    m_base,
    rows,
    cols,
    row_ok,
    col_ok,
    stride_ml,
    stride_ms,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    PRECISE: tl.constexpr,
    UPCAST: tl.constexpr,
    ROUNDED: tl.constexpr,
):
    """Scores of a (query rows x key cols) tile in log2 units, with the user mask (key vector
    or tile) added and, for ``MASKED`` blocks, out-of-range and causally hidden keys at -inf.
    Shared by the forward and the dQ kernels, so both see the same probabilities. ``ROUNDED``
    (the forward): the scale multiply is never fused (see :func:`_scale_scores`); the dQ kernel
    clamps its exponent instead (:func:`_exp2_prob`), where the fusion costs nothing."""
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISE, UPCAST)
    if ROUNDED:
        s = _scale_scores(s, qk_scale, MASK_MODE)
    else:
        s = s * qk_scale
    if MASK_MODE == 1:
        if MASKED:
            x = tl.load(m_base + cols * stride_ms, mask=col_ok, other=0)
        else:
            x = tl.load(m_base + cols * stride_ms)
        s = s + _mask_bias(x, MASK_BOOL)[None, :]
    elif MASK_MODE == 2:
        s = _apply_mask_tile(
            s,
            m_base + rows[:, None] * stride_ml + cols[None, :] * stride_ms,
            row_ok[:, None] & col_ok[None, :],
            MASK_BOOL,
            True,
        )
    if MASKED:
        keep = col_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
    return s


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kv_loop(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    m_base,
    rows,
    lo,
    hi,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    stride_ml,
    stride_ms,
    L,
    S,
    E,
    EV,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    PRECISE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi); ``MASKED`` blocks get causal/boundary masks."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < E
    dv_ok = offs_dv < EV
    row_ok = rows < L
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        k = _load2d(
            k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            col_ok,
            d_ok,
            MASKED,
            not EVEN_D,
        )
        s = _scores_tile(
            q,
            k,
            m_base,
            rows,
            cols,
            row_ok,
            col_ok,
            stride_ml,
            stride_ms,
            qk_scale,
            BLOCK_M,
            BLOCK_N,
            MASKED,
            IS_CAUSAL,
            MASK_MODE,
            MASK_BOOL,
            PRECISE,
            UPCAST,
            True,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may have seen no key yet (masks, or -inf scores from +-inf in q or k in any
        # block): keep exp2 finite there (exp2(-inf - 0) = 0); one select per row, not per score.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load2d(
            v_base + cols[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
            col_ok,
            dv_ok,
            MASKED,
            not EVEN_DV,
        )
        acc = _dot(p.to(v.dtype), v, acc, PRECISE, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs(FWD_CONFIGS, INTERPRET_FWD),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("n")},
)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def attn_fwd(
    Q,
    K,
    V,
    M,
    Out,
    LSE,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_ml,
    stride_ms,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    H,
    GROUP,
    L,
    S,
    E,
    EV,
    qk_scale,
    L_KEY,
    S_KEY,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    PRECISE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (query block, batch x head) program: out and lse of BLOCK_M query rows."""
    # 1-D grid, query blocks fastest: consecutive programs share one head's keys and values.
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    off_bh = pid // num_m
    if IS_CAUSAL:  # the heaviest (last) query blocks of a head start first
        pid_m = num_m - 1 - pid_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = off_bh % H
    off_hk = (off_h // GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    m_base = M + off_b * stride_mb + off_h * stride_mh

    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < L
    q = _load2d(
        q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
        row_ok,
        offs_d < E,
        True,
        not EVEN_D,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    full_n = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # Keys j <= start_m are visible to every row of the block.
        full_end = tl.minimum(((start_m + 1) // BLOCK_N) * BLOCK_N, full_n)
        hi = tl.minimum(S, start_m + BLOCK_M)
    else:
        full_end = full_n
        hi = S
    acc, l_i, m_i = _fwd_kv_loop(
        acc, l_i, m_i, q, k_base, v_base, m_base, rows, 0, full_end,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ml, stride_ms,
        L, S, E, EV, qk_scale,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
        False, IS_CAUSAL, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_kv_loop(
        acc, l_i, m_i, q, k_base, v_base, m_base, rows, full_end, hi,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ml, stride_ms,
        L, S, E, EV, qk_scale,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
        True, IS_CAUSAL, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
    )  # fmt: skip

    empty = l_i == 0.0  # no visible key: zero output, lse = -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    )
    o_ptrs = (
        Out
        + off_b * stride_ob
        + off_h * stride_oh
        + rows[:, None] * stride_ol
        + offs_dv[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < EV)[None, :])
    tl.store(LSE + off_bh.to(tl.int64) * L + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["H", "L", "EV"])
def attn_bwd_preprocess(
    Out,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dod,
    H,
    L,
    EV,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dO * O) in float32, (B, Hq, L) contiguous."""
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    off_bh = pid // num_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (rows < L)[:, None] & (offs_dv < EV)[None, :]
    o = tl.load(
        Out
        + off_b * stride_ob
        + off_h * stride_oh
        + rows[:, None] * stride_ol
        + offs_dv[None, :] * stride_od,
        mask=ok,
        other=0.0,
    )
    do = tl.load(
        DO
        + off_b * stride_dob
        + off_h * stride_doh
        + rows[:, None] * stride_dol
        + offs_dv[None, :] * stride_dod,
        mask=ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * L + rows, delta, mask=rows < L)


@triton.jit
def _dkdv_q_loop(
    dk,
    dv,
    k,
    v,
    bias_n,
    q_base,
    do_base,
    m_base,
    lse_base,
    delta_base,
    cols,
    lo,
    hi,
    stride_ql,
    stride_qd,
    stride_dol,
    stride_dod,
    stride_ml,
    stride_ms,
    L,
    S,
    E,
    EV,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    PRECISE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Accumulates dK, dV of one key block over query blocks [lo, hi) (transposed scores).

    ``bias_n`` is the key-vector mask of ``MASK_MODE`` 1 as a base-2 bias. ``MASKED`` blocks
    (the causal diagonal and the ragged last query block) set causally hidden pairs and rows
    past L to -inf: padded rows read q = 0, whose scores are NaN against a key holding +-inf,
    and would otherwise reach every dK and dV row. Keys past S only touch their own (unstored)
    rows of dK and dV.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < E
    dv_ok = offs_dv < EV
    col_ok = cols < S
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < L
        q = _load2d(
            q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
            row_ok,
            d_ok,
            True,
            not EVEN_D,
        )
        do = _load2d(
            do_base + rows[:, None] * stride_dol + offs_dv[None, :] * stride_dod,
            row_ok,
            dv_ok,
            True,
            not EVEN_DV,
        )
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        st = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISE, UPCAST)
        st = st * qk_scale
        if MASK_MODE == 1:
            st = st + bias_n[:, None]
        elif MASK_MODE == 2:
            st = _apply_mask_tile(
                st,
                m_base + rows[None, :] * stride_ml + cols[:, None] * stride_ms,
                row_ok[None, :] & col_ok[:, None],
                MASK_BOOL,
                True,
            )
        if MASKED:
            keep = row_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[:, None] <= rows[None, :])
            st = tl.where(keep, st, float("-inf"))
        pt = _exp2_prob(st - lse[None, :])
        dv = _dot(pt.to(do.dtype), do, dv, PRECISE, UPCAST)
        dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISE, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk = _dot(dst.to(q.dtype), q, dk, PRECISE, UPCAST)
    return dk, dv


@triton.autotune(
    configs=_configs(DKDV_CONFIGS, INTERPRET_DKDV),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("m")},
)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def attn_bwd_dkdv(
    Q,
    K,
    V,
    M,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_ml,
    stride_ms,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    stride_dvd,
    H,
    HKV,
    GROUP,
    L,
    S,
    E,
    EV,
    scale,
    qk_scale,
    L_KEY,
    S_KEY,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    PRECISE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (key block, batch x kv head) program: dK and dV summed over the head's query group.

    No atomics: each program owns its rows of dK and dV, so results are deterministic.
    """
    num_n = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    off_bh = pid // num_n
    # Causal: the first key blocks, which see the most queries, start first.
    off_b = (off_bh // HKV).to(tl.int64)
    off_hk = (off_bh % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < S
    k = _load2d(
        K
        + off_b * stride_kb
        + off_hk * stride_kh
        + cols[:, None] * stride_ks
        + offs_d[None, :] * stride_kd,
        col_ok,
        offs_d < E,
        True,
        not EVEN_D,
    )
    v = _load2d(
        V
        + off_b * stride_vb
        + off_hk * stride_vh
        + cols[:, None] * stride_vs
        + offs_dv[None, :] * stride_vd,
        col_ok,
        offs_dv < EV,
        True,
        not EVEN_DV,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    full_m = tl.cdiv(L, BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # Query rows i >= start_n see part of this key block: masked stage [lo, mid); rows
        # i >= start_n + BLOCK_N - 1 see all of it: unmasked stage from mid. When the block
        # lies past every query (lo >= full_m) every stage is empty.
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, full_m)
    else:
        lo = 0
        mid = 0
    # The ragged last query block runs masked as well (rows past L), unless [lo, mid) has it.
    tail = tl.maximum((L // BLOCK_M) * BLOCK_M, mid)
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        off_bhq = off_b * H + off_h
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        m_base = M + off_b * stride_mb + off_h * stride_mh
        lse_base = LSE + off_bhq * L
        delta_base = DELTA + off_bhq * L
        if MASK_MODE == 1:  # one key vector for every query row: read it once
            x = tl.load(m_base + cols * stride_ms, mask=col_ok, other=0)
            bias_n = _mask_bias(x, MASK_BOOL)
        else:
            bias_n = tl.zeros([BLOCK_N], dtype=tl.float32)
        dk, dv = _dkdv_q_loop(
            dk, dv, k, v, bias_n, q_base, do_base, m_base, lse_base, delta_base, cols, lo, mid,
            stride_ql, stride_qd, stride_dol, stride_dod, stride_ml, stride_ms,
            L, S, E, EV, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
            True, IS_CAUSAL, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
        )  # fmt: skip
        dk, dv = _dkdv_q_loop(
            dk, dv, k, v, bias_n, q_base, do_base, m_base, lse_base, delta_base, cols, mid, tail,
            stride_ql, stride_qd, stride_dol, stride_dod, stride_ml, stride_ms,
            L, S, E, EV, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
            False, IS_CAUSAL, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
        )  # fmt: skip
        dk, dv = _dkdv_q_loop(
            dk, dv, k, v, bias_n, q_base, do_base, m_base, lse_base, delta_base, cols, tail, full_m,
            stride_ql, stride_qd, stride_dol, stride_dod, stride_ml, stride_ms,
            L, S, E, EV, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
            True, IS_CAUSAL, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
        )  # fmt: skip

    dk = dk * scale
    ok_d = col_ok[:, None] & (offs_d < E)[None, :]
    ok_dv = col_ok[:, None] & (offs_dv < EV)[None, :]
    tl.store(
        DK
        + off_b * stride_dkb
        + off_hk * stride_dkh
        + cols[:, None] * stride_dks
        + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty),
        mask=ok_d,
    )
    tl.store(
        DV
        + off_b * stride_dvb
        + off_hk * stride_dvh
        + cols[:, None] * stride_dvs
        + offs_dv[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=ok_dv,
    )


@triton.jit
def _dq_kv_loop(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    m_base,
    rows,
    lo,
    hi,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    stride_ml,
    stride_ms,
    L,
    S,
    E,
    EV,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    PRECISE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Accumulates dQ of one query block over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < E
    dv_ok = offs_dv < EV
    row_ok = rows < L
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        k = _load2d(
            k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            col_ok,
            d_ok,
            MASKED,
            not EVEN_D,
        )
        v = _load2d(
            v_base + cols[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
            col_ok,
            dv_ok,
            MASKED,
            not EVEN_DV,
        )
        s = _scores_tile(
            q,
            k,
            m_base,
            rows,
            cols,
            row_ok,
            col_ok,
            stride_ml,
            stride_ms,
            qk_scale,
            BLOCK_M,
            BLOCK_N,
            MASKED,
            IS_CAUSAL,
            MASK_MODE,
            MASK_BOOL,
            PRECISE,
            UPCAST,
            False,
        )
        p = _exp2_prob(s - lse[:, None])
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISE, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PRECISE, UPCAST)
    return dq


@triton.autotune(
    configs=_configs(DQ_CONFIGS, INTERPRET_DQ),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("n")},
)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def attn_bwd_dq(
    Q,
    K,
    V,
    M,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_ml,
    stride_ms,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dql,
    stride_dqd,
    H,
    GROUP,
    L,
    S,
    E,
    EV,
    scale,
    qk_scale,
    L_KEY,
    S_KEY,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    PRECISE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (query block, batch x head) program: dQ of BLOCK_M query rows."""
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    off_bh = pid // num_m
    if IS_CAUSAL:
        pid_m = num_m - 1 - pid_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = off_bh % H
    off_hk = (off_h // GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < L
    q = _load2d(
        Q
        + off_b * stride_qb
        + off_h * stride_qh
        + rows[:, None] * stride_ql
        + offs_d[None, :] * stride_qd,
        row_ok,
        offs_d < E,
        True,
        not EVEN_D,
    )
    do = _load2d(
        DO
        + off_b * stride_dob
        + off_h * stride_doh
        + rows[:, None] * stride_dol
        + offs_dv[None, :] * stride_dod,
        row_ok,
        offs_dv < EV,
        True,
        not EVEN_DV,
    )
    lse = tl.load(LSE + off_bh.to(tl.int64) * L + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + off_bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    m_base = M + off_b * stride_mb + off_h * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_n = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        full_end = tl.minimum(((start_m + 1) // BLOCK_N) * BLOCK_N, full_n)
        hi = tl.minimum(S, start_m + BLOCK_M)
    else:
        full_end = full_n
        hi = S
    dq = _dq_kv_loop(
        dq, q, do, lse, delta, k_base, v_base, m_base, rows, 0, full_end,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ml, stride_ms,
        L, S, E, EV, qk_scale,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
        False, IS_CAUSAL, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
    )  # fmt: skip
    dq = _dq_kv_loop(
        dq, q, do, lse, delta, k_base, v_base, m_base, rows, full_end, hi,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ml, stride_ms,
        L, S, E, EV, qk_scale,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
        True, IS_CAUSAL, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
    )  # fmt: skip
    dq = dq * scale
    tl.store(
        DQ
        + off_b * stride_dqb
        + off_h * stride_dqh
        + rows[:, None] * stride_dql
        + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d < E)[None, :],
    )
