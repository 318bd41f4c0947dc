"""The recipe registry: which method carries out a run config, chosen by the sections the config sets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdtune.build import DistillerBuilder, make_trainer, pin_method_defaults, restore_unrecorded_defaults
from kdtune.config import ConfigError, RunConfig, save_config
from kdtune.errors import RunDirError
from kdtune.trainer import Callback, Trainer

#: A recipe that drives its own runs (a search): (config, run directory, resume, callbacks) ->
#: (run directory, summary).
RunFunction = Callable[[RunConfig, Path, bool, tuple[Callback, ...]], tuple[Path, dict[str, Any]]]


@dataclass(frozen=True)
class Recipe:
    """How ``kdtune run`` carries out one method.

    Args:
        name: the recipe's name in messages.
        sections: what in a config asks for this recipe: a section (``"search"``: the section is set)
            or a setting (``"distill.weighting.name=process"``). Empty: the default recipe, for a
            config that asks for none.
        build: the method's distiller and callbacks, trained as one run by the shared trainer
            (plain distillation, self-distillation, DistPro); or
        search: a recipe that drives its own runs (the weight search, Auto-KD).
    """

    name: str
    sections: tuple[str, ...] = ()
    build: DistillerBuilder | None = None
    search: RunFunction | None = None

    def __post_init__(self) -> None:
        if (self.build is None) == (self.search is None):
            raise ValueError(f"recipe {self.name!r} needs exactly one of build= (one training run) or search=")

    def selected_by(self, cfg: RunConfig) -> list[str]:
        """The entries of :attr:`sections` that ``cfg`` sets."""
        return [s for s in self.sections if _is_set(cfg, s)]

    def run(self, cfg: RunConfig, run_dir: Path, resume: bool = False,
            callbacks: tuple[Callback, ...] = ()) -> tuple[Path, dict[str, Any]]:
        """Carry out ``cfg`` in ``run_dir`` (which exists; the caller holds its lock)."""
        if self.search is not None:
            return self.search(cfg, run_dir, resume, callbacks)
        assert self.build is not None
        return train(cfg, run_dir, self.build, resume, callbacks)


def _is_set(cfg: RunConfig, section: str) -> bool:
    """Whether ``cfg`` sets ``section`` (``"autokd"``: not None) or has ``setting=value``
    (``"autokd.spec"`` is not set in a config without ``autokd``)."""
    path, _, value = section.partition("=")
    obj: Any = cfg
    for key in path.split("."):
        if obj is None:
            return False
        obj = getattr(obj, key)
    return obj is not None if not value else str(obj) == value


#: Registered recipes by name (:func:`register_recipe`).
RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe; a config setting one of its sections (and no other recipe's) runs it."""
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    if not recipe.sections and any(not r.sections for r in RECIPES.values()):
        raise ValueError(f"recipe {recipe.name!r} has no sections, and a default recipe is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


def select_recipe(cfg: RunConfig) -> Recipe:
    """The one recipe ``cfg`` asks for (by its sections), else the default recipe.

    Raises:
        ConfigError: the config asks for two recipes or more (one run carries out one method), or
            for none and no default recipe is registered; the message names the sections.
    """
    chosen = {name: r.selected_by(cfg) for name, r in RECIPES.items() if r.selected_by(cfg)}
    if len(chosen) > 1:
        asked = "; ".join(f"{name} by {', '.join(sections)}" for name, sections in chosen.items())
        raise ConfigError(f"the config asks for {len(chosen)} methods at once ({asked}); a run carries out one: "
                          f"remove all but one of {', '.join(s for sections in chosen.values() for s in sections)}")
    if chosen:
        return RECIPES[next(iter(chosen))]
    default = [r for r in RECIPES.values() if not r.sections]
    if not default:
        known = ", ".join(s for r in RECIPES.values() for s in r.sections)
        raise ConfigError(f"the config asks for no method and no default recipe is registered: set one of {known}")
    return default[0]


def prepare(cfg: RunConfig, run_dir: Path | None, callbacks: tuple[Callback, ...] = (),
            eval_split: Literal["test", "val"] = "test") -> Trainer:
    """The trainer of a config's one training run, its distiller built by the config's recipe
    (:func:`kdtune.build.make_trainer`; no training yet)."""
    recipe = select_recipe(cfg)
    if recipe.build is None:
        raise ConfigError(f"the config asks for {recipe.name} ({', '.join(recipe.selected_by(cfg))}), which drives "
                          f"its own runs, not one trainer: run it with `kdtune run` (kdtune.recipe.run)")
    return make_trainer(cfg, run_dir, recipe.build, callbacks, eval_split)


def train(cfg: RunConfig, run_dir: Path, build: DistillerBuilder, resume: bool = False,
          callbacks: tuple[Callback, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Train ``cfg`` (its distiller made by ``build``) in ``run_dir``, continuing from its checkpoint
    with ``resume`` (:func:`_has_checkpoint`); saves ``config.yaml`` when it starts."""
    if resume:
        resume = _has_checkpoint(run_dir)  # checked under the lock: nobody writes it meanwhile
    cfg = restore_unrecorded_defaults(cfg) if resume else pin_method_defaults(cfg)
    trainer = make_trainer(cfg, run_dir, build, callbacks)
    if trainer.dist.is_main and not resume:
        save_config(cfg, run_dir / "config.yaml")
    summary = trainer.fit(resume=resume)
    return run_dir, summary


def _has_checkpoint(run_dir: Path) -> bool:
    """Whether a plain run can continue from ``checkpoints/last.pt``.

    Without the checkpoint, a run that recorded no epoch yet starts from epoch 1 (nothing is
    lost, and it says so); one that did record epochs is refused — starting over would truncate
    its ``metrics.jsonl``, and continuing without the weights that made those metrics is not the
    same run.
    """
    if (run_dir / "checkpoints" / "last.pt").exists():
        return True
    metrics = run_dir / "metrics.jsonl"
    epochs = sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.exists() else 0
    if epochs:
        raise RunDirError(
            f"cannot resume {run_dir}: it has {epochs} recorded epoch(s) in metrics.jsonl but no "
            f"checkpoints/last.pt to continue from; nothing was changed. Start a new run with "
            f"`kdtune run {run_dir / 'config.yaml'}`")
    print(f"{run_dir} has no checkpoint and no recorded epoch yet: starting it from epoch 1", flush=True)
    return False
