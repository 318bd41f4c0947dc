"""Teacher-free self-distillation (``selfdistill:``): exits, and MetaDistiller's label generator,
on the student (:mod:`kdtune.selfdistill`)."""

from __future__ import annotations

from kdtune.build import Splits, build_model
from kdtune.config import RunConfig
from kdtune.recipes.base import Recipe, register_recipe
from kdtune.selfdistill import SelfDistiller, from_config
from kdtune.trainer import Callback


def build_self_distiller(cfg: RunConfig, splits: Splits,
                         input_shape: tuple[int, ...]) -> tuple[SelfDistiller, list[Callback]]:
    """The config's student wrapped in its exits, and (``md``) the meta-step callback."""
    student = build_model(cfg.student, splits.train.in_channels, splits.train.num_classes)
    return from_config(cfg, student, splits.train, input_shape)


SELFDISTILL = register_recipe(Recipe("selfdistill", ("selfdistill",), build=build_self_distiller))
