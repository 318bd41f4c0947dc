"""Recipes: how ``kdtune run`` carries out each method, one module per method.

A :class:`Recipe` names the config sections that ask for it and either builds the method's
distiller for one training run (``build``) or drives its own runs (``search``). A config asks for
at most one recipe (:func:`select_recipe`); one asking for none runs the default, plain
distillation. The built-in recipes:

======================  =========================================  ===================================
recipe                  asked for by                               method
======================  =========================================  ===================================
``distill``             (no section below)                         KD, feature pathways, student alone
``selfdistill``         ``selfdistill:``                           DSN / SD / MetaDistiller exits
``distpro``             ``distpro:``, ``distill.weighting.name:    DistPro search / process replay
                        process``
``weight_search``       ``search:``                                Adaptive Distillation's v search
``autokd``              ``autokd:``                                Auto-KD search / spec run
======================  =========================================  ===================================

A new method adds a module here that calls :func:`register_recipe`, and builds its runs from
:mod:`kdtune.build`.
"""

from __future__ import annotations

from kdtune.recipes import autokd, distill, distpro, selfdistill, weight_search  # noqa: F401 (they register)
from kdtune.recipes.base import RECIPES, Recipe, prepare, register_recipe, select_recipe, train

__all__ = ["RECIPES", "Recipe", "prepare", "register_recipe", "select_recipe", "train"]
