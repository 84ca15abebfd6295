"""The FLOP model of every attention benchmark here (``aigc-ext bench`` and ``benchmarks/``).

One definition, so that GFLOP/s and TFLOP/s figures of the CPU and GPU benchmarks and of
``aigc-ext bench`` are comparable. The convention is FlashAttention's benchmark's: only the two
matmuls count (softmax, scaling and masking are left out), the backward counts as 2.5 forwards.
"""

from __future__ import annotations

__all__ = ["MODE_FLOP_FACTOR", "attention_flop"]

# FLOPs of each mode in units of the forward's (FlashAttention's benchmark convention: the
# backward does 2.5x the forward's matmul work). In the order of aigc_ext.bench.config.MODES.
MODE_FLOP_FACTOR: dict[str, float] = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5, "decode": 1.0}


def attention_flop(
    batch: int,
    heads: int,
    seq_q: int,
    seq_kv: int,
    head_dim: int,
    head_dim_v: int | None = None,
    causal: bool = False,
    mode: str = "fwd",
) -> float:
    """Floating-point operations of one attention call, counted as FlashAttention does.

    Forward: ``2*B*H*L*S*E`` for ``Q K^T`` plus ``2*B*H*L*S*Ev`` for ``P V`` (``4*B*H*L*S*E``
    when ``Ev == E``; ``head_dim_v=None`` means ``Ev == E``), halved for causal attention with
    ``L == S``. With ``L != S`` the causal (top-left aligned) mask keeps ``min(i + 1, S)`` keys
    for query ``i``, and exactly that fraction is counted. ``bwd`` counts 2.5x the forward,
    ``fwd+bwd`` 3.5x and ``decode`` (a forward with ``L = 1``) 1x. ``heads`` are the query
    heads: grouped-query attention does the same matmul work as one KV head per query head.

    Raises ``ValueError`` naming ``mode`` when it is not one of ``fwd``, ``bwd``, ``fwd+bwd``,
    ``decode``.
    """
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(
            f"mode: unknown value {mode!r}; expected one of {', '.join(MODE_FLOP_FACTOR)}"
        )
    ev = head_dim if head_dim_v is None else head_dim_v
    flop = 2.0 * batch * heads * seq_q * seq_kv * (head_dim + ev)
    if causal and seq_q * seq_kv > 0:
        if seq_q == seq_kv:
            flop /= 2
        else:
            full = min(seq_q, seq_kv)  # query rows i < S see i + 1 keys, later rows all S
            visible = full * (full + 1) // 2 + (seq_q - full) * seq_kv
            flop *= visible / (seq_q * seq_kv)
    return flop * MODE_FLOP_FACTOR[mode]
