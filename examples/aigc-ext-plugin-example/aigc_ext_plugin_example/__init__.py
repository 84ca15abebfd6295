"""Example aigc_ext plugin: the ``example-naive`` backend and ``example-gaussian-noise``."""

from __future__ import annotations

import math

import torch

from aigc_ext import hookimpl

__all__ = ["gaussian_noise", "naive_sdpa", "unsupported_reason"]

NAME = "example-naive"


def naive_sdpa(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """softmax(Q K^T * scale + mask) V in float32 math (float64 for float64 inputs)."""
    cd = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = query.to(cd), key.to(cd), value.to(cd)
    if k.dim() >= 3 and k.shape[-3] != q.shape[-3]:  # grouped-query attention
        groups = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-2, -1)) * scale
    lq, lk = s.shape[-2], s.shape[-1]
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, -math.inf)
        else:
            s = s + attn_mask.to(cd)
    if lk == 0:  # no keys: every row is zero
        return (s @ v).to(query.dtype)  # an empty product: zeros, still differentiable
    row_max = s.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))  # rows with no key -> zeros
    return (p @ v).to(query.dtype)


def unsupported_reason(call) -> str | None:
    """Why this backend does not serve ``call`` (None: it does).

    It serves only calls made under ``use_backend("example-naive")``, so that installing the
    plugin never changes which backend serves other calls, and, like a fused kernel, neither
    dropout nor masks that require grad.
    """
    from aigc_ext.dispatch import current_backend_override

    if current_backend_override() != NAME:
        return f'serves only calls made under use_backend("{NAME}")'
    if call.dropout_p > 0.0:
        return "dropout_p > 0 is not implemented"
    if call.mask_requires_grad:
        return "attn_mask requires grad (not supported)"
    return None


def gaussian_noise(batch, *, generator=None, std=0.01):
    """Adds N(0, std^2) noise to a floating tensor, or to ``pixel_values`` of a dict batch (as
    a training run passes it); other entries are returned unchanged."""
    if isinstance(batch, dict):
        return {
            **batch,
            "pixel_values": gaussian_noise(batch["pixel_values"], generator=generator, std=std),
        }
    noise = torch.randn(batch.shape, generator=generator, dtype=batch.dtype, device=batch.device)
    return batch + std * noise


@hookimpl
def aigc_register_attention_backends(register):
    register(
        NAME,
        naive_sdpa,
        devices=("cpu",),
        priority=-50,
        description="example plugin: softmax(QK^T)V in float32 math",
        unsupported_reason=unsupported_reason,
    )


@hookimpl
def aigc_register_augmentations(register):
    register("example-gaussian-noise", gaussian_noise, description="adds N(0, 0.01^2) noise")
