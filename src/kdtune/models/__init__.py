"""A small CIFAR-style model zoo (the families of the four papers' tables).

``create_model(name, in_channels, num_classes)`` builds any registered model; ``list_models()``
names them. Every model works on 28x28 (Fashion-MNIST) and 32x32 (CIFAR) inputs and exposes
its stages as plain submodules, so capture paths like ``"layer2"`` work without edits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from kdtune.registry import Registry

T = TypeVar("T")

MODELS: Registry = Registry("model")


def register_model(name: str | None = None) -> Callable[[T], T]:
    """Decorator registering a model constructor (a class or function) under ``name``, e.g.
    ``@kdtune.register_model("sep_student")``. It is called with ``in_channels`` and
    ``num_classes`` if it takes them, plus the config's ``kwargs``."""
    return MODELS.register(name)


def create_model(name: str, in_channels: int = 3, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet8", in_channels=1, num_classes=10)``,
    or a user's constructor named ``"module:callable"`` (the module is imported).

    ``in_channels`` / ``num_classes`` are passed only to constructors that take them (or ``**kwargs``).
    """
    if ":" in name:
        from kdtune.plugins import resolve_callable

        build = resolve_callable(name)
    else:
        build = MODELS.get(name)
    model = build(**_accepted(build, {"in_channels": in_channels, "num_classes": num_classes}), **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} built a {type(model).__name__}, not an nn.Module")
    return model


def _accepted(build: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``offered`` that ``build`` takes by name."""
    try:
        params = inspect.signature(build).parameters
    except (TypeError, ValueError):  # a builtin without a signature: offer everything
        return offered
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return offered
    return {k: v for k, v in offered.items() if k in params}


def list_models() -> list[str]:
    return MODELS.names()


# Importing the family modules registers their models.
from kdtune.models import mobilenetv2, resnet, shufflenet, vgg, vit, wrn  # noqa: E402,F401
