"""A user's own teacher and student. Nothing here knows kdtune except the decorator that names them.

kdtune builds a registered model with ``in_channels`` and ``num_classes`` if its constructor takes
them, plus the config's ``kwargs``. Importing this module (``kdtune run --plugin my_models`` or
``plugins: [my_models]`` in the YAML) registers both names.
"""

from torch import nn

import kdtune


def conv_bn(c_in: int, c_out: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


@kdtune.register_model("wide_teacher")
class WideTeacher(nn.Module):
    """A plain wide CNN: two stages (28x28 -> 14x14 -> 7x7), global pooling, a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(conv_bn(in_channels, width), conv_bn(width, width, stride=2))
        self.stage2 = nn.Sequential(conv_bn(width, 2 * width), conv_bn(2 * width, 2 * width, stride=2))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.stage2(self.stage1(x)).mean((2, 3)))


@kdtune.register_model("sep_student")
class SepStudent(nn.Module):
    """A small student of depthwise-separable blocks (3x3 per channel, then 1x1 across channels)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, width)
        self.block1 = nn.Sequential(conv_bn(width, width, stride=2, groups=width), conv_bn(width, width, kernel=1))
        self.block2 = nn.Sequential(conv_bn(width, width, stride=2, groups=width), conv_bn(width, 2 * width, kernel=1))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))).mean((2, 3)))
