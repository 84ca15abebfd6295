"""The built-in vision model: ``"vit"``, a small vision transformer whose attention calls
:func:`aigc_ext.scaled_dot_product_attention`.

:class:`VisionTransformer` is a plain module of this package (patch embedding, class token,
learned positions, pre-norm blocks, a linear ``head``); the ``vit`` factory sizes it for the
dataset's images (``info["image_size"]``, ``info["num_channels"]``, ``info["num_labels"]``).
Common options (``seed``, ``init_from``, ``init_optional``) as in :mod:`aigc_ext.training.models`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aigc_ext.api import scaled_dot_product_attention
from aigc_ext.training.components import register_model
from aigc_ext.training.model_options import (
    from_info,
    init_rng,
    model_options,
    positive,
    probability,
)

__all__ = ["Block", "SelfAttention", "VisionTransformer", "vit"]


class SelfAttention(nn.Module):
    """Multi-head self-attention computed by :func:`aigc_ext.scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, attn_dropout: float):
        super().__init__()
        hidden = round(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A small ViT: patch embedding, class token, learned positions, pre-norm blocks, ``head``.

    ``forward(pixel_values (B, C, H, W)) -> logits (B, num_classes)``, classifying the final
    class-token state. Images are ``image_size`` square, divided into ``patch_size`` patches
    (8x8 digits with patches of 2: 16 patches). The blocks are the ``nn.ModuleList``
    ``blocks`` and the classifier the linear layer ``head``, where transfer strategies find them.
    """

    def __init__(
        self,
        *,
        image_size: int = 8,
        patch_size: int = 2,
        num_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("num_channels", num_channels),
            ("num_classes", num_classes),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
        ):
            positive(name, value)
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} must be divisible by patch_size={patch_size}"
            )
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, int | float) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        self.image_size, self.num_channels, self.num_classes = image_size, num_channels, num_classes
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(num_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.dropout = nn.Dropout(probability("dropout", dropout))
        attn_dropout = probability("attn_dropout", attn_dropout)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, dropout, attn_dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.num_channels, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}"
            )
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


@register_model("vit")
@model_options("vit")
def vit(
    info: dict[str, Any],
    *,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    patch_size: int = 2,
    mlp_ratio: float = 2.0,
    num_classes: int | None = None,
    dropout: float = 0.0,
    attn_dropout: float = 0.0,
    seed: int | None = None,
    init_from: str | None = None,
    init_optional: bool = False,
) -> nn.Module:
    """A :class:`VisionTransformer` for the dataset's images.

    ``num_classes`` defaults to ``info["num_labels"]``; the image size and channels come from
    ``info["image_size"]`` (default 8) and ``info["num_channels"]`` (default 1).
    """
    if num_classes is None:
        num_classes = from_info(info, "num_labels", "vit")
    with init_rng(seed):
        return VisionTransformer(
            image_size=info.get("image_size", 8),
            patch_size=patch_size,
            num_channels=info.get("num_channels", 1),
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
        )
