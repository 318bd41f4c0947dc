"""CIFAR-style ResNets (He et al. 2016, §4.2): ResNet-{8,14,20,32,56,110} and the wide 8x4/32x4.

Depth 6n+2: a 3x3 stem, three stages of n BasicBlocks (widths 16/32/64, stride 1/2/2), global
average pooling and a linear classifier. The x4 variants (CRD, Tian et al. 2020) use widths
32/64/128/256. Shortcuts that change shape use a 1x1 conv + BN (option B).
Module paths: ``conv1, bn1, layer1, layer2, layer3, fc``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdtune.models import MODELS
from kdtune.models.layers import init_conv_weights, stage


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: relu(F(x) + shortcut(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images. Input (N, C, H, W) -> logits (N, num_classes)."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int] = (16, 16, 32, 64),
                 in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = stage(BasicBlock, widths[0], widths[1], n, 1)
        self.layer2 = stage(BasicBlock, widths[1], widths[2], n, 2)
        self.layer3 = stage(BasicBlock, widths[2], widths[3], n, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _register(depth: int, widths: tuple[int, int, int, int], suffix: str = "") -> None:
    name = f"resnet{depth}{suffix}"

    def build(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
        return CifarResNet(depth, widths, in_channels, num_classes)

    build.__doc__ = f"CIFAR ResNet-{depth}{suffix} (widths {widths[1:]}; He et al. 2016)."
    MODELS.register(name)(build)


for _depth in (8, 14, 20, 32, 56, 110):
    _register(_depth, (16, 16, 32, 64))
for _depth in (8, 32):
    _register(_depth, (32, 64, 128, 256), "x4")
