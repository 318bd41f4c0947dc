"""DistPro (``distpro:``): search a weight process over stage pathways x transforms; or replay a
searched one (``distill.weighting.name: process``) (:mod:`kdtune.search.distpro`)."""

from __future__ import annotations

from kdtune.recipes.base import Recipe, register_recipe
from kdtune.search.distpro import from_config

DISTPRO = register_recipe(Recipe("distpro", ("distpro", "distill.weighting.name=process"), build=from_config))
