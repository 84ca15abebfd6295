"""The public attention entry point."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aigc_ext.dispatch import select_backend
from aigc_ext.layout import broadcast_qkv, empty_result
from aigc_ext.validation import BROADCAST, ZERO_HEAD_DIM, ZEROS, validate_sdpa_args

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

    Batch dims (all but the last two) broadcast as in torch, across ranks too: a query
    ``(H, L, E)`` with key/value ``(N, H, S, E)`` gives ``(N, H, L, Ev)``; a call whose value is
    empty or whose query has no rows gives zeros of shape ``query.shape[:-1] + (Ev,)``, and a
    head dim ``E = 0`` gives scores of 0. Invalid arguments raise
    :class:`~aigc_ext.validation.AttentionArgumentError`, a ``ValueError`` and a
    ``RuntimeError`` (torch's class for them).

    The call is served by the fastest registered backend that supports it (see
    :func:`aigc_ext.backends` and :func:`aigc_ext.use_backend`). Combinations no fused kernel
    covers (dropout, a mask that requires grad) run on the pure-PyTorch reference path, with a
    one-time warning that says why.
    """
    call = validate_sdpa_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    prepare = call.prepare
    if prepare:
        if prepare == ZEROS:
            return empty_result(query, key, value)
        if prepare == ZERO_HEAD_DIM:  # one zero column: every score is 0 whatever the scale
            query, key = F.pad(query, (0, 1)), F.pad(key, (0, 1))
            return scaled_dot_product_attention(
                query, key, value, attn_mask, dropout_p, is_causal, 1.0, enable_gqa
            )
        if prepare == BROADCAST:
            query, key, value = broadcast_qkv(query, key, value, call.batch_shape, call.heads_kv)
    backend = select_backend(call)
    return backend.fn(
        query, key, value, attn_mask, call.dropout_p, call.is_causal, call.scale, call.enable_gqa
    )
