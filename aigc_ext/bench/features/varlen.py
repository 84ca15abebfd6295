"""Variable-length batches: ours on the packed batch against torch SDPA padded and per sequence.

The batch is ``sequences`` sequences with lengths drawn (seeded) from ``[min_len, max_len]``,
non-causal. Three contenders get the same values:

* **ours**: ``flash_forward`` on the packed ``(total, H, D)`` tensors with ``cu_seqlens``
  (forward+backward: ``flash_backward`` after it, from the forward's output and logsumexp);
* **torch padded**: ``torch.nn.functional.scaled_dot_product_attention`` (which picks its own
  kernel) on ``(B, H, longest, D)`` tensors padded with zeros, with a ``(B, 1, 1, longest)``
  bool key-padding mask, as a model without varlen support runs a batch;
* **torch per sequence**: the same function called on each sequence alone, in a loop (no
  padding: the work is the packed batch's, plus a call per sequence).

Forward+backward gradients come from ``torch.autograd.grad`` (nothing accumulates across
runs). Grouped-query attention passes ``enable_gqa=True`` to torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aigc_ext.bench.features.common import OUTPUT_TOLERANCE, flash_ops, max_abs_diff, randn
from aigc_ext.bench.features.config import VarlenSizes
from aigc_ext.bench.features.rows import FeatureRow, Target, timed_row
from aigc_ext.bench.features.timing import Timing, paired_ratio

__all__ = ["TARGET", "VarlenBatch", "draw_lengths", "make_batch", "measure_varlen"]

# torch padded / ours: the packed batch at least 1.8x faster.
TARGET = Target(">=", 1.8)
NOTE = (
    "torch / ours: torch's time over ours (above 1: ours is faster). torch is "
    "torch.nn.functional.scaled_dot_product_attention (its own kernel choice): padded = the "
    "batch padded to the longest sequence with a (B, 1, 1, S) bool key-padding mask; per "
    "sequence = one call per sequence, no padding."
)


def draw_lengths(sizes: VarlenSizes, seed: int) -> list[int]:
    """The sequence lengths, uniform in ``[min_len, max_len]``, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.randint(sizes.min_len, sizes.max_len + 1, (sizes.sequences,), generator=gen)
    return [int(x) for x in drawn]


@dataclass
class VarlenBatch:
    """One batch in the three layouts (packed for ours, padded and per sequence for torch)."""

    lengths: list[int]
    cu_seqlens: torch.Tensor  # int32 (B + 1,)
    q: torch.Tensor  # (total, Hq, D)
    k: torch.Tensor  # (total, Hkv, D)
    v: torch.Tensor
    grad_out: torch.Tensor  # (total, Hq, D)
    q_pad: torch.Tensor  # (B, Hq, longest, D)
    k_pad: torch.Tensor  # (B, Hkv, longest, D)
    v_pad: torch.Tensor
    grad_pad: torch.Tensor  # zero at padded query rows
    mask: torch.Tensor  # bool (B, 1, 1, longest), True = key present
    per_seq: list[tuple[torch.Tensor, ...]]  # (q, k, v, grad_out), each (1, H, L_b, D)

    @property
    def longest(self) -> int:
        return max(self.lengths)

    @property
    def gqa(self) -> bool:
        return self.q.shape[1] != self.k.shape[1]

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """``(B, H, longest, D)`` back to the packed ``(total, H, D)`` (real rows only)."""
        return torch.cat(
            [padded[b, :, :n].transpose(0, 1) for b, n in enumerate(self.lengths)], dim=0
        )


def make_batch(
    lengths: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> VarlenBatch:
    """Random values for ``lengths``, laid out packed, padded and per sequence."""
    total, batch, longest = sum(lengths), len(lengths), max(lengths)
    q = randn((total, heads, head_dim), dtype, gen)
    k = randn((total, kv_heads, head_dim), dtype, gen)
    v = randn((total, kv_heads, head_dim), dtype, gen)
    grad_out = randn((total, heads, head_dim), dtype, gen)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32)

    def pad(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((batch, x.shape[1], longest, head_dim))
        for b in range(batch):
            out[b, :, : lengths[b]] = x[offsets[b] : offsets[b + 1]].transpose(0, 1)
        return out

    mask = torch.zeros(batch, 1, 1, longest, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, ..., :n] = True
    per_seq = [
        tuple(
            x[offsets[b] : offsets[b + 1]].transpose(0, 1).unsqueeze(0).contiguous()
            for x in (q, k, v, grad_out)
        )
        for b in range(batch)
    ]
    return VarlenBatch(
        list(lengths), cu, q, k, v, grad_out, pad(q), pad(k), pad(v), pad(grad_out), mask, per_seq
    )


def _contenders(batch: VarlenBatch, mode: str) -> dict:
    """name -> a call returning the attention output (ours packed; torch padded / per seq)."""
    forward, backward = flash_ops()
    cu, n = batch.cu_seqlens, batch.longest
    scale = batch.q.shape[-1] ** -0.5
    gqa = batch.gqa

    def ours() -> torch.Tensor:
        out, lse = forward(batch.q, batch.k, batch.v, cu, cu, n, n, scale=scale)
        if mode == "fwd+bwd":
            q, k, v, g = batch.q, batch.k, batch.v, batch.grad_out
            backward(g, q, k, v, out, lse, cu, cu, n, n, scale=scale)
        return out

    def sdpa(q, k, v, g, mask=None) -> torch.Tensor:
        if mode == "fwd":
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=gqa)
        torch.autograd.grad(out, leaves, g)
        return out.detach()

    def padded() -> torch.Tensor:
        return sdpa(batch.q_pad, batch.k_pad, batch.v_pad, batch.grad_pad, batch.mask)

    def per_sequence() -> list[torch.Tensor]:
        return [sdpa(*seq) for seq in batch.per_seq]

    return {"ours": ours, "padded": padded, "loop": per_sequence}


def measure_varlen(
    sizes: VarlenSizes,
    dtype: torch.dtype,
    dtype_name: str,
    modes: tuple[str, ...],
    timing: Timing,
    seed: int,
    problem: str | None = None,
) -> list[FeatureRow]:
    """Rows ``torch padded / ours`` (target :data:`TARGET`) and ``torch per sequence / ours``
    for each mode, with ``heads`` KV heads and with ``gqa_kv_heads``."""
    lengths = draw_lengths(sizes, seed)
    problem = problem or describe(sizes, seed, lengths)
    gen = torch.Generator().manual_seed(seed + 1)
    rows: list[FeatureRow] = []
    kv_options = dict.fromkeys((sizes.heads, sizes.gqa_kv_heads))
    for kv_heads in kv_options:
        batch = make_batch(lengths, sizes.heads, kv_heads, sizes.head_dim, dtype, gen)
        heads = f"H={sizes.heads}" + (f" KV={kv_heads}" if kv_heads != sizes.heads else "")
        for mode in modes:
            calls = _contenders(batch, mode)
            # The first calls are the check (and a warm-up round).
            ours = calls["ours"]()
            padded = batch.unpad(calls["padded"]())
            loop = torch.cat([o[0].transpose(0, 1) for o in calls["loop"]()], dim=0)
            times = timing.run(calls, checked=True)
            tol = OUTPUT_TOLERANCE[dtype]
            common = dict(feature="varlen", problem=problem, dtype=dtype_name, mode=mode, note=NOTE)
            rows.append(
                timed_row(
                    **common,
                    subject=f"ours packed, {heads}",
                    baseline="torch padded + key mask",
                    subject_times=times["ours"],
                    baseline_times=times["padded"],
                    ratio_name="torch / ours",
                    ratio=paired_ratio(times["padded"], times["ours"]),
                    target=TARGET,
                    max_diff=max_abs_diff(ours, padded),
                    tolerance=tol,
                )
            )
            rows.append(
                timed_row(
                    **common,
                    subject=f"ours packed, {heads}",
                    baseline=f"torch per sequence ({len(lengths)} calls)",
                    subject_times=times["ours"],
                    baseline_times=times["loop"],
                    ratio_name="torch / ours",
                    ratio=paired_ratio(times["loop"], times["ours"]),
                    max_diff=max_abs_diff(ours, loop),
                    tolerance=tol,
                )
            )
    return rows


def describe(sizes: VarlenSizes, seed: int, lengths: list[int] | None = None) -> str:
    """The table title of a varlen problem."""
    lengths = lengths if lengths is not None else draw_lengths(sizes, seed)
    return (
        f"varlen: {sizes.sequences} sequences, lengths {sizes.min_len}-{sizes.max_len} "
        f"(seed {seed}: total {sum(lengths)}, longest {max(lengths)}), D={sizes.head_dim}, "
        "non-causal"
    )
