"""ShuffleNetV1 (Zhang et al. 2018) and ShuffleNetV2 (Ma et al. 2018) for small images.

Both follow the CIFAR variants of CRD (Tian et al. 2020): a 1x1 conv stem to 24 channels at
full resolution (no stride, no max pool), three stages that each halve the resolution in their
first unit (32 -> 16 -> 8 -> 4, or 28 -> 14 -> 7 -> 4), global average pooling and a linear
classifier.

* ShuffleNetV1, groups 3: stage widths 240/480/960 with 4/8/4 units.
* ShuffleNetV2 1x: stage widths 116/232/464 with 4/8/4 units (one down-sampling unit and
  3/7/3 basic units), then a 1x1 conv to 1024 channels.

ReLUs are not in-place so a forward hook on a BN (a pre-activation feature) keeps its
values instead of seeing them overwritten by the next ReLU.

Module paths: ``conv1, bn1, layer1, layer2, layer3, fc`` (V2 adds ``conv2, bn2``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdtune.models import MODELS
from kdtune.models.layers import init_conv_weights


class ChannelShuffle(nn.Module):
    """Interleave channel groups so the next grouped conv sees every group.

    (N, C, H, W) -> (N, g, C/g, H, W) -> transpose groups -> (N, C, H, W).
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# ----------------------------------------------------------------------------- ShuffleNetV1


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1, plus a shortcut (Fig. 2b/2c).

    With stride 2 the shortcut is a 3x3 average pool and is concatenated rather than added, so
    the unit outputs ``in_planes + planes`` channels; with stride 1 it outputs ``planes``.

    Args:
        in_planes: Input channels.
        planes: Channels produced by the residual branch.
        stride: 1 or 2.
        groups: Groups g of the pointwise convs.
        group_input: Whether the first pointwise conv is grouped; the paper leaves it dense in
            the very first unit, whose 24 input channels are too few to split.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, groups: int,
                 group_input: bool = True) -> None:
        super().__init__()
        mid = planes // 4
        g = groups if group_input else 1
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle(self.relu(self.bn1(self.conv1(x))))
        # CRD puts a ReLU after the depthwise conv as well; the paper's Fig. 2 does not.
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu(out)


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 for small images. Input (N, C, H, W) -> logits (N, num_classes).

    Args:
        widths: Output channels of the three stages, e.g. (240, 480, 960) for g=3.
        units: Units per stage, e.g. (4, 8, 4).
        groups: Groups g of the pointwise convs.
        in_channels: Input channels C.
        num_classes: Number of output logits.
    """

    def __init__(self, widths: tuple[int, int, int] = (240, 480, 960),
                 units: tuple[int, int, int] = (4, 8, 4), groups: int = 3,
                 in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(24, widths[0], units[0], groups, group_input=False)
        self.layer2 = self._stage(widths[0], widths[1], units[1], groups)
        self.layer3 = self._stage(widths[1], widths[2], units[2], groups)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        init_conv_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, units: int, groups: int,
               group_input: bool = True) -> nn.Sequential:
        # The first unit concatenates its pooled input, so its branch only adds the difference.
        layers = [ShuffleUnitV1(in_planes, planes - in_planes, 2, groups, group_input)]
        layers += [ShuffleUnitV1(planes, planes, 1, groups) for _ in range(units - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("shufflenetv1")
def shufflenetv1(in_channels: int = 3, num_classes: int = 10) -> ShuffleNetV1:
    """ShuffleNetV1 g=3, widths 240/480/960 (Zhang et al. 2018; CRD's CIFAR variant)."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, in_channels, num_classes)


# ----------------------------------------------------------------------------- ShuffleNetV2


class ShuffleUnitV2(nn.Module):
    """Channel split: half passes through, half goes 1x1 -> 3x3 depthwise -> 1x1 (Fig. 3c).

    The halves are concatenated and shuffled. Input and output: (N, planes, H, W).
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        half = planes // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        keep, branch = x.chunk(2, dim=1)
        out = self.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))  # no ReLU after the depthwise conv (paper, Fig. 3)
        out = self.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([keep, out], 1))


class DownUnitV2(nn.Module):
    """Stride-2 unit without a split: both branches see the whole input (Fig. 3d).

    Left: 3x3 depthwise (stride 2) -> 1x1. Right: 1x1 -> 3x3 depthwise (stride 2) -> 1x1.
    (N, in_planes, H, W) -> (N, planes, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        mid = planes // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_planes, in_planes, 3, 2, 1, groups=in_planes, bias=False),
            nn.BatchNorm2d(in_planes),
            nn.Conv2d(in_planes, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
        )
        self.right = nn.Sequential(
            nn.Conv2d(in_planes, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 for small images. Input (N, C, H, W) -> logits (N, num_classes).

    Args:
        widths: Output channels of the three stages and of the last 1x1 conv,
            e.g. (116, 232, 464, 1024) for the 1x model.
        units: Basic (non-down-sampling) units per stage, e.g. (3, 7, 3).
        in_channels: Input channels C.
        num_classes: Number of output logits.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
                 units: tuple[int, int, int] = (3, 7, 3), in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(24, widths[0], units[0])
        self.layer2 = self._stage(widths[0], widths[1], units[1])
        self.layer3 = self._stage(widths[1], widths[2], units[2])
        self.conv2 = nn.Conv2d(widths[2], widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, units: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownUnitV2(in_planes, planes)]
        layers += [ShuffleUnitV2(planes) for _ in range(units)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("shufflenetv2")
def shufflenetv2(in_channels: int = 3, num_classes: int = 10) -> ShuffleNetV2:
    """ShuffleNetV2 1x, widths 116/232/464, 1024 final (Ma et al. 2018; CRD's CIFAR variant)."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), in_channels, num_classes)
