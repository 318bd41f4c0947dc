"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016): WRN-16-1/16-2/40-1/40-2.

Pre-activation blocks, (d-4)/6 per group, widths 16k/32k/64k, strides 1/2/2, no dropout.
Module paths: ``conv1, block1, block2, block3, bn, fc``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdtune.models import MODELS
from kdtune.models.layers import init_conv_weights, stage


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1 shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        # The projection shortcut sees the pre-activated input, as in the reference WRN.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k. Input (N, C, H, W) -> logits (N, num_classes)."""

    def __init__(self, depth: int, k: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = stage(WideBlock, widths[0], widths[1], n, 1)
        self.block2 = stage(WideBlock, widths[1], widths[2], n, 2)
        self.block3 = stage(WideBlock, widths[2], widths[3], n, 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))


def _register(depth: int, k: int) -> None:
    def build(in_channels: int = 3, num_classes: int = 10) -> WideResNet:
        return WideResNet(depth, k, in_channels, num_classes)

    build.__doc__ = f"Wide ResNet WRN-{depth}-{k} (Zagoruyko & Komodakis 2016)."
    MODELS.register(f"wrn_{depth}_{k}")(build)


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _k)
