"""The public attention entry point, and :func:`serve`, which runs a validated call.

``scaled_dot_product_attention`` validates its arguments into an
:class:`~aigc_ext.validation.AttentionCall` and hands it to :func:`serve`, which prepares it as
its ``prepare`` field says (torch's zeros for an empty call, one zero column for head dim 0,
batch dims broadcast as views) and calls the chosen backend's function on it. ``patch_sdpa``
serves the calls it routes the same way, so every backend sees prepared calls only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aigc_ext.dispatch import Backend, select_backend
from aigc_ext.layout import broadcast_qkv, empty_result
from aigc_ext.validation import (
    BROADCAST,
    DIRECT,
    ZERO_HEAD_DIM,
    ZEROS,
    AttentionCall,
    validate_sdpa_args,
)

__all__ = ["scaled_dot_product_attention", "serve"]


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
    return serve(call)


def serve(call: AttentionCall, backend: Backend | None = None) -> torch.Tensor:
    """The output of a validated call, on ``backend`` (default: the one
    :func:`~aigc_ext.dispatch.select_backend` chooses for it).

    The call is prepared first, as its ``prepare`` field says; the common case (``DIRECT``)
    goes to the backend as it is.
    """
    prepare = call.prepare
    if prepare:
        if prepare == ZEROS:  # torch's zeros, no kernel
            return empty_result(call.query, call.key, call.value)
        if prepare == ZERO_HEAD_DIM:  # one zero column: every score is 0 whatever the scale
            padded = validate_sdpa_args(
                F.pad(call.query, (0, 1)),
                F.pad(call.key, (0, 1)),
                call.value,
                call.attn_mask,
                call.dropout_p,
                call.is_causal,
                1.0,
                call.enable_gqa,
            )
            return serve(padded, backend)
        if prepare == BROADCAST:
            query, key, value = broadcast_qkv(
                call.query, call.key, call.value, call.batch_shape, call.heads_kv
            )
            call = call._replace(query=query, key=key, value=value, prepare=DIRECT)
    return (backend or select_backend(call)).fn(call)
