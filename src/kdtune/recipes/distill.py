"""Plain distillation — the config's teacher, logit losses and pathways, or the student alone
without a teacher: the default recipe, for a config that asks for no other method."""

from __future__ import annotations

from kdtune.build import plain_distiller
from kdtune.recipes.base import Recipe, register_recipe

DISTILL = register_recipe(Recipe("distill", build=plain_distiller))
