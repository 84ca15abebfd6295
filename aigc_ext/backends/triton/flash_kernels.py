"""Triton kernels of the FlashAttention contract (``docs/flash-contract.md``): forward with the
KV cache, backward preprocess, dK/dV and dQ.

Layout and conventions shared by every kernel:

* Tensors keep FlashAttention's layout, tokens before heads: q ``(B, L, Hq, D)``, k/v
  ``(B, S, Hkv, D)``, out ``(B, L, Hq, Dv)``, with any strides (the head dim is contiguous).
  Packed variable-length tensors ``(T, H, D)`` are passed as ``(1, T, H, D)`` views and located
  through ``cu_seqlens``; a paged cache is ``(num_pages, page_size, Hkv, D)``. ``lse`` (and the
  backward's ``delta``) is ``(B, Hq, L)``, or ``(1, Hq, T)`` for packed sequences.
* **Grouped heads share a tile.** The ``GROUP = Hq / Hkv`` query heads of one key/value head
  are interleaved in the tile's rows: row ``r`` of a sequence is query position ``i = r //
  GROUP`` of head ``h = hk * GROUP + r % GROUP``. Each key/value tile is then loaded once for
  the whole group (grouped-query attention without copies, and decoding with one query token
  still fills a tile with the group's heads).
* **Scores** are kept in the base-2 domain: ``s2 = x * log2(e)`` where ``x`` is the contract's
  score after the scale, softcap, ALiBi and ``attn_mask`` (in that order); the softmax uses
  ``exp2`` and the stored logsumexp is converted back to natural log.
* **Windows decide the loop bounds.** For a query tile the key range ``[lo, hi)`` comes from
  the window (bottom-right aligned: query ``i`` sees key ``j`` iff ``i + d - left <= j <= i + d
  + right`` with ``d = S_b - L_b``; causal is ``right = 0``), so key blocks outside the window
  are never visited: work is proportional to the window, not to S. The range is split in three
  stages: masked blocks at the lower edge, blocks every row of the tile sees in full (no
  masking code at all), masked blocks at the upper edge. The dK/dV kernel bounds its query
  range the same way.
* **Dropout** is the contract's counter-based mask, computed in the kernel: Philox4x32-10 of
  the counter ``(j >> 2, i, b * Hq + h, offset)`` under the key ``seed``, word ``j & 3``; one
  Philox call yields the words of four consecutive keys, so a ``BLOCK_M x BLOCK_N`` tile costs
  ``BLOCK_M * BLOCK_N / 4`` calls. The backward regenerates the same bits.
* **Paged caches** are read in place: cache position ``t`` of batch ``b`` is row
  ``t % PAGE_SIZE`` of page ``block_table[b, t // PAGE_SIZE]``. When ``PAGE_SIZE`` is a
  multiple of ``BLOCK_N`` (and there is no left padding) a key block lies in one page: one
  lookup per block and contiguous rows; otherwise each key row is looked up on its own.
* **Out-of-range indices never read out of bounds.** The host validates index tensors that it
  can read cheaply (CPU tensors); on the device the kernels also clamp: sequence lengths to the
  tensors' extents, cache rows and pages to ``[0, KV_ROWS)``.
* Head dims are padded to ``BLOCK_D`` / ``BLOCK_DV`` (powers of two, at least 16) with masked
  loads. ``PRECISE``: float32 inputs, dots in IEEE float32; ``UPCAST``: float32 dots for
  bfloat16 under the interpreter (whose bfloat16 dot is wrong).
* A row that sees no key (and has no sink) gets zeros and ``lse = -inf``; the backward treats
  its probabilities as zero.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from aigc_ext.backends.triton.kernels import (
    AUTOTUNE_MODE,
    DKDV_CONFIGS,
    DQ_CONFIGS,
    FWD_CONFIGS,
    INTERPRET,
    _cfg,
    _dot,
    _exp2_prob,
    _load2d,
    _mask_bias,
    _scale_scores,
    select_configs,
)

__all__ = [
    "FLASH_DKDV_CONFIGS",
    "FLASH_DQ_CONFIGS",
    "FLASH_FWD_CONFIGS",
    "PHILOX_ROUNDS",
    "flash_bwd_dkdv",
    "flash_bwd_dq",
    "flash_bwd_preprocess",
    "flash_fwd",
    "prune_for_rows",
]

PHILOX_ROUNDS = 10
_ROUNDS = tl.constexpr(PHILOX_ROUNDS)
# libdevice has tanh on GPUs; the interpreter has no libdevice (see _tanh).
_LIBDEVICE = tl.constexpr(not INTERPRET)

# Tiles under the interpreter: the tests' sequences of a few dozen tokens still span several
# query and key blocks, ragged tails, window edges and (with 16-row pages) paged blocks.
INTERPRET_FWD = (64, 32)
INTERPRET_DKDV = (32, 64)
INTERPRET_DQ = (64, 32)

# The forward and dQ add tiles of 16 and 32 rows: a decoding step has one query token per
# head, so a group of heads (or a single head) fills only a small tile.
FLASH_FWD_CONFIGS = [*FWD_CONFIGS, _cfg(16, 64, 4, 3), _cfg(16, 128, 4, 3), _cfg(32, 64, 4, 3)]
FLASH_DKDV_CONFIGS = list(DKDV_CONFIGS)
FLASH_DQ_CONFIGS = [*DQ_CONFIGS, _cfg(16, 64, 4, 3), _cfg(32, 64, 4, 3)]


def _configs(configs: list[triton.Config], interpret: tuple[int, int]) -> list[triton.Config]:
    if INTERPRET:
        return [_cfg(*interpret, 4, 1)]
    return list(configs)


def prune_for_rows(configs: list[triton.Config], rows: int, block: str) -> list[triton.Config]:
    """Drops configs whose ``block`` tile (``"BLOCK_M"`` or ``"BLOCK_N"``) is larger than
    ``rows`` rounded up to a power of two (at least 16): a decoding step's few query rows do
    not need a 128-row tile. The configs with the smallest such tile survive if none fits."""
    limit = max(16, triton.next_power_of_2(max(1, rows)))
    kept = [c for c in configs if c.kwargs[block] <= limit]
    if not kept:
        smallest = min(c.kwargs[block] for c in configs)
        kept = [c for c in configs if c.kwargs[block] == smallest]
    return kept


def _pruner(streamed: str, rows_key: str | None, block: str):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        """``early_config_prune`` hook: shared memory and register budget
        (:func:`~aigc_ext.backends.triton.kernels.select_configs`), then tile rows."""
        if INTERPRET:
            return configs
        args = {**named_args, **kwargs}
        if rows_key is not None:
            configs = prune_for_rows(configs, int(args[rows_key]), block)
        return select_configs(
            configs, args["BLOCK_D"], args["BLOCK_DV"], bool(args["PRECISE"]), AUTOTUNE_MODE,
            streamed,
        )  # fmt: skip

    return prune


# Sizes and scalar options are runtime values (not specialised): one compiled kernel per
# config serves every length, window, softcap and dropout rate. The head dims are constexprs:
# a padded head dim's load mask is then known in groups of 8 or 16 elements, which keeps the
# loads vectorised and the key/value stream pipelined (asynchronous copies).
_NO_SPECIALIZE = [
    "H", "GROUP", "L", "S_CAP", "T_Q", "T_K", "KV_ROWS",
    "window_left", "window_right", "threshold", "L_KEY", "S_KEY",
]  # fmt: skip
_FEATURES = [
    "VARLEN", "PAGED", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP", "ALIBI", "DROPOUT", "MASK_MODE",
]  # fmt: skip
_TUNE_KEY = ["L_KEY", "S_KEY", "BLOCK_D", "BLOCK_DV", *_FEATURES]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh: libdevice on GPUs; ``1 - 2 / (exp(2|x|) + 1)`` with the sign restored under the
    interpreter (absolute error about 1e-7, which softcap multiplies by the cap)."""
    if _LIBDEVICE:
        y = libdevice.tanh(x)
    else:
        e = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - e) / (1.0 + e)
        y = tl.where(x < 0, -y, y)
    return y


@triton.jit
def _dropout_keep(
    i, stream, start_n, seed_lo, seed_hi, rng_offset, threshold, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The contract's keep mask of a ``(BLOCK_M, BLOCK_N)`` tile, bool: rows are query
    positions ``i`` with streams ``b * Hq + h`` (``(BLOCK_M,)`` each), columns the keys
    ``start_n + [0, BLOCK_N)`` (``start_n`` a multiple of 4).

    Philox4x32-10 (multipliers ``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57``; key increments
    ``0x9E3779B9``, ``0xBB67AE85``) runs on ``(BLOCK_M, BLOCK_N / 4)`` counters
    ``(j >> 2, i, stream, offset)``;
    its four words are interleaved into the columns (word ``w`` of counter ``g`` is key
    ``4 g + w``), and a key is kept iff its word's top 24 bits are ``>= threshold``.
    """
    zero = tl.zeros([BLOCK_M, BLOCK_N // 4], dtype=tl.uint32)
    c0 = zero + ((start_n >> 2) + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)[None, :]
    c1 = zero + i.to(tl.uint32)[:, None]
    c2 = zero + stream.to(tl.uint32)[:, None]
    c3 = zero + rng_offset
    m0 = tl.full([BLOCK_M, BLOCK_N // 4], 0xD2511F53, tl.uint32)
    m1 = tl.full([BLOCK_M, BLOCK_N // 4], 0xCD9E8D57, tl.uint32)
    k0 = seed_lo
    k1 = seed_hi
    for r in tl.static_range(_ROUNDS):
        if r > 0:  # the key is bumped between rounds
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        # (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
    # join(join(w0, w2), join(w1, w3)) has shape (.., 2, 2) with word 2 * a + b at [.., a, b]:
    # flattened, the four words of each counter come out in order.
    u = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    u = tl.reshape(u, [BLOCK_M, BLOCK_N])
    return (u >> 8) >= threshold


@triton.jit
def _rng_words(RNG):
    """``(seed_lo, seed_hi, offset)`` as uint32 from the int64 ``rng_state = [seed, offset]``."""
    seed = tl.load(RNG)
    offset = tl.load(RNG + 1)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return seed_lo, seed_hi, (offset & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _sequence(
    b, CU_Q, CU_K, SEQUSED, LEFTPAD, KV_IDX, L, S_CAP, T_Q, T_K, KV_ROWS,
    VARLEN: tl.constexpr, PAGED: tl.constexpr, HAS_SEQUSED: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, HAS_KV_IDX: tl.constexpr,
):  # fmt: skip
    """Where sequence ``b`` lives: ``(q_start, len_q, kv_b, kv_first, len_k)``.

    ``q_start``: its first row of the packed q (0 when dense); ``kv_b``: its row of k's dim 0
    (dense cache; 0 when packed or paged); ``kv_first``: the first key row it reads (packed:
    row of the packed k; dense: position in the cache row; paged: cache position, i.e. its
    left padding); ``len_k``: its number of keys. Lengths are clamped to the tensors."""
    if VARLEN:
        q_start = tl.minimum(tl.maximum(tl.load(CU_Q + b), 0), T_Q)
        len_q = tl.maximum(tl.minimum(tl.load(CU_Q + b + 1), T_Q) - q_start, 0)
        k_start = tl.load(CU_K + b)
        if PAGED:  # cu_seqlens_k only gives the lengths
            cap = S_CAP
        else:  # rows of the packed k
            k_start = tl.minimum(tl.maximum(k_start, 0), T_K)
            cap = T_K - k_start
        end = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = b * 0
        len_q = L + b * 0
        k_start = b * 0
        end = S_CAP + b * 0
        cap = S_CAP + b * 0
    if HAS_SEQUSED:
        end = tl.load(SEQUSED + b)
    end = tl.minimum(end, cap)
    first = b * 0
    if HAS_LEFTPAD:
        first = tl.maximum(tl.load(LEFTPAD + b), 0)
    len_k = tl.maximum(end - first, 0)
    kv_b = b * 0
    kv_first = first
    if not PAGED:
        if VARLEN:
            kv_first = k_start + first
        elif HAS_KV_IDX:
            kv_b = tl.minimum(tl.maximum(tl.load(KV_IDX + b), 0), KV_ROWS - 1)
        else:
            kv_b = b
    return q_start, len_q, kv_b, kv_first, len_k


@triton.jit
def _stages(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Block-aligned stage bounds ``(start, e1, e2)`` of the range ``[lo, hi)``: masked blocks
    ``[start, e1)``, unmasked ``[e1, e2)``, masked ``[e2, hi)``. ``[full_lo, full_hi)`` is what
    needs no masking (``full_hi <= hi``); ``start`` is a multiple of ``BLOCK``, and so are
    ``e1`` and ``e2`` whenever a later stage is not empty."""
    start = (lo // BLOCK) * BLOCK
    e1 = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK) * BLOCK, start), hi)
    e2 = tl.maximum(e1, (full_hi // BLOCK) * BLOCK)
    return start, e1, e2


@triton.jit
def _scores(
    s, i2, j2, d, ok2, slope2, m_ptrs, m_ok, scale, qk_scale, softcap, inv_softcap,
    window_left, window_right, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    MASK_MODE: tl.constexpr, MASK_BOOL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr, ROUNDED: tl.constexpr,
):  # fmt: skip
    """The contract's scores of a tile in log2 units, from the raw dot products ``s``.

    ``i2``/``j2`` are query/key positions broadcastable to the tile (rows x cols in the forward
    and dQ kernels, transposed in dK/dV), ``slope2`` the ALiBi slopes likewise, ``m_ptrs`` the
    ``attn_mask`` pointers of the tile (or of one key vector) and ``m_ok`` where they may be
    read (always checked: a tile's rows and columns may run past the mask), ``ok2`` where the
    tile is in range. Returns ``(s2, t)``: the scores and, with softcap, ``t = tanh(scale * s / softcap)``
    for the gradient. ``MASKED`` tiles set keys outside the window or the range to -inf.
    """
    t = s
    if SOFTCAP or ALIBI:
        x = s * scale
        if SOFTCAP:
            t = _tanh(x * inv_softcap)
            x = softcap * t
        if ALIBI:
            x = x - slope2 * tl.abs(i2 + d - j2).to(tl.float32)
        s2 = x * 1.4426950408889634
    elif ROUNDED:
        s2 = _scale_scores(s, qk_scale, MASK_MODE)
    else:
        s2 = s * qk_scale
    if MASK_MODE != 0:
        s2 = s2 + _mask_bias(tl.load(m_ptrs, mask=m_ok, other=0), MASK_BOOL)
    if MASKED:
        keep = ok2
        if WINDOW_LEFT:
            keep = keep & (j2 >= i2 + d - window_left)
        if WINDOW_RIGHT:
            keep = keep & (j2 <= i2 + d + window_right)
        s2 = tl.where(keep, s2, float("-inf"))
    return s2, t


@triton.jit
def _page_rows(
    bt_base, kv_first, j, j_ok, start_n, KV_ROWS, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
):  # fmt: skip
    """``(page, row)`` of the keys ``j`` of a paged cache (cache positions ``kv_first + j``),
    pages clamped to ``[0, KV_ROWS)``."""
    if (PAGE_SIZE % BLOCK_N == 0) and not HAS_LEFTPAD:
        # The block [start_n, start_n + BLOCK_N) lies in one page: one lookup, contiguous rows.
        page = tl.load(bt_base + start_n // PAGE_SIZE)
        row = (start_n % PAGE_SIZE) + tl.arange(0, BLOCK_N)
    else:
        t = kv_first + j
        page = tl.load(bt_base + t // PAGE_SIZE, mask=j_ok, other=0)
        row = t % PAGE_SIZE
    page = tl.minimum(tl.maximum(page, 0), KV_ROWS - 1).to(tl.int64)
    return page, row


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_loop(
    acc, l_i, m_i, q, i, row_ok, stream, slope, m_rows, k_head, v_head, bt_base, kv_first, lo, hi,
    len_k, d, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, stride_ms,
    E, EV, KV_ROWS, scale, qk_scale, softcap, inv_softcap, window_left, window_right,
    seed_lo, seed_hi, rng_offset, threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    MASKED: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_MODE: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key blocks ``[lo, hi)`` (``lo`` block-aligned)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < E
    dv_ok = offs_dv < EV
    for start_n in range(lo, hi, BLOCK_N):
        j = start_n + offs_n
        j_ok = j < len_k
        if PAGED:
            page, row = _page_rows(
                bt_base, kv_first, j, j_ok, start_n, KV_ROWS, PAGE_SIZE, BLOCK_N, HAS_LEFTPAD
            )
            k_rows = page * stride_kb + row * stride_ks
            v_rows = page * stride_vb + row * stride_vs
        else:
            k_rows = j.to(tl.int64) * stride_ks
            v_rows = j.to(tl.int64) * stride_vs
        k = _load2d(
            k_head + k_rows[:, None] + offs_d[None, :] * stride_kd, j_ok, d_ok, MASKED, not EVEN_D
        )
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISE, UPCAST)
        if MASK_MODE == 1:
            m_ptrs = m_rows + j[None, :] * stride_ms
            m_ok = j_ok[None, :]
        else:
            m_ptrs = m_rows[:, None] + j[None, :] * stride_ms
            m_ok = row_ok[:, None] & j_ok[None, :]
        s2, _t = _scores(
            s, i[:, None], j[None, :], d, j_ok[None, :], slope[:, None], m_ptrs, m_ok, scale,
            qk_scale, softcap, inv_softcap, window_left, window_right, MASKED, SOFTCAP, ALIBI,
            MASK_MODE, MASK_BOOL, WINDOW_LEFT, WINDOW_RIGHT, True,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        # A row may have seen no key yet: keep exp2 finite there (exp2(-inf - 0) = 0).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s2 - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(
                i, stream, start_n, seed_lo, seed_hi, rng_offset, threshold, BLOCK_M, BLOCK_N
            )
            p = tl.where(keep, p, 0.0)
        v = _load2d(
            v_head + v_rows[:, None] + offs_dv[None, :] * stride_vd, j_ok, dv_ok, MASKED,
            not EVEN_DV,
        )  # fmt: skip
        acc = _dot(p.to(v.dtype), v, acc, PRECISE, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs(FLASH_FWD_CONFIGS, INTERPRET_FWD),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("n", "L_KEY", "BLOCK_M")},
)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def flash_fwd(
    Q, K, V, Out, LSE, CU_Q, CU_K, SEQUSED, LEFTPAD, KV_IDX, BLOCK_TABLE, SLOPES, RNG, SINKS, M,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_lb, stride_lh, stride_btb, stride_ab,
    stride_mb, stride_mh, stride_ml, stride_ms,
    H, GROUP, L, S_CAP, T_Q, T_K, KV_ROWS,
    scale, qk_scale, softcap, inv_softcap, window_left, window_right, threshold, drop_scale,
    L_KEY, S_KEY,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, VARLEN: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_SEQUSED: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_KV_IDX: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, SINKS_ON: tl.constexpr,
    MASK_MODE: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISE: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program per (tile of ``BLOCK_M`` grouped query rows, batch x key/value head): out
    and lse of those rows. ``L`` is the (longest) query length: the grid covers it."""
    num_m = tl.cdiv(L * GROUP, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    off_bh = pid // num_m
    if WINDOW_RIGHT and not WINDOW_LEFT:  # causal: the heaviest (last) tiles start first
        pid_m = num_m - 1 - pid_m
    hkv = H // GROUP
    b = off_bh // hkv
    hk = off_bh % hkv
    q_start, len_q, kv_b, kv_first, len_k = _sequence(
        b, CU_Q, CU_K, SEQUSED, LEFTPAD, KV_IDX, L, S_CAP, T_Q, T_K, KV_ROWS,
        VARLEN, PAGED, HAS_SEQUSED, HAS_LEFTPAD, HAS_KV_IDX,
    )  # fmt: skip
    start_m = pid_m * BLOCK_M
    if start_m >= len_q * GROUP:  # past this sequence's rows (packed batches)
        return
    b64 = b.to(tl.int64)
    r = start_m + tl.arange(0, BLOCK_M)
    row_ok = r < len_q * GROUP
    i = r // GROUP
    h = hk * GROUP + r % GROUP
    i64 = (q_start + i).to(tl.int64)
    h64 = h.to(tl.int64)
    d = len_k - len_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load2d(
        Q + b64 * stride_qb + i64[:, None] * stride_ql + h64[:, None] * stride_qh
        + offs_d[None, :] * stride_qd,
        row_ok, offs_d < E, True, not EVEN_D,
    )  # fmt: skip

    hk64 = hk.to(tl.int64)
    if PAGED:
        k_head = K + hk64 * stride_kh
        v_head = V + hk64 * stride_vh
        bt_base = BLOCK_TABLE + b64 * stride_btb
    else:
        kv_off_k = kv_b.to(tl.int64) * stride_kb + kv_first.to(tl.int64) * stride_ks
        kv_off_v = kv_b.to(tl.int64) * stride_vb + kv_first.to(tl.int64) * stride_vs
        k_head = K + kv_off_k + hk64 * stride_kh
        v_head = V + kv_off_v + hk64 * stride_vh
        bt_base = BLOCK_TABLE
    if ALIBI:
        slope = tl.load(SLOPES + b64 * stride_ab + h, mask=row_ok, other=0.0)
    else:
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if MASK_MODE == 1:  # a key vector: the same for every row
        m_rows = M + b64 * stride_mb
    else:
        m_rows = M + b64 * stride_mb + h64 * stride_mh + i.to(tl.int64) * stride_ml
    if DROPOUT:
        seed_lo, seed_hi, rng_offset = _rng_words(RNG)
        thr = threshold.to(tl.uint32)
    else:
        seed_lo = 0
        seed_hi = 0
        rng_offset = 0
        thr = 0
    stream = b * H + h

    # The key range of the tile's query positions [i_lo, i_hi], from the window.
    i_lo = start_m // GROUP
    i_hi = tl.minimum((start_m + BLOCK_M - 1) // GROUP, len_q - 1)
    lo = 0
    full_lo = 0
    hi = len_k
    full_hi = len_k
    if WINDOW_LEFT:
        lo = tl.maximum(i_lo + d - window_left, 0)
        full_lo = tl.maximum(i_hi + d - window_left, 0)
    if WINDOW_RIGHT:
        hi = tl.maximum(tl.minimum(i_hi + d + window_right + 1, len_k), 0)
        full_hi = tl.maximum(tl.minimum(i_lo + d + window_right + 1, len_k), 0)
    start, e1, e2 = _stages(lo, hi, full_lo, full_hi, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = _fwd_loop(
        acc, l_i, m_i, q, i, row_ok, stream, slope, m_rows, k_head, v_head, bt_base, kv_first,
        start, e1, len_k, d, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        stride_ms, E, EV, KV_ROWS, scale, qk_scale, softcap, inv_softcap, window_left,
        window_right, seed_lo, seed_hi, rng_offset, thr,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, True, PAGED, PAGE_SIZE,
        HAS_LEFTPAD, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI, DROPOUT, MASK_MODE, MASK_BOOL,
        PRECISE, UPCAST,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_loop(
        acc, l_i, m_i, q, i, row_ok, stream, slope, m_rows, k_head, v_head, bt_base, kv_first,
        e1, e2, len_k, d, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        stride_ms, E, EV, KV_ROWS, scale, qk_scale, softcap, inv_softcap, window_left,
        window_right, seed_lo, seed_hi, rng_offset, thr,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, False, PAGED, PAGE_SIZE,
        HAS_LEFTPAD, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI, DROPOUT, MASK_MODE, MASK_BOOL,
        PRECISE, UPCAST,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_loop(
        acc, l_i, m_i, q, i, row_ok, stream, slope, m_rows, k_head, v_head, bt_base, kv_first,
        e2, hi, len_k, d, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        stride_ms, E, EV, KV_ROWS, scale, qk_scale, softcap, inv_softcap, window_left,
        window_right, seed_lo, seed_hi, rng_offset, thr,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, True, PAGED, PAGE_SIZE,
        HAS_LEFTPAD, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI, DROPOUT, MASK_MODE, MASK_BOOL,
        PRECISE, UPCAST,
    )  # fmt: skip

    if SINKS_ON:  # a virtual key with score sinks[h] and a zero value: the denominator only
        sink = tl.load(SINKS + h, mask=row_ok, other=0.0) * 1.4426950408889634
        m_tot = tl.maximum(m_i, sink)
        corr = tl.math.exp2(m_i - m_tot)
        l_i = l_i * corr + tl.math.exp2(sink - m_tot)
        acc = acc * corr[:, None]
        m_i = m_tot
    empty = l_i == 0.0  # no key (and no sink): zero output, lse = -inf
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    if DROPOUT:
        inv_l = inv_l * drop_scale
    out = acc * inv_l[:, None]
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    )
    o_ptrs = (
        Out + b64 * stride_ob + i64[:, None] * stride_ol + h64[:, None] * stride_oh
        + offs_dv[None, :] * stride_od
    )  # fmt: skip
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < EV)[None, :])
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + i64, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["H", "L", "EV"])
def flash_bwd_preprocess(
    Out, DO, DELTA,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_dob, stride_dol, stride_doh, stride_dod,
    H, L, EV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``delta = rowsum(dO * O)`` in float32, ``(B, Hq, L)`` contiguous (the lse's layout)."""
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    off_bh = pid // num_m
    b = (off_bh // H).to(tl.int64)
    h = (off_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (rows < L)[:, None] & (offs_dv < EV)[None, :]
    r64 = rows.to(tl.int64)
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + r64[:, None] * stride_ol
        + offs_dv[None, :] * stride_od,
        mask=ok, other=0.0,
    )  # fmt: skip
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + r64[:, None] * stride_dol
        + offs_dv[None, :] * stride_dod,
        mask=ok, other=0.0,
    )  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * L + rows, delta, mask=rows < L)


@triton.jit
def _dkdv_loop(
    dk, dv, k, v, j, j_ok, start_n, q_seq, do_seq, lse_seq, delta_seq, m_cols, stream_base, slope_base,
    lo, hi, len_q, d, hk, GROUP, stride_ql, stride_qh, stride_qd, stride_dol, stride_doh,
    stride_dod, stride_lh, stride_mh, stride_ml, E, EV, scale, qk_scale, softcap, inv_softcap,
    window_left, window_right, seed_lo, seed_hi, rng_offset, threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_MODE: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Accumulates dK, dV of one key block over the grouped query rows ``[lo, hi)``, on
    transposed (keys x queries) tiles. Keys past the sequence only reach their own (unstored)
    rows of dK and dV, so only query rows and the window are masked."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < E
    dv_ok = offs_dv < EV
    for start_m in range(lo, hi, BLOCK_M):
        r = start_m + offs_m
        row_ok = r < len_q * GROUP
        i = r // GROUP
        h = hk * GROUP + r % GROUP
        i64 = i.to(tl.int64)
        h64 = h.to(tl.int64)
        q = _load2d(
            q_seq + i64[:, None] * stride_ql + h64[:, None] * stride_qh
            + offs_d[None, :] * stride_qd,
            row_ok, d_ok, MASKED, not EVEN_D,
        )  # fmt: skip
        do = _load2d(
            do_seq + i64[:, None] * stride_dol + h64[:, None] * stride_doh
            + offs_dv[None, :] * stride_dod,
            row_ok, dv_ok, MASKED, not EVEN_DV,
        )  # fmt: skip
        lse_ptrs = lse_seq + h64 * stride_lh + i64
        delta_ptrs = delta_seq + h64 * stride_lh + i64
        if MASKED:
            lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_ptrs)
            delta = tl.load(delta_ptrs)
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        if ALIBI:
            slope = tl.load(slope_base + h, mask=row_ok, other=0.0)
        else:
            slope = tl.zeros([BLOCK_M], dtype=tl.float32)
        if MASK_MODE == 1:
            m_ptrs = m_cols
            m_ok = j_ok[:, None]
        else:
            m_ptrs = m_cols + (h64 * stride_mh + i64 * stride_ml)[None, :]
            m_ok = j_ok[:, None] & row_ok[None, :]
        st = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISE, UPCAST)
        st2, t = _scores(
            st, i[None, :], j[:, None], d, row_ok[None, :] & j_ok[:, None], slope[None, :],
            m_ptrs, m_ok, scale, qk_scale, softcap, inv_softcap, window_left, window_right, MASKED,
            SOFTCAP, ALIBI, MASK_MODE, MASK_BOOL, WINDOW_LEFT, WINDOW_RIGHT, False,
        )  # fmt: skip
        pt = _exp2_prob(st2 - lse[None, :])
        dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISE, UPCAST)
        if DROPOUT:
            keep = _dropout_keep(
                i, stream_base + h, start_n, seed_lo, seed_hi, rng_offset, threshold, BLOCK_M,
                BLOCK_N,
            )  # fmt: skip
            w = tl.trans(tl.where(keep, drop_scale, 0.0))
            dv = _dot((pt * w).to(do.dtype), do, dv, PRECISE, UPCAST)
            dpt = dpt * w
        else:
            dv = _dot(pt.to(do.dtype), do, dv, PRECISE, UPCAST)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - t * t)
        dk = _dot(dst.to(q.dtype), q, dk, PRECISE, UPCAST)
    return dk, dv


@triton.autotune(
    configs=_configs(FLASH_DKDV_CONFIGS, INTERPRET_DKDV),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("m", None, "BLOCK_N")},
)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def flash_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, SLOPES, RNG, M,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dol, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_lb, stride_lh, stride_ab,
    stride_mb, stride_mh, stride_ml, stride_ms,
    H, GROUP, L, S_CAP, T_Q, T_K, KV_ROWS,
    scale, qk_scale, softcap, inv_softcap, window_left, window_right, threshold, drop_scale,
    L_KEY, S_KEY,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, VARLEN: tl.constexpr, PAGED: tl.constexpr, WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, MASK_MODE: tl.constexpr, MASK_BOOL: tl.constexpr,
    PRECISE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program per (key block, batch x key/value head): dK and dV of ``BLOCK_N`` keys,
    summed over the head's query group in the tiles' rows. No atomics: each program owns its
    rows of dK and dV, so results are deterministic. ``S_CAP`` is the (longest) key length."""
    num_n = tl.cdiv(S_CAP, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    off_bh = pid // num_n
    hkv = H // GROUP
    b = off_bh // hkv
    hk = off_bh % hkv
    q_start, len_q, kv_b, kv_first, len_k = _sequence(
        b, CU_Q, CU_K, CU_K, CU_K, CU_K, L, S_CAP, T_Q, T_K, KV_ROWS,
        VARLEN, False, False, False, False,
    )  # fmt: skip
    start_n = pid_n * BLOCK_N
    if start_n >= len_k:
        return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    j = start_n + tl.arange(0, BLOCK_N)
    j_ok = j < len_k
    j64 = (kv_first + j).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kb = kv_b.to(tl.int64)
    k = _load2d(
        K + kb * stride_kb + j64[:, None] * stride_ks + hk64 * stride_kh
        + offs_d[None, :] * stride_kd,
        j_ok, offs_d < E, True, not EVEN_D,
    )  # fmt: skip
    v = _load2d(
        V + kb * stride_vb + j64[:, None] * stride_vs + hk64 * stride_vh
        + offs_dv[None, :] * stride_vd,
        j_ok, offs_dv < EV, True, not EVEN_DV,
    )  # fmt: skip
    q_seq = Q + b64 * stride_qb + q_start.to(tl.int64) * stride_ql
    do_seq = DO + b64 * stride_dob + q_start.to(tl.int64) * stride_dol
    lse_seq = LSE + b64 * stride_lb + q_start
    delta_seq = DELTA + b64 * stride_lb + q_start
    m_cols = (M + b64 * stride_mb + j.to(tl.int64) * stride_ms)[:, None]
    if DROPOUT:
        seed_lo, seed_hi, rng_offset = _rng_words(RNG)
        thr = threshold.to(tl.uint32)
    else:
        seed_lo = 0
        seed_hi = 0
        rng_offset = 0
        thr = 0

    # The query positions that see this key block, from the window; the rows that see all of
    # it need no masking (keys past the sequence do not matter here).
    d = len_k - len_q
    j_last = tl.minimum(start_n + BLOCK_N, len_k) - 1
    lo_i = 0
    full_lo_i = 0
    hi_i = len_q
    full_hi_i = len_q
    if WINDOW_RIGHT:
        lo_i = tl.minimum(tl.maximum(start_n - d - window_right, 0), len_q)
        full_lo_i = tl.minimum(tl.maximum(j_last - d - window_right, 0), len_q)
    if WINDOW_LEFT:
        hi_i = tl.maximum(tl.minimum(j_last - d + window_left + 1, len_q), 0)
        full_hi_i = tl.maximum(tl.minimum(start_n - d + window_left + 1, len_q), 0)
    start, e1, e2 = _stages(
        lo_i * GROUP, hi_i * GROUP, full_lo_i * GROUP, tl.minimum(full_hi_i, hi_i) * GROUP,
        BLOCK_M,
    )  # fmt: skip

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    stream_base = b * H
    slope_base = SLOPES + b64 * stride_ab
    dk, dv = _dkdv_loop(
        dk, dv, k, v, j, j_ok, start_n, q_seq, do_seq, lse_seq, delta_seq, m_cols, stream_base,
        slope_base, start, e1, len_q, d, hk, GROUP, stride_ql, stride_qh, stride_qd, stride_dol,
        stride_doh, stride_dod, stride_lh, stride_mh, stride_ml, E, EV, scale, qk_scale,
        softcap, inv_softcap, window_left, window_right, seed_lo, seed_hi, rng_offset, thr,
        drop_scale, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, True, WINDOW_LEFT,
        WINDOW_RIGHT, SOFTCAP, ALIBI, DROPOUT, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
    )  # fmt: skip
    dk, dv = _dkdv_loop(
        dk, dv, k, v, j, j_ok, start_n, q_seq, do_seq, lse_seq, delta_seq, m_cols, stream_base,
        slope_base, e1, e2, len_q, d, hk, GROUP, stride_ql, stride_qh, stride_qd, stride_dol,
        stride_doh, stride_dod, stride_lh, stride_mh, stride_ml, E, EV, scale, qk_scale,
        softcap, inv_softcap, window_left, window_right, seed_lo, seed_hi, rng_offset, thr,
        drop_scale, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, False, WINDOW_LEFT,
        WINDOW_RIGHT, SOFTCAP, ALIBI, DROPOUT, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
    )  # fmt: skip
    dk, dv = _dkdv_loop(
        dk, dv, k, v, j, j_ok, start_n, q_seq, do_seq, lse_seq, delta_seq, m_cols, stream_base,
        slope_base, e2, hi_i * GROUP, len_q, d, hk, GROUP, stride_ql, stride_qh, stride_qd,
        stride_dol, stride_doh, stride_dod, stride_lh, stride_mh, stride_ml, E, EV, scale,
        qk_scale, softcap, inv_softcap, window_left, window_right, seed_lo, seed_hi,
        rng_offset, thr, drop_scale, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, True,
        WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI, DROPOUT, MASK_MODE, MASK_BOOL, PRECISE,
        UPCAST,
    )  # fmt: skip

    dk = dk * scale
    ok_d = j_ok[:, None] & (offs_d < E)[None, :]
    ok_dv = j_ok[:, None] & (offs_dv < EV)[None, :]
    tl.store(
        DK + kb * stride_dkb + j64[:, None] * stride_dks + hk64 * stride_dkh
        + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty), mask=ok_d,
    )  # fmt: skip
    tl.store(
        DV + kb * stride_dvb + j64[:, None] * stride_dvs + hk64 * stride_dvh
        + offs_dv[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty), mask=ok_dv,
    )  # fmt: skip


@triton.jit
def _dq_loop(
    dq, q, do, lse, delta, i, row_ok, stream, slope, m_rows, k_head, v_head, lo, hi, len_k, d,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, E, EV, scale, qk_scale, softcap,
    inv_softcap, window_left, window_right, seed_lo, seed_hi, rng_offset, threshold,
    drop_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_MODE: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Accumulates dQ of one tile of grouped query rows over the key blocks ``[lo, hi)``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < E
    dv_ok = offs_dv < EV
    for start_n in range(lo, hi, BLOCK_N):
        j = start_n + offs_n
        j_ok = j < len_k
        j64 = j.to(tl.int64)
        k = _load2d(
            k_head + j64[:, None] * stride_ks + offs_d[None, :] * stride_kd, j_ok, d_ok, MASKED,
            not EVEN_D,
        )  # fmt: skip
        v = _load2d(
            v_head + j64[:, None] * stride_vs + offs_dv[None, :] * stride_vd, j_ok, dv_ok,
            MASKED, not EVEN_DV,
        )  # fmt: skip
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISE, UPCAST)
        if MASK_MODE == 1:
            m_ptrs = m_rows + j[None, :] * stride_ms
            m_ok = j_ok[None, :]
        else:
            m_ptrs = m_rows[:, None] + j[None, :] * stride_ms
            m_ok = row_ok[:, None] & j_ok[None, :]
        s2, t = _scores(
            s, i[:, None], j[None, :], d, j_ok[None, :], slope[:, None], m_ptrs, m_ok, scale,
            qk_scale, softcap, inv_softcap, window_left, window_right, MASKED, SOFTCAP, ALIBI,
            MASK_MODE, MASK_BOOL, WINDOW_LEFT, WINDOW_RIGHT, False,
        )  # fmt: skip
        p = _exp2_prob(s2 - lse[:, None])
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISE, UPCAST)
        if DROPOUT:
            keep = _dropout_keep(
                i, stream, start_n, seed_lo, seed_hi, rng_offset, threshold, BLOCK_M, BLOCK_N
            )
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(k.dtype), k, dq, PRECISE, UPCAST)
    return dq


@triton.autotune(
    configs=_configs(FLASH_DQ_CONFIGS, INTERPRET_DQ),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("n", "L_KEY", "BLOCK_M")},
)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def flash_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, SLOPES, RNG, M,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dol, stride_doh, stride_dod,
    stride_dqb, stride_dql, stride_dqh, stride_dqd,
    stride_lb, stride_lh, stride_ab,
    stride_mb, stride_mh, stride_ml, stride_ms,
    H, GROUP, L, S_CAP, T_Q, T_K, KV_ROWS,
    scale, qk_scale, softcap, inv_softcap, window_left, window_right, threshold, drop_scale,
    L_KEY, S_KEY,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, VARLEN: tl.constexpr, PAGED: tl.constexpr, WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, MASK_MODE: tl.constexpr, MASK_BOOL: tl.constexpr,
    PRECISE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program per (tile of grouped query rows, batch x key/value head): dQ of its rows."""
    num_m = tl.cdiv(L * GROUP, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    off_bh = pid // num_m
    if WINDOW_RIGHT and not WINDOW_LEFT:
        pid_m = num_m - 1 - pid_m
    hkv = H // GROUP
    b = off_bh // hkv
    hk = off_bh % hkv
    q_start, len_q, kv_b, kv_first, len_k = _sequence(
        b, CU_Q, CU_K, CU_K, CU_K, CU_K, L, S_CAP, T_Q, T_K, KV_ROWS,
        VARLEN, False, False, False, False,
    )  # fmt: skip
    start_m = pid_m * BLOCK_M
    if start_m >= len_q * GROUP:
        return
    b64 = b.to(tl.int64)
    r = start_m + tl.arange(0, BLOCK_M)
    row_ok = r < len_q * GROUP
    i = r // GROUP
    h = hk * GROUP + r % GROUP
    i64 = (q_start + i).to(tl.int64)
    h64 = h.to(tl.int64)
    d = len_k - len_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load2d(
        Q + b64 * stride_qb + i64[:, None] * stride_ql + h64[:, None] * stride_qh
        + offs_d[None, :] * stride_qd,
        row_ok, offs_d < E, True, not EVEN_D,
    )  # fmt: skip
    do = _load2d(
        DO + b64 * stride_dob + i64[:, None] * stride_dol + h64[:, None] * stride_doh
        + offs_dv[None, :] * stride_dod,
        row_ok, offs_dv < EV, True, not EVEN_DV,
    )  # fmt: skip
    lse_ptrs = LSE + b64 * stride_lb + h64 * stride_lh + i64
    lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + b64 * stride_lb + h64 * stride_lh + i64, mask=row_ok, other=0.0)
    hk64 = hk.to(tl.int64)
    kb = kv_b.to(tl.int64)
    k_head = K + kb * stride_kb + kv_first.to(tl.int64) * stride_ks + hk64 * stride_kh
    v_head = V + kb * stride_vb + kv_first.to(tl.int64) * stride_vs + hk64 * stride_vh
    if ALIBI:
        slope = tl.load(SLOPES + b64 * stride_ab + h, mask=row_ok, other=0.0)
    else:
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if MASK_MODE == 1:
        m_rows = M + b64 * stride_mb
    else:
        m_rows = M + b64 * stride_mb + h64 * stride_mh + i.to(tl.int64) * stride_ml
    if DROPOUT:
        seed_lo, seed_hi, rng_offset = _rng_words(RNG)
        thr = threshold.to(tl.uint32)
    else:
        seed_lo = 0
        seed_hi = 0
        rng_offset = 0
        thr = 0
    stream = b * H + h

    i_lo = start_m // GROUP
    i_hi = tl.minimum((start_m + BLOCK_M - 1) // GROUP, len_q - 1)
    lo = 0
    full_lo = 0
    hi = len_k
    full_hi = len_k
    if WINDOW_LEFT:
        lo = tl.maximum(i_lo + d - window_left, 0)
        full_lo = tl.maximum(i_hi + d - window_left, 0)
    if WINDOW_RIGHT:
        hi = tl.maximum(tl.minimum(i_hi + d + window_right + 1, len_k), 0)
        full_hi = tl.maximum(tl.minimum(i_lo + d + window_right + 1, len_k), 0)
    start, e1, e2 = _stages(lo, hi, full_lo, full_hi, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_loop(
        dq, q, do, lse, delta, i, row_ok, stream, slope, m_rows, k_head, v_head, start, e1, len_k, d,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, E, EV, scale, qk_scale, softcap,
        inv_softcap, window_left, window_right, seed_lo, seed_hi, rng_offset, thr, drop_scale,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, True, WINDOW_LEFT, WINDOW_RIGHT,
        SOFTCAP, ALIBI, DROPOUT, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
    )  # fmt: skip
    dq = _dq_loop(
        dq, q, do, lse, delta, i, row_ok, stream, slope, m_rows, k_head, v_head, e1, e2, len_k, d,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, E, EV, scale, qk_scale, softcap,
        inv_softcap, window_left, window_right, seed_lo, seed_hi, rng_offset, thr, drop_scale,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, False, WINDOW_LEFT, WINDOW_RIGHT,
        SOFTCAP, ALIBI, DROPOUT, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
    )  # fmt: skip
    dq = _dq_loop(
        dq, q, do, lse, delta, i, row_ok, stream, slope, m_rows, k_head, v_head, e2, hi, len_k, d,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, E, EV, scale, qk_scale, softcap,
        inv_softcap, window_left, window_right, seed_lo, seed_hi, rng_offset, thr, drop_scale,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, True, WINDOW_LEFT, WINDOW_RIGHT,
        SOFTCAP, ALIBI, DROPOUT, MASK_MODE, MASK_BOOL, PRECISE, UPCAST,
    )  # fmt: skip
    dq = dq * scale
    tl.store(
        DQ + b64 * stride_dqb + i64[:, None] * stride_dql + h64[:, None] * stride_dqh
        + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < E)[None, :],
    )  # fmt: skip
