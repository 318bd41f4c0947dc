"""A user's own teacher/student pair for the `own_pair` benchmark (MNIST-3k-own, issue 13's scenario).

Written as a user would, not as kdtune's zoo is: the teacher keeps its layers in a nested
``nn.ModuleDict`` of ``nn.ModuleList``s (no module runs a whole stage, so stage outputs are single
blocks ``body.low.1`` ...), the student is built of depthwise-separable units whose names
(``entry``, ``units.a`` ...) match nothing in the zoo. Stages are therefore found by
:func:`kdtune.capture.find_stage_outputs`, as for any model a user brings. Nothing here was tuned
to kdtune: the widths were fixed to hit the parameter budgets of the benchmark's brief.

A plugin module: ``plugins: [benchmarks.own_pair_models]`` in a config (found from the repository
root, the directory benchmarks/run.py runs kdtune in) registers ``own_teacher`` and ``own_sep_student``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

import kdtune


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution -> BatchNorm -> ReLU; (N, c_in, H, W) -> (N, c_out, H / stride, W / stride)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


@kdtune.register_model("own_teacher")
class OwnTeacher(nn.Module):
    """A plain CNN (~0.43 M parameters): 28x28 (32 ch) -> 14x14 (64 ch) -> 7x7 (128 ch), mean pool, linear.

    The blocks live in ``body["low"]`` / ``body["high"]`` (``nn.ModuleList``s) and ``forward`` loops
    over them, so neither container is ever called as a module.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.ModuleDict({
            "low": nn.ModuleList([conv_bn_relu(in_channels, 32), conv_bn_relu(32, 32), conv_bn_relu(32, 64, 2)]),
            "high": nn.ModuleList([conv_bn_relu(64, 64), conv_bn_relu(64, 128, 2), conv_bn_relu(128, 128),
                                   conv_bn_relu(128, 128)]),
        })
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for part in ("low", "high"):
            for block in self.body[part]:
                x = block(x)
        return self.classifier(x.mean((2, 3)))


class SepUnit(nn.Module):
    """Depthwise-separable unit (MobileNet v1): 3x3 per-channel conv (stride s) -> BN -> ReLU -> 1x1 -> BN -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.spatial = nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                                     nn.BatchNorm2d(c_in), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(self.spatial(x))


@kdtune.register_model("own_sep_student")
class OwnSepStudent(nn.Module):
    """A depthwise-separable student (~37 k parameters): a strided 3x3 entry (28x28 -> 14x14, 16 ch), then
    units at 14x14 (32 ch) -> 7x7 (64) -> 4x4 (128), mean pool, linear (MobileNet v1's layout, small)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.entry = conv_bn_relu(in_channels, 16, stride=2)
        self.units = nn.Sequential(OrderedDict([
            ("a", SepUnit(16, 32)), ("b", SepUnit(32, 64, 2)), ("c", SepUnit(64, 64)),
            ("d", SepUnit(64, 128, 2)), ("e", SepUnit(128, 128)),
        ]))
        self.out = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.units(self.entry(x)).mean((2, 3)))
