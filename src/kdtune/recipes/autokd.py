"""Auto-KD (``autokd:``): search a distiller design by MCTS (:mod:`kdtune.search.autokd`), or, with
``autokd.spec``, train with a found design as the plain config it stands for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdtune.config import RunConfig
from kdtune.recipes.base import Recipe, register_recipe, select_recipe
from kdtune.trainer import Callback


def autokd(cfg: RunConfig, run_dir: Path, resume: bool,
           callbacks: tuple[Callback, ...]) -> tuple[Path, dict[str, Any]]:
    from kdtune.search.autokd import run_autokd, spec_config  # optuna + sqlalchemy (~0.2 s): only for Auto-KD

    assert cfg.autokd is not None
    if cfg.autokd.spec is None:
        return run_autokd(cfg, run_dir, callbacks)
    cfg = spec_config(cfg)  # a plain config; its saved config.yaml resumes without the spec file
    return select_recipe(cfg).run(cfg, run_dir, resume, callbacks)


AUTOKD = register_recipe(Recipe("autokd", ("autokd",), search=autokd))
