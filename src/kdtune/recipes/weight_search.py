"""The weight search (``search:``): fixed path weights v chosen on the validation split, then the
best retrained (Adaptive Distillation §3.3; :mod:`kdtune.search.weights`). Always resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdtune.config import RunConfig
from kdtune.recipes.base import Recipe, register_recipe
from kdtune.trainer import Callback


def search_weights(cfg: RunConfig, run_dir: Path, resume: bool,
                   callbacks: tuple[Callback, ...]) -> tuple[Path, dict[str, Any]]:
    from kdtune.search.weights import run_search  # optuna + sqlalchemy (~0.2 s): only for a search

    return run_search(cfg, run_dir, callbacks)  # the study continues whenever it exists: resume or not


WEIGHT_SEARCH = register_recipe(Recipe("weight_search", ("search",), search=search_weights))
