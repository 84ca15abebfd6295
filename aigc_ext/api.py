"""The public attention entry point."""

from __future__ import annotations

import torch

from aigc_ext.dispatch import select_backend
from aigc_ext.validation import validate_sdpa_args

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in replacement for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Same signature and semantics as torch 2.13: ``query (..., L, E)``, ``key (..., S, E)``,
    ``value (..., S, Ev)``; a bool ``attn_mask`` marks with True the keys that take part, a
    floating one is added to the scores; masks broadcast; ``is_causal`` hides key ``j > i``
    (top-left aligned when ``L != S``); ``enable_gqa`` lets key/value have fewer heads than the
    query (dim -3), shared by groups of query heads; a query row with no key to attend to
    yields zeros. One extension: ``attn_mask`` and ``is_causal`` may be combined.

    The call is served by the fastest registered backend that supports it (see
    :func:`aigc_ext.backends` and :func:`aigc_ext.use_backend`). Combinations no fused kernel
    covers (dropout, a mask that requires grad) run on the pure-PyTorch reference path, with a
    one-time warning that says why.
    """
    call = validate_sdpa_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return select_backend(call).fn(call)
