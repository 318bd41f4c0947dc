"""MobileNetV2 (Sandler et al. 2018) for small images, after the CRD variant (Tian et al. 2020).

A 3x3 conv stem, seven stages of inverted residual blocks (1x1 expand, 3x3 depthwise, linear
1x1 project; identity shortcut when the shape is kept), a 1x1 conv to 1280 channels, global
average pooling and a linear classifier. ``mobilenetv2`` is CRD's "MobileNetV2" student
(``mobile_half``): width multiplier 0.5 and expansion 6, the last conv kept at 1280 channels.

CIFAR strides: the stem has stride 1 (ImageNet: 2) and the 24-channel stage stride 1
(ImageNet: 2), so the total stride is 8 and a 32x32 (28x28) input ends at 4x4. CRD itself
keeps the stem at stride 2 (total stride 16); pass ``stem_stride=2`` to :class:`MobileNetV2`
for that cheaper variant, which has the same parameters.

As in CRD, every block has its expansion conv, including the t=1 block of the first stage.
ReLUs are not in-place so a forward hook on a BN (a pre-activation feature) keeps its
values instead of seeing them overwritten by the next ReLU.

Module paths: ``conv1``, ``blocks.0 .. blocks.6`` (the seven stages; CRD's features are taken
after ``blocks.1``, ``blocks.2``, ``blocks.4`` and ``blocks.6``), ``conv2``, ``pool``, ``fc``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdtune.models import MODELS
from kdtune.models.layers import init_conv_weights

#: Inverted residual stages: (expansion t, output channels c, blocks n, first stride s).
#: The expansion of stages 2..7 is replaced by the model's ``expansion``.
SETTINGS: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _conv_bn_relu(in_planes: int, planes: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(planes),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, plus x when shapes allow.

    The projection has no ReLU: the paper argues a ReLU in the narrow bottleneck destroys
    information (Sandler et al. 2018, §3.2).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.use_residual = stride == 1 and in_planes == planes
        self.conv = nn.Sequential(
            _conv_bn_relu(in_planes, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images. Input (N, C, H, W) -> logits (N, num_classes).

    Args:
        width: Width multiplier applied to the stem and every stage (CRD: ``int(c * width)``).
        expansion: Expansion ratio t of stages 2..7 (the first stage always uses 1).
        in_channels: Input channels C.
        num_classes: Number of output logits.
        stem_stride: Stride of the first conv (1 for 32x32 inputs; CRD uses 2).
    """

    def __init__(self, width: float = 1.0, expansion: int = 6, in_channels: int = 3,
                 num_classes: int = 10, stem_stride: int = 1) -> None:
        super().__init__()
        planes = int(32 * width)
        self.conv1 = _conv_bn_relu(in_channels, planes, 3, stem_stride)
        stages: list[nn.Module] = []
        for i, (t, c, n, s) in enumerate(SETTINGS):
            out_planes = int(c * width)
            expand = t if i == 0 else expansion  # only the first stage keeps its own t (1)
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(planes, out_planes, s if j == 0 else 1, expand))
                planes = out_planes
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        # Only widths above 1 widen the last conv, so small students keep a 1280-d embedding.
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(planes, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        init_conv_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv2(self.blocks(self.conv1(x)))
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("mobilenetv2")
def mobilenetv2(in_channels: int = 3, num_classes: int = 10) -> MobileNetV2:
    """MobileNetV2 x0.5 for 32x32 inputs (Sandler et al. 2018; CRD's student)."""
    return MobileNetV2(0.5, 6, in_channels, num_classes)


@MODELS.register("mobilenetv2_1_0")
def mobilenetv2_1_0(in_channels: int = 3, num_classes: int = 10) -> MobileNetV2:
    """MobileNetV2 x1.0 for 32x32 inputs (Sandler et al. 2018)."""
    return MobileNetV2(1.0, 6, in_channels, num_classes)
