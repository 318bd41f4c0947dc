"""Building blocks shared by the zoo's families."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def init_conv_weights(model: nn.Module) -> None:
    """He-normal (fan-out, ReLU) init of every ``nn.Conv2d`` weight, in ``model.modules()`` order.

    The init of the CIFAR ResNet/WRN reference code; BatchNorm and Linear keep PyTorch's defaults.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def stage(block: Callable[[int, int, int], nn.Module], in_planes: int, planes: int, blocks: int,
          stride: int) -> nn.Sequential:
    """``blocks`` residual blocks: the first maps ``in_planes -> planes`` with ``stride``, the rest keep the shape."""
    return nn.Sequential(block(in_planes, planes, stride), *(block(planes, planes, 1) for _ in range(blocks - 1)))
