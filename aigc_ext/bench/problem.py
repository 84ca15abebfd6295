"""The tensors of one benchmark row: query, key, value, the output gradient and the mask."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aigc_ext.bench.config import Case

__all__ = ["Problem", "make_problem"]


@dataclass
class Problem:
    """Inputs shared by every backend of a row (the same tensors, so the same numbers).

    ``mask`` is a bool mask (``True``: the key takes part) or ``None``: ``(B, 1, 1, S)`` for key
    padding, ``(1, Hq, L, S)`` for an arbitrary mask. Key 0 always takes part, so no query row
    is fully masked (implementations disagree on what such a row returns). ``lengths`` holds the
    number of valid keys per batch element for key padding.
    """

    case: Case
    query: torch.Tensor  # (B, Hq, L, E)
    key: torch.Tensor  # (B, Hkv, S, E)
    value: torch.Tensor  # (B, Hkv, S, Ev)
    grad_out: torch.Tensor | None  # (B, Hq, L, Ev), for the backward modes
    mask: torch.Tensor | None
    lengths: torch.Tensor | None
    scale: float

    @property
    def causal(self) -> bool:
        return self.case.causal

    @property
    def gqa(self) -> bool:
        return self.case.heads != self.case.kv_heads

    @property
    def device(self) -> torch.device:
        return self.query.device

    def sdpa_kwargs(self) -> dict:
        """Keyword arguments of ``scaled_dot_product_attention`` for this row."""
        return {
            "attn_mask": self.mask,
            "is_causal": self.causal,
            "scale": self.scale,
            "enable_gqa": self.gqa,
        }

    def folded_mask(self) -> tuple[torch.Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for APIs that take only one of the two (torch's SDPA):
        a causal row with a mask gets both folded into one bool mask."""
        if self.mask is None or not self.causal:
            return self.mask, self.causal
        lq, lk = self.case.seq_q, self.case.seq_kv
        keep = torch.ones(lq, lk, dtype=torch.bool, device=self.device).tril()
        return self.mask & keep, False


def make_problem(case: Case, device: str | torch.device = "cpu", seed: int = 0) -> Problem:
    """Random inputs for ``case`` (drawn on the CPU in float32 from ``seed``, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    b, h, kv = case.batch, case.heads, case.kv_heads
    lq, lk, e, ev = case.seq_q, case.seq_kv, case.head_dim, case.head_dim_v

    def randn(*shape: int) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        return t.to(device=device, dtype=case.torch_dtype)

    q, k, v = randn(b, h, lq, e), randn(b, kv, lk, e), randn(b, kv, lk, ev)
    grad_out = randn(b, h, lq, ev) if case.backward else None
    mask = lengths = None
    if case.mask == "padding":
        # Each batch element keeps between half and all of its keys (at least one).
        lo = max(1, lk // 2)
        lengths = torch.randint(lo, lk + 1, (b,), generator=gen)
        lengths[0] = lo  # at least one element is padded whatever the draw
        mask = torch.arange(lk)[None, None, None, :] < lengths[:, None, None, None]
    elif case.mask == "arbitrary":
        mask = torch.rand((1, h, lq, lk), generator=gen) < 0.7
        mask[..., 0] = True
    if mask is not None:
        mask = mask.to(device)
        lengths = lengths.to(device) if lengths is not None else None
    return Problem(
        case=case,
        query=q,
        key=k,
        value=v,
        grad_out=grad_out,
        mask=mask,
        lengths=lengths,
        scale=1.0 / math.sqrt(e),
    )
