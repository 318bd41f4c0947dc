"""A small CIFAR-style model zoo (the families of the four papers' tables).

``create_model(name, in_channels, num_classes)`` builds any registered model; ``list_models()``
names them. Every model works on 28x28 (Fashion-MNIST) and 32x32 (CIFAR) inputs and exposes
its stages as plain submodules, so capture paths like ``"layer2"`` work without edits.
"""

from __future__ import annotations

from torch import nn

from kdtune.registry import Registry

MODELS: Registry = Registry("model")


def create_model(name: str, in_channels: int = 3, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet8", in_channels=1, num_classes=10)``."""
    return MODELS.get(name)(in_channels=in_channels, num_classes=num_classes, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()


# Importing the family modules registers their models.
from kdtune.models import mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: E402,F401
