"""CIFAR VGG with batch norm (Simonyan & Zisserman 2015), as used in CRD (Tian et al. 2020).

Five blocks of 3x3 conv-BN-ReLU layers (widths 64/128/256/512/512) and a single linear
classifier on globally average-pooled features; the large fully connected head of the ImageNet
VGG is dropped. VGG-8 has one conv per block, VGG-13 two.

Pooling: like CRD's 32x32 models, there is a 2x2 max pool after blocks 0, 1 and 2 only, so
blocks 3 and 4 share one resolution, and a global average pool ends the network. The max pools
use ``ceil_mode=True`` so a 28x28 input gives 28 -> 14 -> 7 -> 4, the same 4x4 maps as a
32x32 input (32 -> 16 -> 8 -> 4); a fourth pool is omitted because at 28x28 a stack of floor
pools would shrink the maps to 1x1 and a fifth to 0.

ReLUs are not in-place so a forward hook on a BN (a pre-activation feature) keeps its
values instead of seeing them overwritten by the next ReLU.

Module paths: ``block0 .. block4`` (each ends with its ReLU; its last BN, e.g. ``block1.1`` in VGG-8,
gives the pre-activation), ``pool0 .. pool2``, ``pool``, ``fc``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdtune.models import MODELS
from kdtune.models.layers import init_conv_weights

#: Conv widths per block (CRD's cfg "S", "A", "B", "D", "E").
CONFIGS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(in_planes: int, widths: list[int]) -> nn.Sequential:
    """A stack of conv3x3-BN-ReLU layers with the given output widths."""
    layers: list[nn.Module] = []
    for width in widths:
        # No conv bias: the following BN has its own shift.
        layers += [nn.Conv2d(in_planes, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        in_planes = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-BN for small images. Input (N, C, H, W) -> logits (N, num_classes).

    Args:
        cfg: Conv widths for the five blocks, e.g. ``CONFIGS[8]``.
        in_channels: Input channels C.
        num_classes: Number of output logits.
    """

    def __init__(self, cfg: list[list[int]], in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if len(cfg) != 5:
            raise ValueError(f"VGG needs widths for 5 blocks, got {len(cfg)}")
        self.block0 = _block(in_channels, cfg[0])
        self.pool0 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.block1 = _block(cfg[0][-1], cfg[1])
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.block2 = _block(cfg[1][-1], cfg[2])
        self.pool2 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.block3 = _block(cfg[2][-1], cfg[3])
        self.block4 = _block(cfg[3][-1], cfg[4])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg[4][-1], num_classes)
        init_conv_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.fc(self.pool(x).flatten(1))


def _register(depth: int) -> None:
    def build(in_channels: int = 3, num_classes: int = 10) -> VGG:
        return VGG(CONFIGS[depth], in_channels, num_classes)

    build.__doc__ = f"CIFAR VGG-{depth} with batch norm (Simonyan & Zisserman 2015; CRD variant)."
    MODELS.register(f"vgg{depth}")(build)


for _depth in CONFIGS:
    _register(_depth)
