"""The parts every recipe builds from a :class:`~kdtune.config.RunConfig`: data splits, models,
pathways, the distiller and the trainer.

It sits below the methods (:mod:`kdtune.search`, :mod:`kdtune.selfdistill`) and the recipes
(:mod:`kdtune.recipes`) that use it, and imports none of them: a method builds its runs from
these parts, and a recipe hands :func:`make_trainer` its method's :data:`DistillerBuilder`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kdtune.allocator import keep_freed_memory
from kdtune.checkpoint import load_checkpoint, load_state_strict, model_state
from kdtune.config import ModelConfig, PathwayConfig, RunConfig, from_dict
from kdtune.data import Images, balanced_subset, dataset_augment, load_dataset, make_loader, train_val_split
from kdtune.distiller import Distiller, LogitLoss, OutputError
from kdtune.ensemble import ENSEMBLE, TeacherEnsemble
from kdtune.models import create_model
from kdtune.pathways import Pathway
from kdtune.plugins import import_plugins
from kdtune.trainer import Callback, Trainer
from kdtune.zoo import ZOO_PREFIX, load_teacher


@dataclass
class Splits:
    """Training, held-out validation (may be None) and test sets of a run."""

    train: Images
    val: Images | None
    test: Images


#: A method's part of a run: the distiller of a config and the trainer callbacks it needs, given the
#: config, its data splits and the (C, H, W) shape of one input.
DistillerBuilder = Callable[[RunConfig, Splits, tuple[int, ...]], tuple[Distiller, list[Callback]]]


def load_splits(cfg: RunConfig) -> Splits:
    """Training subset (class-balanced, seeded), optional validation split, and the test set.

    The validation split is always carved from the training data — never from the test set.
    """
    d = cfg.data
    options = {}
    if d.image_size is not None:
        if d.dataset != "folder":
            raise ValueError(f"data.image_size resizes image files (data.dataset: folder); {d.dataset!r} images "
                             f"keep their size — remove data.image_size")
        options["image_size"] = d.image_size
    train = load_dataset(d.dataset, "train", d.root, **options)
    test = load_dataset(d.dataset, "test", d.root, **options)
    if d.train_per_class is not None:
        train = balanced_subset(train, d.train_per_class, d.subset_seed)
    if d.test_limit is not None:
        test = test.subset(torch.arange(min(d.test_limit, len(test))))
    val = None
    if d.val_fraction > 0:
        train, val = train_val_split(train, d.val_fraction, d.split_seed)
    return Splits(train, val, test)


def build_model(mc: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """A registered model (or a user's ``module:callable``), optionally with weights from a checkpoint
    file (loaded with ``weights_only=True``; see :func:`~kdtune.checkpoint.model_state` for the
    layouts understood) or a shipped teacher (``zoo:<name>``)."""
    if mc.name == ENSEMBLE:  # several teachers (Auto-KD multi-teacher), built member by member
        return build_ensemble(mc, in_channels, num_classes)
    if mc.checkpoint and mc.checkpoint.startswith(ZOO_PREFIX):
        return load_teacher(mc.checkpoint)
    model = create_model(mc.name, in_channels=in_channels, num_classes=num_classes, **mc.kwargs)
    if mc.checkpoint:
        state = model_state(load_checkpoint(mc.checkpoint))
        state = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in state.items()}
        load_state_strict(model, state, f"{mc.name} ({mc.checkpoint})")
    return model


def build_ensemble(mc: ModelConfig, in_channels: int, num_classes: int) -> TeacherEnsemble:
    """Build a :class:`~kdtune.ensemble.TeacherEnsemble` from its config, each member with its own weights."""
    members: Any = mc.kwargs.get("members")
    if not isinstance(members, Mapping) or set(mc.kwargs) != {"members"}:
        raise ValueError(f"model {ENSEMBLE!r} takes kwargs {{members: {{name: model config}}}}, got {mc.kwargs}")
    configs = {name: from_dict(ModelConfig, cfg, f"teacher.kwargs.members.{name}") for name, cfg in members.items()}
    return TeacherEnsemble({name: build_model(mc, in_channels, num_classes) for name, mc in configs.items()},
                           {name: mc.output for name, mc in configs.items()})


def build_pathways(configs: Sequence[PathwayConfig]) -> list[Pathway]:
    """The :class:`~kdtune.pathways.Pathway` of each ``distill.pathways`` entry."""
    return [Pathway(teacher=p.teacher, student=p.student, method=p.method, transform=p.transform,
                    distance=p.distance, weight=p.weight, name=p.name, transform_kwargs=dict(p.transform_kwargs),
                    distance_kwargs=dict(p.distance_kwargs), selector=p.selector,
                    teacher_selector=p.teacher_selector, student_selector=p.student_selector) for p in configs]


def pin_method_defaults(cfg: RunConfig) -> RunConfig:
    """``cfg`` with each pathway's transform and distance written out as the pathway resolves them
    (:meth:`~kdtune.pathways.Pathway.resolved`: its catalogue method's, else identity / mse), so a run's
    ``config.yaml`` records what ran and a resumed run rebuilds the same pathways after a catalogue
    default changes (NST's transform did on 2026-12-06). Weights stay as given: a catalogue weight and a
    user's are reported, and calibrated, differently."""
    resolved = [p.resolved() for p in build_pathways(cfg.distill.pathways)]
    pathways = [replace(p, transform=r.transform, distance=r.distance)
                for p, r in zip(cfg.distill.pathways, resolved, strict=True)]
    return replace(cfg, distill=replace(cfg.distill, pathways=pathways))


#: Transforms catalogue methods had before runs recorded theirs (:func:`pin_method_defaults`, 2026-12-06), for
#: the methods whose default changed since. Only a run started before then has ``transform: null`` in its
#: ``config.yaml``, so that is what it ran with.
TRANSFORMS_BEFORE_RUNS_RECORDED_THEM = {"nst": "conv1x1"}


def restore_unrecorded_defaults(cfg: RunConfig) -> RunConfig:
    """``cfg`` of a run being resumed with the transform its catalogue method had when the run started, for a
    pathway whose ``config.yaml`` does not record one (written before :func:`pin_method_defaults`): NST ran
    through a 1x1 adapter until 2026-12-06, and its checkpoint holds that adapter's weights."""
    pathways = [replace(p, transform=TRANSFORMS_BEFORE_RUNS_RECORDED_THEM[p.method])
                if p.transform is None and p.method in TRANSFORMS_BEFORE_RUNS_RECORDED_THEM else p
                for p in cfg.distill.pathways]
    return replace(cfg, distill=replace(cfg.distill, pathways=pathways))


#: Config keys added with a default that changed what runs, and the value that reproduces a run written before them
#: (its ``config.yaml`` lacks the key): the 8-image tail batch was kept, eq. 4's a was constant, DistPro's
#: hypergradient was raw (its lr decay not undone, 2026-12-06).
VALUES_BEFORE_KEYS_EXISTED = {"data.drop_last": False, "selfdistill.alpha_warmup": 0.0, "distpro.undo_lr_decay": False}


def overrides_for_unrecorded_keys(saved: dict[str, Any]) -> list[str]:
    """``key=value`` overrides that resume a run's saved config (a raw ``config.yaml`` dict) as it ran: each key of
    :data:`VALUES_BEFORE_KEYS_EXISTED` whose section the config has but which it does not record."""
    overrides = []
    for dotted, before in VALUES_BEFORE_KEYS_EXISTED.items():
        section, key = dotted.split(".")
        if isinstance(saved.get(section), dict) and key not in saved[section]:
            overrides.append(f"{dotted}={str(before).lower()}")
    return overrides


#: Where a run config sets what the Distiller / Pathway arguments in an :class:`OutputError` set.
_CONFIG_KEYS = {"teacher_output=": "teacher.output", "student_output=": "student.output",
                "_selector=": "distill.pathways.<i>.selector (or teacher_selector / student_selector)"}


def build_distiller(cfg: RunConfig, in_channels: int, num_classes: int, input_shape: tuple[int, ...]) -> Distiller:
    student = build_model(cfg.student, in_channels, num_classes)
    teacher = build_model(cfg.teacher, in_channels, num_classes) if cfg.teacher is not None else None
    dc = cfg.distill
    logit_losses = [LogitLoss(ll.name, ll.weight, dict(ll.kwargs)) for ll in dc.logit_losses]
    try:
        return Distiller(student, teacher, pathways=build_pathways(dc.pathways), logit_losses=logit_losses,
                         weighting=dc.weighting.name, weighting_kwargs=dc.weighting.kwargs,
                         task_weight=dc.task_weight, input_shape=input_shape,
                         teacher_output=cfg.teacher.output if cfg.teacher is not None else None,
                         student_output=cfg.student.output,
                         teacher_precision=cfg.teacher.precision if cfg.teacher is not None else "fp32")
    except OutputError as err:  # it names the Python arguments; say the config keys too
        keys = [key for argument, key in _CONFIG_KEYS.items() if argument in str(err)]
        raise OutputError(f"{err} (in the run config: {', '.join(keys)})" if keys else str(err)) from None


def plain_distiller(cfg: RunConfig, splits: Splits, input_shape: tuple[int, ...]) -> tuple[Distiller, list[Callback]]:
    """The :data:`DistillerBuilder` of plain distillation: the config's teacher, logit losses and pathways."""
    return build_distiller(cfg, splits.train.in_channels, splits.train.num_classes, input_shape), []


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_trainer(cfg: RunConfig, run_dir: Path | None, build: DistillerBuilder = plain_distiller,
                 callbacks: tuple[Callback, ...] = (), eval_split: Literal["test", "val"] = "test") -> Trainer:
    """Build data, models, distiller (by ``build``) and trainer for a config (no training yet).

    ``eval_split="val"`` evaluates after every epoch on the held-out validation split
    (``data.val_fraction``) instead of the test set — for searches, which must never select on
    test accuracy; the trainer's ``test_*`` metrics then are validation metrics.
    """
    import_plugins(cfg.plugins)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    seed_everything(cfg.seed)  # model and adapter initialisation depend on it
    splits = load_splits(cfg)
    input_shape = splits.train.input_shape
    distiller, method_callbacks = build(cfg, splits, input_shape)
    callbacks = (*callbacks, *method_callbacks)
    d = cfg.data
    train_loader = make_loader(splits.train, d.batch_size, shuffle=True, seed=cfg.seed, workers=d.workers,
                               drop_last=d.drop_last, augment=dataset_augment(d.dataset, d.crop_padding, d.flip))
    if eval_split == "val" and splits.val is None:
        raise ValueError("eval_split='val' needs a validation split: set data.val_fraction > 0 (e.g. 0.2)")
    test_loader = make_loader(splits.val if eval_split == "val" else splits.test, d.eval_batch_size,
                              shuffle=False, workers=d.workers)
    trainer = Trainer(distiller, train_loader, test_loader, cfg.train, run_dir=run_dir, callbacks=callbacks,
                      seed=cfg.seed, teacher_key=teacher_key(cfg) if eval_split == "test" else None)
    calibrate_run(cfg, trainer)
    return trainer


def calibrate_run(cfg: RunConfig, trainer: Trainer) -> None:
    """``distill.calibrate``: measure the term weights on the trainer's first batches, or reuse the
    ones recorded in ``cfg`` (a resumed run); the measured ones are recorded in ``cfg`` (config.yaml)."""
    if cfg.distill.calibrate is None:
        return
    if cfg.selfdistill is not None:
        raise ValueError("distill.calibrate weighs teacher distillation terms; self-distillation has none: "
                         "remove distill.calibrate")
    from kdtune.calibration import calibrate_from_config

    calibrate_from_config(trainer.distiller, trainer.train_loader, cfg.distill.calibrate)


def teacher_key(cfg: RunConfig) -> tuple[Any, ...] | None:
    """What fixes the teacher's test predictions: its checkpointed weights and the test images.
    None when the teacher's weights depend on the seed (no checkpoint) or there is none."""
    t = cfg.teacher
    if t is None or t.checkpoint is None:
        return None
    return (t.name, t.checkpoint, repr(sorted(t.kwargs.items())), cfg.data.dataset, cfg.data.root, cfg.data.test_limit)
