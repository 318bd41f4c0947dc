"""From a :class:`~kdtune.config.RunConfig` to a trained student: ``kdtune run``.

:func:`run` creates (or continues) the run directory, holds its lock and hands the config to the
recipe of its method (:mod:`kdtune.recipes`), which builds its runs from :mod:`kdtune.build`.
Python users can call :func:`run` with a config object, or build the pieces themselves
(``Distiller`` + ``Trainer``) with their own models.
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

from kdtune.build import (
    Splits,
    build_distiller,
    build_model,
    calibrate_run,
    load_splits,
    overrides_for_unrecorded_keys,
    seed_everything,
    teacher_key,
)
from kdtune.config import RunConfig, load_config, load_raw
from kdtune.distributed import init_distributed
from kdtune.errors import RunDirError
from kdtune.plugins import import_plugins
from kdtune.recipes import prepare, select_recipe
from kdtune.rundir import create_run_dir, remove_if_unused, run_lock
from kdtune.trainer import Callback

# Re-exported: the builders lived here before kdtune.build, and users import them from here.
__all__ = ["Splits", "build_distiller", "build_model", "calibrate_run", "load_splits", "new_run_dir", "prepare",
           "resume_run", "run", "seed_everything", "teacher_key"]


def new_run_dir(cfg: RunConfig) -> Path:
    """Create ``<output_dir>/<name>-s<seed>-<timestamp>`` exclusively (a suffix if it is taken):
    two runs started in the same second never share a directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return create_run_dir(Path(cfg.output_dir) / f"{cfg.name}-s{cfg.seed}-{stamp}")


def _shared_run_dir(cfg: RunConfig) -> Path:
    """A new run directory, created once by rank 0 under torchrun so every rank uses the same one
    (the timestamp could differ between processes)."""
    info = init_distributed()
    name = [str(new_run_dir(cfg)) if info.is_main else ""]
    if info.enabled:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def run(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False,
        callbacks: tuple[Callback, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Train a config in a run directory (new, or an existing one with ``resume=True``).

    Returns the run directory and the summary dict. The config's recipe carries it out
    (:func:`kdtune.recipes.select_recipe`): one training run, or a search (``search``, ``autokd``:
    always resumable) with its own trial runs.
    """
    import_plugins(cfg.plugins)  # the user's models must be registered before any name is looked up
    recipe = select_recipe(cfg)  # a config asking for two methods fails before a run directory is made
    path = Path(run_dir) if run_dir is not None else _shared_run_dir(cfg)
    info = init_distributed()
    if info.is_main:
        if run_dir is None:  # a name the caller does not know yet: say it now, so a crash still says where to look
            print(f"run directory: {path}", flush=True)
        path.mkdir(parents=True, exist_ok=True)  # a directory the caller chose (new_run_dir made its own)
    # One process trains in a directory at a time (ranks of one torchrun job share rank 0's lock).
    try:
        with run_lock(path) if info.is_main else nullcontext():
            return recipe.run(cfg, path, resume, callbacks)
    except BaseException:
        if run_dir is None and info.is_main:
            remove_if_unused(path)  # a run refused on bad input leaves no empty directory behind
        raise


def resume_run(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Continue an interrupted run from its saved config and last checkpoint
    (:func:`kdtune.recipes.base._has_checkpoint` says when a run without one starts over)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"--resume {run_dir}: no such directory (give a run directory, e.g. runs/<name>-s0-<time>)")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise RunDirError(f"--resume {run_dir}: no config.yaml in it, so it is not a kdtune run directory")
    # a run saved before a key existed resumes with the value it ran with, not the key's default now
    return run(load_config(cfg_path, overrides_for_unrecorded_keys(load_raw(cfg_path))), run_dir, resume=True)
