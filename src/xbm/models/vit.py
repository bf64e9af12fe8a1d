"""A small Vision Transformer in plain torch.

Every matrix multiply is an explicit ``nn.Linear`` (``qkv``, ``proj``, ``fc1``, ``fc2``) rather
than ``nn.MultiheadAttention``'s fused parameters, because crossbar mapping works layer by layer
on ``nn.Linear``/``nn.Conv2d`` weights. The classifier is a top-level ``fc`` like the CNNs, so the
multi-task wrapper can swap it the same way. No BatchNorm: LayerNorm is the transformer standard.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xbm.errors import ConfigError
from xbm.models.registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention with separate qkv and output projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer GELU feed-forward."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (pre-norm trains stably without warm-up tricks at small scale)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding -> [cls] + position embedding -> blocks -> LayerNorm -> ``fc`` on [cls].

    The position embedding is sized for ``img_size``; other input sizes are served by
    interpolating it, so the same backbone runs on 28x28 and 32x32 datasets.
    """

    head_name = "fc"

    def __init__(self, num_classes: int, in_channels: int, width: int, depth: int, heads: int,
                 patch_size: int, img_size: int, mlp_ratio: float) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"vit: width {width} must be divisible by its {heads} attention "
                              f"heads; pick a multiple of {heads} (--width "
                              f"{max(heads, width - width % heads)})")
        if img_size % patch_size:
            raise ConfigError(f"vit: img_size {img_size} must be divisible by patch_size "
                              f"{patch_size}")
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size,
                                     stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, width))
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.feature_dim = width
        self.fc = nn.Linear(width, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:  # no values to draw (and a draw on the meta device imports
            return  # TorchDynamo, a second or two per `xbm map`)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, d)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised [cls] token, i.e. the input of ``fc``."""
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self._pos_embed_for(h, w))
        return self.norm(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@register_model("vit_tiny")
def vit_tiny(num_classes: int = 10, in_channels: int = 1, width: int = 64, depth: int = 4,
             heads: int = 4, patch_size: int = 4, img_size: int = 28,
             mlp_ratio: float = 4.0) -> VisionTransformer:
    """Small ViT for 28x28 inputs: patch 4, width (embed dim) 64, depth 4, 4 heads."""
    if min(depth, heads, patch_size, img_size) < 1 or not (0 < mlp_ratio < math.inf):
        raise ConfigError("vit_tiny: depth, heads, patch_size, img_size and mlp_ratio must be "
                          "positive")
    return VisionTransformer(num_classes, in_channels, width, depth, heads, patch_size, img_size,
                             mlp_ratio)
