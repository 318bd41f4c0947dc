"""A small Vision Transformer (Dosovitskiy et al. 2021) for 28x28 and 32x32 images, patch 4.

Patches of 4x4 pixels are embedded by a strided conv (7x7 = 49 tokens at 28x28, 8x8 = 64 at
32x32), a class token is prepended, learned position embeddings are added (stored for an 8x8 grid
and bilinearly resized to the input's grid), then ``depth`` pre-norm blocks
``x + MHSA(LN(x))``, ``x + MLP(LN(x))`` and a linear head on the final-LayerNorm'd class token.
Each block returns one (N, L, D) tensor, so ``blocks.<i>`` are capture paths and the stages
found automatically (:func:`kdtune.capture.find_stage_outputs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models import MODELS


class Block(nn.Module):
    """Pre-norm transformer block: (N, L, D) -> (N, L, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT with a class token; input (N, C, H, W) with H, W multiples of ``patch``.

    Args:
        dim: token width D; depth: number of blocks; heads: attention heads;
        mlp_ratio: MLP hidden width / D; patch: patch size; grid: side of the stored position grid.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, dim: int = 64, depth: int = 6, heads: int = 4,
                 mlp_ratio: float = 2.0, patch: int = 4, grid: int = 8) -> None:
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, dim, grid, grid) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, 1 + HW/patch^2, D): class token, then patch tokens row by row."""
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"ViT: input {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch}")
        f = self.patch_embed(x)  # (N, D, h, w)
        pos = self.pos_embed
        if pos.shape[-2:] != f.shape[-2:]:
            pos = F.interpolate(pos, size=f.shape[-2:], mode="bilinear", align_corners=False)
        t = (f + pos).flatten(2).transpose(1, 2)  # (N, hw, D)
        return torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.tokens(x)))[:, 0])


@MODELS.register("vit_tiny")
def vit_tiny(in_channels: int = 3, num_classes: int = 10, **kwargs) -> ViT:
    """ViT, patch 4, D=64, 6 blocks, 4 heads, MLP x2 (0.2 M parameters); 28x28 and 32x32 inputs."""
    return ViT(in_channels, num_classes, **{"dim": 64, "depth": 6, "heads": 4, **kwargs})
