"""MetaDistiller's top-down label generator (Liu et al. 2020, §3.3, eq. 5).

The generator fuses the stage feature maps F_1 .. F_K of the main model from the deepest one
upwards, like a feature pyramid, and reads a soft target T_k for every early stage off the fused
map::

    F̂_K = conv1x1(F_K)
    F̂_k = conv3x3( Up(F̂_{k+1}) + conv1x1(F_k) )          k = K-1, ..., 1      (eq. 5)
    T_k = head_k(F̂_k)                                     (bottleneck + pool + linear, §3.3)

``Up`` is bilinear interpolation to F_k's spatial size (the paper's "UpSampling x2", which is
exactly x2 when each stage halves the resolution). The paper discusses supervising F_k with F̂_k
by an L2 distance (and rejects it), so F̂_k has F_k's shape: the lateral 1x1 convolution maps
C_k to C_{k+1} channels, so that it can be added to the up-sampled F̂_{k+1}, and the 3x3
convolution maps C_{k+1} back to C_k. Its parameters θ_g are trained only by the meta-gradient
(eq. 8), never by the main model's loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.selfdistill.heads import ExitHead

__all__ = ["TopDownLabelGenerator"]


class TopDownLabelGenerator(nn.Module):
    """Soft-target logits for stages 1..K-1 from the stage features F_1..F_K (eq. 5).

    Args:
        channels: (C_1, ..., C_K), channels of the stage maps, from the input side.
        sizes: ((H_1, W_1), ..., (H_K, W_K)), their spatial sizes.
        num_classes: number of logits of each target.

    Shapes:
        forward(features): K maps (N, C_k, H_k, W_k) -> K-1 logits (N, num_classes), one per early
        stage, shallowest first. The caller turns them into T_k = softmax(logits / tau) (eq. 2).

    BatchNorm in the heads uses batch statistics only (no running statistics): the generator is
    used in training mode only and abandoned at inference (§3.5).
    """

    def __init__(self, channels: Sequence[int], sizes: Sequence[Sequence[int]], num_classes: int) -> None:
        super().__init__()
        k = len(channels)
        if k < 2 or len(sizes) != k:
            raise ValueError(f"the label generator needs K >= 2 stages with one size each, got channels {channels} "
                             f"and sizes {sizes}")
        self.channels = [int(c) for c in channels]
        # lateral[k]: conv1x1 on F_k; to C_{k+1} channels (to add it to Up(F̂_{k+1})), C_K for the last.
        out = [*self.channels[1:], self.channels[-1]]
        self.lateral = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip(self.channels, out, strict=True))
        # refine[k]: conv3x3 C_{k+1} -> C_k, so F̂_k has F_k's shape (k < K).
        self.refine = nn.ModuleList(nn.Conv2d(self.channels[i + 1], self.channels[i], 3, padding=1)
                                    for i in range(k - 1))
        self.heads = nn.ModuleList(
            ExitHead(self.channels[i], sizes[i], self.channels[-1], sizes[-1], num_classes, track_running_stats=False)
            for i in range(k - 1))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """K stage maps, shallowest first -> K-1 target logits (N, num_classes), shallowest first."""
        if len(features) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} stage features, got {len(features)}")
        fused = self.lateral[-1](features[-1])  # F̂_K = conv1x1(F_K)
        logits: list[Tensor] = []
        for i in reversed(range(len(features) - 1)):
            f = features[i]
            up = F.interpolate(fused, size=f.shape[-2:], mode="bilinear", align_corners=False)
            fused = self.refine[i](up + self.lateral[i](f))  # eq. 5
            logits.append(self.heads[i](fused))
        return logits[::-1]
