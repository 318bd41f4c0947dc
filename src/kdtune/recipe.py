"""From a :class:`~kdtune.config.RunConfig` to a trained student: data, models, distiller, trainer.

This is what ``kdtune run`` does; Python users can call :func:`run` with a config object, or
build the pieces themselves (``Distiller`` + ``Trainer``) with their own models.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kdtune.checkpoint import load_checkpoint, load_state_strict, model_state
from kdtune.config import ModelConfig, RunConfig, load_config, save_config
from kdtune.data import Images, balanced_subset, dataset_augment, load_dataset, make_loader, train_val_split
from kdtune.distiller import Distiller, LogitLoss
from kdtune.distributed import init_distributed
from kdtune.errors import RunDirError
from kdtune.models import create_model
from kdtune.pathways import Pathway
from kdtune.plugins import import_plugins
from kdtune.rundir import create_run_dir, run_lock
from kdtune.trainer import Callback, Trainer
from kdtune.zoo import ZOO_PREFIX, load_teacher


@dataclass
class Splits:
    """Training, held-out validation (may be None) and test sets of a run."""

    train: Images
    val: Images | None
    test: Images


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
    if mc.name == "teacher_ensemble":  # several teachers (Auto-KD multi-teacher), built member by member
        from kdtune.search.multiteacher import build_ensemble

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


def build_distiller(cfg: RunConfig, in_channels: int, num_classes: int, input_shape: tuple[int, ...]) -> Distiller:
    student = build_model(cfg.student, in_channels, num_classes)
    teacher = build_model(cfg.teacher, in_channels, num_classes) if cfg.teacher is not None else None
    dc = cfg.distill
    pathways = [Pathway(teacher=p.teacher, student=p.student, method=p.method, transform=p.transform,
                        distance=p.distance, weight=p.weight, name=p.name, transform_kwargs=dict(p.transform_kwargs),
                        distance_kwargs=dict(p.distance_kwargs)) for p in dc.pathways]
    logit_losses = [LogitLoss(ll.name, ll.weight, dict(ll.kwargs)) for ll in dc.logit_losses]
    return Distiller(student, teacher, pathways=pathways, logit_losses=logit_losses,
                     weighting=dc.weighting.name, weighting_kwargs=dc.weighting.kwargs,
                     task_weight=dc.task_weight, input_shape=input_shape,
                     teacher_precision=cfg.teacher.precision if cfg.teacher is not None else "fp32")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(cfg: RunConfig) -> Path:
    """Create ``<output_dir>/<name>-s<seed>-<timestamp>`` exclusively (a suffix if it is taken):
    two runs started in the same second never share a directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return create_run_dir(Path(cfg.output_dir) / f"{cfg.name}-s{cfg.seed}-{stamp}")


def prepare(cfg: RunConfig, run_dir: Path | None, callbacks: tuple[Callback, ...] = (),
            eval_split: Literal["test", "val"] = "test") -> Trainer:
    """Build data, models, distiller and trainer for a config (no training yet).

    ``eval_split="val"`` evaluates after every epoch on the held-out validation split
    (``data.val_fraction``) instead of the test set — for searches, which must never select on
    test accuracy; the trainer's ``test_*`` metrics then are validation metrics.
    """
    import_plugins(cfg.plugins)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)  # model and adapter initialisation depend on it
    splits = load_splits(cfg)
    input_shape = splits.train.input_shape
    if cfg.selfdistill is not None:  # teacher-free self-distillation: exits (+ label generator) on the student
        from kdtune.selfdistill import from_config

        student = build_model(cfg.student, splits.train.in_channels, splits.train.num_classes)
        distiller, meta_callbacks = from_config(cfg, student, splits.train, input_shape)
        callbacks = (*callbacks, *meta_callbacks)
    elif cfg.distpro is not None or cfg.distill.weighting.name == "process":  # DistPro search / process replay
        from kdtune.search.distpro import from_config as distpro_from_config

        distiller, distpro_callbacks = distpro_from_config(cfg, splits, input_shape)
        callbacks = (*callbacks, *distpro_callbacks)
    else:
        distiller = build_distiller(cfg, splits.train.in_channels, splits.train.num_classes, input_shape)
    d = cfg.data
    train_loader = make_loader(splits.train, d.batch_size, shuffle=True, seed=cfg.seed, workers=d.workers,
                               augment=dataset_augment(d.dataset, d.crop_padding, d.flip))
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

    Returns the run directory and the summary dict. A config with a ``search`` section runs that
    search instead (:func:`kdtune.search.weights.run_search`), which is always resumable; one with an
    ``autokd`` section runs the Auto-KD search (:func:`kdtune.search.autokd.run_autokd`), or trains
    with the distiller spec file ``autokd.spec``.
    """
    import_plugins(cfg.plugins)  # the user's models must be registered before any name is looked up
    path = Path(run_dir) if run_dir is not None else _shared_run_dir(cfg)
    info = init_distributed()
    if info.is_main:
        if run_dir is None:  # a name the caller does not know yet: say it now, so a crash still says where to look
            print(f"run directory: {path}", flush=True)
        path.mkdir(parents=True, exist_ok=True)  # a directory the caller chose (new_run_dir made its own)
    # One process trains in a directory at a time (ranks of one torchrun job share rank 0's lock).
    with run_lock(path) if info.is_main else nullcontext():
        return _run_locked(cfg, path, resume, callbacks)


def _run_locked(cfg: RunConfig, path: Path, resume: bool,
                callbacks: tuple[Callback, ...]) -> tuple[Path, dict[str, Any]]:
    if cfg.autokd is not None:  # Auto-KD: search distiller designs, or (autokd.spec) train with one
        from kdtune.search.autokd import run_autokd, spec_config

        if cfg.autokd.spec is None:
            return run_autokd(cfg, path, callbacks)
        cfg = spec_config(cfg)  # a plain config; its saved config.yaml resumes without the spec file
    if cfg.search is not None:
        from kdtune.search.weights import run_search

        return run_search(cfg, path, callbacks)
    if resume:
        resume = _has_checkpoint(path)  # checked under the lock: nobody writes it meanwhile
    trainer = prepare(cfg, path, callbacks)
    if trainer.dist.is_main and not resume:
        save_config(cfg, path / "config.yaml")
    summary = trainer.fit(resume=resume)
    return path, summary


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


def resume_run(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Continue an interrupted run from its saved config and last checkpoint (see :func:`_has_checkpoint`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"--resume {run_dir}: no such directory (give a run directory, e.g. runs/<name>-s0-<time>)")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise RunDirError(f"--resume {run_dir}: no config.yaml in it, so it is not a kdtune run directory")
    return run(load_config(cfg_path), run_dir, resume=True)
