"""Classifier heads on intermediate feature maps: the exits of a self-distilled network.

An exit turns an early stage's feature map into class logits, as in "Be Your Own Teacher"
(Zhang et al. 2019), which MetaDistiller (Liu et al. 2020, §3.2 and §4.2) follows: a *bottleneck*
brings the map down to the last stage's resolution and channel count, then global average
pooling and a linear layer give the logits. The label generator (eq. 5) reuses the same head on
its fused maps to produce the soft targets T_k (§3.3: "an additional bottleneck module, which is
also employed to produce the intermediate outputs").
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ExitHead", "halvings"]


def halvings(size: Sequence[int], target: Sequence[int]) -> int:
    """How many stride-2 3x3 convolutions (padding 1) bring ``size`` down to ``target`` or below.

    A stride-2 3x3 convolution with padding 1 maps a side ``h`` to ``ceil(h / 2)``, so 28 -> 14 -> 7
    and 7 -> 4 -> 2 -> 1; a side already at or below its target needs none.

    Args:
        size: (H, W) of the input map.
        target: (H_K, W_K) of the last stage's map.
    """
    h, w = int(size[0]), int(size[1])
    n = 0
    while h > target[0] or w > target[1]:
        h, w = -(-h // 2), -(-w // 2)
        n += 1
    return n


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ExitHead(nn.Module):
    """Bottleneck + global average pooling + linear: a feature map (N, C_k, H_k, W_k) -> logits (N, classes).

    The bottleneck is ``conv1x1(C_k -> m)``, then one ``conv3x3 stride 2 (m -> m)`` per halving needed
    to reach the last stage's resolution (H_K, W_K), then ``conv1x1(m -> C_K)``, each followed by
    BatchNorm and ReLU, with ``m = max(1, C_K // 4)`` (the bottleneck width of "Be Your Own Teacher").
    A map already at the last resolution gets only the two 1x1 convolutions.

    Args:
        in_channels: C_k of the input map.
        in_size: (H_k, W_k) of the input map.
        out_channels: C_K, channels of the last stage's map.
        out_size: (H_K, W_K) of the last stage's map.
        num_classes: number of logits.
    """

    def __init__(self, in_channels: int, in_size: Sequence[int], out_channels: int, out_size: Sequence[int],
                 num_classes: int) -> None:
        super().__init__()
        mid = max(1, out_channels // 4)
        layers = [_conv_bn_relu(in_channels, mid, 1, 1)]
        layers += [_conv_bn_relu(mid, mid, 3, 2) for _ in range(halvings(in_size, out_size))]
        layers.append(_conv_bn_relu(mid, out_channels, 1, 1))
        self.bottleneck = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_channels, num_classes)

    def forward(self, feature: Tensor) -> Tensor:
        """(N, C_k, H_k, W_k) -> (N, num_classes)."""
        return self.fc(self.pool(self.bottleneck(feature)).flatten(1))
