"""Hugging Face transformers integration: ``attn_implementation="aigc_ext"``.

::

    import aigc_ext  # before or after transformers: "aigc_ext" is registered either way
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="aigc_ext")
    model.set_attn_implementation("aigc_ext")  # or switch a loaded model

``import aigc_ext`` calls :func:`register_when_imported`: if transformers' modeling code
(``transformers.modeling_utils``) is already loaded it registers at once, otherwise a
post-import hook (:func:`aigc_ext.integrations.when_imported`) registers right after that module
is executed, before any model can ask for the name. transformers itself is never imported by
``import aigc_ext``. Call :func:`register` for another name.

:func:`register` adds :func:`attention_forward` to ``transformers.AttentionInterface`` and
transformers' SDPA mask builder (``masking_utils.sdpa_mask``) to ``AttentionMaskInterface``
under the same name. Both are needed: transformers passes no mask at all (padding ignored) to an
attention implementation that has no mask function.

The attention calls go to :func:`aigc_ext.scaled_dot_product_attention` with the semantics of
transformers' own ``sdpa`` implementation: causal attention (``is_causal`` only when there is no
mask and more than one query, as transformers does), padding and sliding-window masks (built by
the mask function), grouped-query attention without copying key/value heads, ``scaling``,
``dropout`` (in training mode only) and additive ``position_bias`` (T5 and similar). Features the
fused kernel does not implement, tanh soft-capping of the scores (``softcap``, Gemma 2) and
attention sinks (``s_aux``), run on a pure-PyTorch path with a one-time warning naming the
feature.

Calls with FlashAttention-only features go to the fused ``flash_forward`` operator
(:func:`aigc_ext.flash.ops.flash_attention`) instead: tanh soft-capping of the scores
(``softcap``, Gemma 2/3), attention sinks (``s_aux``, gpt-oss), sliding windows
(``sliding_window``: blocks outside the window are skipped where the alignment is known, that
is when the queries are the keys), with the padding mask passed along; and **padding-free
training**, a batch of one packed row described by ``cu_seq_lens_q``/``cu_seq_lens_k`` (as
``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` produces them) or by
``position_ids`` that restart at 0 for each sequence, through the variable-length kernel. Only
where no fused backend can serve such a call (a CUDA call with a padding mask, which the Triton
flash kernels do not take) does it run on a pure-PyTorch path, with a one-time warning naming
the feature.

This module imports transformers only inside :func:`register` (and the hook it installs).
"""

from __future__ import annotations

import math
import sys

import torch

from aigc_ext.api import scaled_dot_product_attention
from aigc_ext.dispatch import REFERENCE, BackendError, current_backend_override
from aigc_ext.utils import warn_once

__all__ = ["DEFAULT_NAME", "attention_forward", "register", "register_when_imported"]

DEFAULT_NAME = "aigc_ext"

_warned: set[str] = set()
_names_with_masks: set[str] = set()  # attn_implementation names checked to have a mask function


def register(name: str = DEFAULT_NAME) -> str:
    """Registers :func:`attention_forward` and its mask function with transformers as ``name``.

    Afterwards ``attn_implementation=name`` works in ``from_pretrained``, ``from_config`` and
    ``model.set_attn_implementation``. Calling it again is harmless. Returns ``name``.
    Raises ``ImportError`` if transformers is not installed.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    if name == "eager":
        raise ValueError("register: 'eager' names transformers' per-model eager attention")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise ImportError(
            "aigc_ext.integrations.transformers.register() needs the transformers package "
            f"(pip install transformers): {exc}"
        ) from exc
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    _names_with_masks.add(name)
    return name


_MODELING = "transformers.modeling_utils"  # AttentionInterface
_MASKING = "transformers.masking_utils"  # AttentionMaskInterface, sdpa_mask


def register_when_imported(name: str = DEFAULT_NAME) -> None:
    """Registers ``name`` (see :func:`register`) as soon as transformers' modeling code is
    loaded: now if it is, else right after ``transformers.modeling_utils`` is imported, whatever
    imports it. Imports nothing itself; ``import aigc_ext`` calls it."""
    from aigc_ext.integrations import when_imported

    def hook(module) -> None:
        modeling = sys.modules.get(_MODELING)
        if modeling is None or (modeling is not module and _still_executing(modeling)):
            return  # registered when modeling_utils finishes
        masking = sys.modules.get(_MASKING)
        if masking is not None and masking is not module and _still_executing(masking):
            return  # registered when masking_utils finishes
        register(name)  # imports masking_utils if nobody has yet

    when_imported(_MODELING, hook)
    when_imported(_MASKING, hook)


def _still_executing(module) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls for ``attn_implementation="aigc_ext"``.

    ``query (B, H, L, D)``, ``key``/``value (B, Hkv, S, D)``; ``attention_mask`` is the 4-D mask
    built by the registered mask function (bool, True = attend) or None. Returns
    ``(attn_output (B, L, H, Dv) contiguous, None)``: attention weights are never materialised.
    ``sliding_window`` arrives in ``kwargs`` and needs nothing here: the mask function already
    restricts each query to its window (and returns no mask only when every key is inside it).
    """
    _check_mask_function(module)
    q_len = query.shape[2]
    if query.shape[0] == 1 and key.shape[0] > 1:  # queries shared by the batch (learned queries)
        query = query.expand(key.shape[0], -1, -1, -1)

    # As transformers' sdpa: the module's causality, used only when no mask was built (the mask
    # includes causality otherwise) and not for a single query (decoding attends to every key).
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:
        # Prefill into a static cache: keys past the queries are hidden by the (top-left aligned)
        # causal mask anyway; dropping them saves work.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]

    mask = attention_mask
    if position_bias is not None:
        mask = _position_bias_mask(position_bias, mask, key.dtype)
    if mask is not None and mask.is_floating_point() and mask.dtype != torch.float32:
        mask = mask.to(query.dtype)  # the kernels take float32 or query-dtype additive masks

    dropout_p = float(dropout) if getattr(module, "training", True) else 0.0
    enable_gqa = query.shape[1] != key.shape[1]

    packed = _packed_sequences(query, key, attention_mask, kwargs)
    sliding_window = kwargs.get("sliding_window")
    wants_flash = (
        packed is not None
        or softcap is not None
        or s_aux is not None
        or (sliding_window is not None and query.shape[2] == key.shape[2] > sliding_window)
    )
    if wants_flash and position_bias is None and _flash_serves(query, mask, packed):
        return _flash_forward(
            query,
            key,
            value,
            mask,
            is_causal=bool(getattr(module, "is_causal", True)) if packed else is_causal,
            scale=scaling,
            dropout_p=dropout_p,
            softcap=softcap,
            sinks=s_aux,
            sliding_window=sliding_window if query.shape[2] == key.shape[2] else None,
            packed=packed,
        ), None

    unsupported = []
    if softcap is not None:
        unsupported.append("tanh soft-capping of attention scores (softcap)")
    if s_aux is not None:
        unsupported.append("attention sinks (s_aux)")
    if unsupported:
        _fallback_allowed(unsupported)
        out = _attention_math(
            query, key, value, mask, is_causal, scaling, dropout_p, softcap=softcap, sinks=s_aux
        )
    else:
        out = scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scaling,
            enable_gqa=enable_gqa,
        )
    return out.transpose(1, 2).contiguous(), None


def _packed_sequences(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict
) -> tuple[torch.Tensor, int] | None:
    """``(cu_seqlens int32, longest)`` when the call is a padding-free packed batch, else None.

    A packed batch is one row (batch size 1) holding several sequences, each attending only to
    itself: given by ``cu_seq_lens_q``/``cu_seq_lens_k`` (equal, since queries are keys in
    training), or by ``position_ids`` that restart (a step other than +1 starts a sequence, the
    rule transformers' masks use). A KV cache (keys beyond the queries) is never packed.
    """
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and not torch.equal(cu_k, cu):
            return None  # queries and keys packed differently: not a training batch
        cu = cu.to(device=query.device, dtype=torch.int32)
        longest = kwargs.get("max_length_q")
        if longest is None:
            longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        return cu, int(longest)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape != (1, query.shape[2]):
        return None
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return None
    pos = position_ids[0]
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = (pos[1:] - pos[:-1]) != 1
    idx = torch.nonzero(starts).flatten()
    if idx.numel() < 2:
        return None  # one sequence: the ordinary causal path serves it
    bounds = torch.cat([idx, idx.new_tensor([pos.numel()])])
    return bounds.to(device=query.device, dtype=torch.int32), int((bounds[1:] - bounds[:-1]).max())


def _flash_serves(
    query: torch.Tensor, mask: torch.Tensor | None, packed: tuple[torch.Tensor, int] | None
) -> bool:
    """Whether a fused flash operator takes this call (the C++ one takes masks; Triton not)."""
    if current_backend_override() == REFERENCE:
        return False
    if query.device.type == "cpu":
        return packed is None or mask is None or mask.dtype == torch.bool
    return mask is None or packed is not None


def _flash_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    is_causal: bool,
    scale: float | None,
    dropout_p: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    sliding_window: int | None,
    packed: tuple[torch.Tensor, int] | None,
) -> torch.Tensor:
    """The call on the flash operator; returns ``(B, L, H, Dv)`` as transformers expects.

    ``(B, H, L, D)`` tensors are viewed as the operator's ``(B, L, H, D)`` (no copy). Causality
    is the operator's bottom-right alignment, equal to transformers' here: either the queries
    are the keys, or a single query (no mask, so ``is_causal`` is already False) or a mask
    carries the causality. A sliding window of ``W`` keys is ``window_left = W - 1``.
    """
    from aigc_ext.flash.ops import flash_attention

    window_left = sliding_window - 1 if sliding_window is not None else -1
    common = dict(
        scale=scale,
        window_left=window_left,
        softcap=float(softcap) if softcap is not None else 0.0,
        dropout_p=dropout_p,
        sinks=sinks.float() if sinks is not None else None,
    )
    if packed is not None:
        cu, longest = packed
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
        out, _ = flash_attention(q, k, v, cu, cu, longest, longest, causal=is_causal, **common)
        return out.unsqueeze(0)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out, _ = flash_attention(q, k, v, causal=is_causal, attn_mask=mask, **common)
    return out


def _check_mask_function(module: torch.nn.Module) -> None:
    """Refuses to run under a name that has no mask function: padding would be ignored."""
    config = getattr(module, "config", None)
    name = getattr(config, "_attn_implementation", None)
    if not isinstance(name, str) or name in _names_with_masks:
        return
    from transformers.masking_utils import AttentionMaskInterface

    if name in AttentionMaskInterface._global_mapping:
        _names_with_masks.add(name)
        return
    raise RuntimeError(
        f"aigc_ext: attn_implementation {name!r} has an attention function but no mask function, "
        "so transformers would drop padding and sliding-window masks; register it with "
        f"aigc_ext.integrations.transformers.register({name!r}) instead of "
        "AttentionInterface.register"
    )


def _fallback_allowed(features: list[str]) -> None:
    """Warns once per feature set; a forced fused backend cannot serve the call."""
    what = " and ".join(features)
    forced = current_backend_override()
    if forced is not None and forced != REFERENCE:
        raise BackendError(
            f"attention backend {forced!r} cannot serve this call: {what} is not implemented "
            "in the fused kernels"
        )
    message = (
        f"aigc_ext: the fused attention kernels do not implement {what}; these attention calls "
        "run on a pure-PyTorch path (correct, but slower and materialising the score matrix)"
    )
    warn_once(message, seen=_warned, stacklevel=3)  # the model code that called attention_forward


def _position_bias_mask(
    position_bias: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The additive mask transformers' sdpa builds from a position bias (causality stays a flag)."""
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, torch.finfo(dtype).min)
    return position_bias + attention_mask


def _heads_grouped(t: torch.Tensor, heads_kv: int, groups: int) -> torch.Tensor:
    """A (..., H or 1, L, S) tensor viewed as (..., Hkv or 1, G or 1, L, S)."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    return t.reshape(t.shape[0], heads_kv, groups, *t.shape[2:])


def _attention_math(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    dropout_p: float,
    *,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention in plain PyTorch (fp32, fp64 for fp64 inputs) with soft-capping and sinks.

    Same conventions as the fused path: bool masks mark the keys that take part, floating masks
    are added, ``is_causal`` is top-left aligned, a query row with no visible key (and no sink)
    yields zeros. Soft-capping is applied to the scaled scores before the mask, as Gemma 2 does;
    a sink adds one logit per head to the softmax denominator, as gpt-oss does. Key/value heads
    are shared by their query-head groups through broadcasting.
    """
    b, h, q_len, d = query.shape
    heads_kv, kv_len = key.shape[1], key.shape[2]
    groups = h // heads_kv
    cd = torch.float64 if query.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    q = query.reshape(b, heads_kv, groups, q_len, d).to(cd)
    k = key.unsqueeze(2).to(cd)
    v = value.unsqueeze(2).to(cd)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, Hkv, G, L, S)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if is_causal:
        hidden = torch.ones(q_len, kv_len, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(hidden, float("-inf"))
    if mask is not None:
        m = _heads_grouped(mask, heads_kv, groups)
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(cd)
    if sinks is not None:
        sink = sinks.to(cd).reshape(1, heads_kv, groups, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, sink], dim=-1)
    row_max = s.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    e = torch.exp(s - torch.where(empty, torch.zeros_like(row_max), row_max).detach())
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(empty, torch.ones_like(denom), denom)
    if sinks is not None:
        p = p[..., :-1]
    if dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, p=dropout_p)
    out = torch.matmul(p, v)  # (B, Hkv, G, L, Dv)
    return out.reshape(b, h, q_len, value.shape[-1]).to(query.dtype)
