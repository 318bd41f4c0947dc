"""Typed run configuration: dataclasses, YAML load/save and ``dotted.key=value`` overrides.

A run is described by one :class:`RunConfig`, a tree of plain dataclasses. The generic machinery
here (:func:`from_dict`, :func:`to_dict`) works for any such tree, so adding a section or a field
to the schema is all a new feature needs: validation, error messages, YAML and overrides follow.

Example:
    >>> cfg = load_config("configs/fmnist/kd.yaml", ["epochs=3", "train.optimizer.lr=0.05"])
    >>> save_config(cfg, "runs/kd/config.yaml")

Config files may start from another file with a top-level ``base: other.yaml`` (a path relative
to the file, or a list of them); the base is deep-merged under the file, whose own keys win.
Names of components (models, datasets, losses ...) are plain strings here and are checked by
their registries when the run is built, so this module stays free of torch.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import tempfile
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from kdtune.errors import KdtuneError
from kdtune.registry import closest

__all__ = [
    "ALIASES",
    "AutoKDConfig",
    "CalibrateConfig",
    "ConfigError",
    "DataConfig",
    "DistProConfig",
    "DistillConfig",
    "LogitLossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PathwayConfig",
    "RunConfig",
    "ScheduleConfig",
    "SearchConfig",
    "SelfDistillConfig",
    "TrainConfig",
    "WeightingConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "load_raw",
    "register_alias",
    "save_config",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(KdtuneError, ValueError):
    """A configuration is malformed: unknown key, wrong type, bad value or bad override."""


class _FieldError(ConfigError):
    """A value check in ``__post_init__`` failed; :func:`from_dict` prefixes the dotted path."""

    def __init__(self, field_name: str, detail: str) -> None:
        super().__init__(f"{field_name}: {detail}")
        self.field_name = field_name
        self.detail = detail


def _require(ok: bool, field_name: str, detail: str) -> None:
    """Raise a :class:`ConfigError` naming ``field_name`` unless ``ok``."""
    if not ok:
        raise _FieldError(field_name, detail)


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Dataset, subset, split and loader settings."""

    dataset: str = "fashion_mnist"
    """Dataset registry name (``kdtune.data.DATASETS``)."""
    root: str | None = None
    """Directory holding the dataset files (``folder``: the directory with ``train/`` and ``test/``;
    ``npz``: the ``.npz`` file); None searches the usual places."""
    train_per_class: int | None = None
    """Class-balanced training subset size per class (FMNIST-5k: 500); None uses all."""
    subset_seed: int = 0
    """Seed of the class-balanced subset draw."""
    val_fraction: float = 0.0
    """Held-out share of the training set (search, meta steps); 0 = none, evaluate on test."""
    split_seed: int = 0
    """Seed of the train/validation split."""
    batch_size: int = 128
    """Training batch size."""
    drop_last: bool | None = None
    """Drop each training epoch's partial last batch; null: only when it holds fewer than half a batch
    (it would take a full step on a few images: noisy BatchNorm statistics, batch-relation losses such as
    SP weighing it more; kdtune.data.drops_tail). Evaluation never drops."""
    eval_batch_size: int = 500
    """Evaluation batch size."""
    crop_padding: int = 2
    """Zero padding before the random crop augmentation; 0 disables cropping."""
    flip: bool | None = None
    """Random horizontal flip augmentation; None: the dataset's default (off for digits)."""
    image_size: int | None = None
    """``folder`` only: resize the shorter side to this size, then centre-crop a square; None: the
    images are used at their own size (they must all share it)."""
    workers: int = 0
    """DataLoader worker processes; 0 keeps in-memory datasets on the fast in-process loader
    (``folder`` images are then decoded in the training process)."""
    test_limit: int | None = None
    """Evaluate on the first N test images only (quick looks, tests); None: the whole test set."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _require(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _require(
            self.train_per_class is None or self.train_per_class >= 1,
            "train_per_class",
            f"must be >= 1 or null (all), got {self.train_per_class}",
        )
        _require(self.crop_padding >= 0, "crop_padding", f"must be >= 0, got {self.crop_padding}")
        _require(self.test_limit is None or self.test_limit >= 1, "test_limit",
                 f"must be >= 1 or null (all), got {self.test_limit}")
        _require(self.image_size is None or self.image_size >= 1, "image_size",
                 f"must be >= 1 or null (keep), got {self.image_size}")
        _require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")


@dataclass
class ModelConfig:
    """A network: registry name, optional weights and constructor arguments."""

    name: str
    """Model registry name (``kdtune.models``)."""
    checkpoint: str | None = None
    """Weights to load: a file path, or ``"zoo:<name>"`` for a shipped teacher."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the model constructor (e.g. ``num_classes``)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Teacher only: ``fp32`` (its forward exact up to float rounding) or ``bf16`` (faster, approximate;
    losses stay fp32). See ``kdtune.teacher``."""
    output: int | str | None = None
    """Where the logits are in the model's output when it is not one tensor: a key (str) of a dict
    output (or an attribute, e.g. of a HF ``ModelOutput``) or an index (int) into a tuple / list
    output; null: the output is the logits (``Distiller(teacher_output=..., student_output=...)``)."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "name", "must name a model, got an empty string")


@dataclass
class LogitLossConfig:
    """A loss on the output logits (e.g. Hinton KD)."""

    name: str = "kd"
    """Logit loss name (``kdtune.losses``)."""
    weight: float | None = None
    """Weight of this term in the total loss (fixed weighting); null: the catalogue's usual weight."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the loss, e.g. ``tau``."""

    def __post_init__(self) -> None:
        _require(self.weight is None or self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")


@dataclass
class PathwayConfig:
    """One teacher -> student feature pathway: where, how to align, how to compare, how much."""

    teacher: str
    """Teacher module path (``"layer2.1"``) or ``"stage:<i>"`` for the i-th stage output."""
    student: str
    """Student module path or ``"stage:<i>"``."""
    method: str | None = None
    """Catalogue name (``kdtune.losses``) that fills transform/distance/weight defaults."""
    transform: str | None = None
    """Transform registry name; overrides the method's."""
    distance: str | None = None
    """Distance registry name; overrides the method's."""
    weight: float | None = None
    """Weight of this pathway; None takes the method's default (or 1)."""
    name: str | None = None
    """Name of the loss term in logs; None derives one from the paths."""
    transform_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the transform."""
    distance_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the distance."""
    selector: int | str | None = None
    """Picks the feature out of a module output that is not one tensor (e.g. a block returning
    ``(hidden, attention)``): an index (int) into a tuple / list or a key (str) of a dict (or an
    attribute); used on both sides. null: the module's output is the feature."""
    teacher_selector: int | str | None = None
    """The same for the teacher's module only (overrides ``selector``)."""
    student_selector: int | str | None = None
    """The same for the student's module only (overrides ``selector``)."""

    def __post_init__(self) -> None:
        _require(bool(self.teacher), "teacher", "must name a teacher module path, got an empty string")
        _require(bool(self.student), "student", "must name a student module path, got an empty string")
        _require(self.weight is None or self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")


@dataclass
class WeightingConfig:
    """How the loss terms are combined (``kdtune.weighting``)."""

    name: str = "fixed"
    """Weighting strategy name: fixed, equal, adaptive (learned exp(-z)), mgda, distpro, process ..."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the strategy."""


@dataclass
class CalibrateConfig:
    """Weights measured on the first batches (:mod:`kdtune.calibration`) instead of catalogue constants.

    Each distillation term's gradient norm on the student's parameters is set to ``ratio`` times the
    task (cross-entropy) gradient's norm, measured on the first ``batches`` training batches. A weight
    the config gives explicitly then multiplies the calibrated one (weight 2 = twice the ratio).
    """

    ratio: float = 1.0
    """Target ||grad term|| / ||grad CE|| of every term at weight 1 (kdtune.calibration says why 1)."""
    batches: int = 4
    """Training batches (of epoch 0, the run's own) the gradient norms are averaged over."""
    weights: dict[str, float] = field(default_factory=dict)
    """Measured calibrated weight per term, written by the run (config.yaml); a resumed run reuses them."""
    grad_norms: dict[str, float] = field(default_factory=dict)
    """Measured mean gradient norms (``task`` and each term), written by the run with ``weights``."""

    def __post_init__(self) -> None:
        _require(self.ratio > 0, "ratio", f"must be > 0, got {self.ratio}")
        _require(self.batches >= 1, "batches", f"must be >= 1, got {self.batches}")
        _require(all(w >= 0 for w in self.weights.values()), "weights", f"must be >= 0, got {self.weights}")


@dataclass
class DistillConfig:
    """What the student learns from: labels, logit losses, feature pathways and their weighting."""

    task_weight: float = 1.0
    """Weight of the cross-entropy with the labels."""
    logit_losses: list[LogitLossConfig] = field(default_factory=list)
    """Losses on the logits (empty: none)."""
    pathways: list[PathwayConfig] = field(default_factory=list)
    """Feature pathways (empty: none)."""
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    """How the terms are aggregated."""
    calibrate: CalibrateConfig | None = None
    """Calibrated term weights (``distill.calibrate.ratio=1`` switches it on); null: catalogue / given weights."""

    def __post_init__(self) -> None:
        _require(self.task_weight >= 0, "task_weight", f"must be >= 0, got {self.task_weight}")


@dataclass
class OptimizerConfig:
    """Optimizer of the student (and of adapter parameters)."""

    name: Literal["sgd", "adamw"] = "sgd"
    """Optimizer: ``sgd`` or ``adamw``."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD Nesterov momentum."""
    weight_decay: float = 5e-4
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {self.betas}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (per step, expressed in epochs)."""

    name: Literal["cosine", "step", "multistep", "constant"] = "cosine"
    """Schedule shape."""
    step_size: int = 30
    """``step``: epochs between decays."""
    milestones: list[int] = field(default_factory=list)
    """``multistep``: epochs at which the rate decays."""
    milestone_fractions: list[float] = field(default_factory=list)
    """``multistep``: fractions of the run (0..1) at which the rate decays, instead of ``milestones``;
    scales with ``epochs`` (DistPro §4.1's search: [0.25, 0.5, 0.75], epochs 10/20/30 of 40)."""
    gamma: float = 0.1
    """``step``/``multistep``: decay factor."""
    warmup_epochs: int = 0
    """Linear warm-up length in epochs (0: none)."""

    def __post_init__(self) -> None:
        _require(self.step_size >= 1, "step_size", f"must be >= 1, got {self.step_size}")
        _require(self.gamma > 0, "gamma", f"must be > 0, got {self.gamma}")
        _require(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _require(
            list(self.milestones) == sorted(self.milestones) and all(m >= 1 for m in self.milestones),
            "milestones",
            f"must be increasing epochs >= 1, got {self.milestones}",
        )
        fractions = list(self.milestone_fractions)
        _require(fractions == sorted(fractions) and all(0 < f < 1 for f in fractions), "milestone_fractions",
                 f"must be increasing fractions of the run in (0, 1), got {fractions}")
        _require(not (fractions and self.milestones), "milestone_fractions",
                 "give milestones (epochs) or milestone_fractions, not both")


@dataclass
class TrainConfig:
    """Training loop settings."""

    epochs: int = 30
    """Number of training epochs."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer settings."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    channels_last: bool = True
    """Use channels-last memory format (faster convolutions on CPU)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: ``auto`` takes a GPU when torch sees one (under torchrun: the process's
    LOCAL_RANK GPU), else the CPU."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16``: student and teacher forwards under bfloat16 autocast (CPU or GPU); losses, adapters
    and optimiser state stay fp32."""
    deterministic: bool = False
    """Ask torch for deterministic algorithms (slower)."""
    threads: int | None = None
    """torch intra-op threads; None keeps torch's default."""
    keep_freed_memory: bool = True
    """Keep memory a step frees inside the process for the next step (glibc malloc's trim and mmap
    thresholds, :mod:`kdtune.allocator`): fewer page faults, less CPU per step; the process keeps its
    peak heap. ``false`` leaves malloc's defaults. Process-wide; a no-op off Linux/glibc."""
    checkpoint_every: int = 1
    """Save a resumable checkpoint every this many epochs."""
    eval_every: int = 1
    """Evaluate every this many epochs (and always after the last); the final-epoch metrics are
    what tables report, so a benchmark may evaluate less often to save time."""
    progress: bool = True
    """Show a progress bar."""
    max_nan_steps: int = 0
    """Number of NaN/inf loss steps tolerated (skipped) before the run stops."""
    log_every: int = 50
    """Write loss, terms and weights to ``steps.jsonl`` every this many steps (0: never)."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _require(
            self.threads is None or self.threads >= 1, "threads", f"must be >= 1 or null, got {self.threads}"
        )
        _require(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _require(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        _require(self.max_nan_steps >= 0, "max_nan_steps", f"must be >= 0, got {self.max_nan_steps}")
        _require(self.log_every >= 0, "log_every", f"must be >= 0, got {self.log_every}")


@dataclass
class SelfDistillConfig:
    """Teacher-free self-distillation with exits (``kdtune.selfdistill``; SPEC § MetaDistiller)."""

    method: Literal["dsn", "sd", "md"] = "md"
    """``dsn`` hard labels on the exits, ``sd`` final output as their teacher, ``md`` MetaDistiller."""
    stages: list[str] | None = None
    """Module paths of the K stage outputs (exits on all but the last); null finds them automatically."""
    alpha: float = 0.5
    """a of eq. 4: weight of an exit's hard-label term, 1 - a for its soft target."""
    alpha_warmup: float = 1.0
    """``sd``/``md``: fraction of the run over which a falls linearly from 1 (labels only) to ``alpha``;
    0: ``alpha`` from the first step (the paper). Default: the whole run — measured, it keeps the exits near
    DSN's on short runs where a constant a sank them (kdtune.selfdistill.warmup says why); ``dsn`` ignores it."""
    tau: float = 1.0
    """Temperature of the soft targets (eq. 2, 4)."""
    meta_every: int = 5
    """M: the label generator learns in epochs 0, M, 2M ... (``md``)."""
    meta_steps: int | None = None
    """Meta steps per meta epoch; null: one after every training step (Alg. 1)."""
    meta_batch_size: int | None = None
    """Batch size of the two meta batches; null: ``data.batch_size``."""
    generator_lr: float = 0.001
    """Initial Adam learning rate of the label generator; it follows the main schedule. The paper's 0.1
    (§4.1) moves every generator weight by up to 0.1 per Adam step: measured, its labels agreed with y on
    ~10 % of images after the first meta epoch (kdtune.selfdistill.generator); 0.001 is Adam's own default."""
    generator_residual: bool = True
    """``md``: the generator starts at F̂_k = F_k (T_k = the exit's own prediction) and learns a residual;
    false: eq. 5 as written (random T_k at the start). kdtune.selfdistill.generator says why."""
    meta_objective: Literal["exits", "final"] = "exits"
    """``md``: the meta step's L_val (eq. 6) is the validation CE of every output after the look-ahead
    (``exits``) or of the final output only (``final``); SelfDistiller.meta_gradient says why."""
    generator_anchor: Literal["final", "exit"] = "final"
    """``md``: T_k = the final output + the generator's top-down correction (``final``: starts as SD's
    target) or the exit's head on the fused map alone (``exit``: the paper's; starts as the exit's own
    prediction). SelfDistiller.soft_target_logits says why."""

    def __post_init__(self) -> None:
        _require(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")
        _require(0 <= self.alpha_warmup <= 1, "alpha_warmup", f"must be in [0, 1], got {self.alpha_warmup}")
        _require(self.tau > 0, "tau", f"must be > 0, got {self.tau}")
        _require(self.meta_every >= 1, "meta_every", f"must be >= 1, got {self.meta_every}")
        _require(self.meta_steps is None or self.meta_steps >= 1, "meta_steps",
                 f"must be >= 1 or null (every step), got {self.meta_steps}")
        _require(self.meta_batch_size is None or self.meta_batch_size >= 1, "meta_batch_size",
                 f"must be >= 1 or null, got {self.meta_batch_size}")
        _require(self.generator_lr > 0, "generator_lr", f"must be > 0, got {self.generator_lr}")


@dataclass
class StudyConfig:
    """Where a search's Optuna study lives and how its workers recover, shared by the weight search
    (``search``) and Auto-KD (``autokd``). Several workers given one storage URL share the study."""

    storage: str | None = None
    """Optuna storage URL; null: ``sqlite:///<run_dir>/study.db``. Workers given one URL share the study."""
    study_name: str | None = None
    """Name of the study in the storage; null: the run name."""
    final: bool = True
    """After the search, train the best candidate on all training data and evaluate on test (one worker)."""
    heartbeat: int = 60
    """Seconds between a running trial's heartbeats; one silent for 3x as long is failed and retried."""
    max_retry: int = 2
    """Retries of a trial whose worker died (its training resumes from its last checkpoint)."""
    kd_incumbent: bool = True
    """Score plain KD (logits only, tau 4, weight 1; calibrated with distill.calibrate) in the same study;
    the final run uses it when no searched design beats it on validation."""

    def __post_init__(self) -> None:
        _require(self.heartbeat >= 1, "heartbeat", f"must be >= 1 second, got {self.heartbeat}")
        _require(self.max_retry >= 0, "max_retry", f"must be >= 0, got {self.max_retry}")

    def storage_url(self, run_dir: Path) -> str:
        """``storage``, or the SQLite file ``study.db`` in the run directory."""
        return self.storage or f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"


@dataclass
class SearchConfig(StudyConfig):
    """Search over the fixed path weights v (``kdtune.search.weights``; Adaptive Distillation §3.3)."""

    sampler: Literal["grid", "random", "tpe"] = "grid"
    """Optuna sampler: ``grid`` (every combination of the listed values), ``random`` or ``tpe``."""
    space: dict[str, Any] = field(default_factory=dict)
    """Path -> candidate weights v: a list (grid / categorical), or ``{low, high, log}`` (random, tpe).
    A path is a pathway's method label (``at``, ``nst``) or a logit loss name (``kd``)."""
    n_trials: int | None = None
    """Finished trials the study needs, over all workers; null: the grid size (grid only)."""
    trial_epochs: int | None = None
    """Epochs of each trial (a shorter schedule as a cheap proxy); null: ``train.epochs``. The final run
    always trains ``train.epochs``."""
    incumbents: list[dict[str, float]] = field(default_factory=list)
    """Hand-chosen v (path -> weight, e.g. ``{at: 1000, kd: 1}``) scored in the same study as incumbents."""

    def __post_init__(self) -> None:
        _require(bool(self.space), "space", "must give at least one path, e.g. {at: [10, 100, 1000], kd: [0.1, 1]}")
        for path, values in self.space.items():
            if isinstance(values, list):
                _require(bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                              for v in values),
                         f"space.{path}", f"must be a non-empty list of weights >= 0, got {values!r}")
            else:
                ok = (isinstance(values, dict) and {"low", "high"} <= set(values) <= {"low", "high", "log"}
                      and all(isinstance(values[k], (int, float)) for k in ("low", "high"))
                      and 0 <= values["low"] < values["high"] and (values.get("log") is not True or values["low"] > 0))
                _require(ok, f"space.{path}",
                         f"must be a list of weights or {{low, high, log}} with 0 <= low < high (low > 0 for log), "
                         f"got {values!r}")
                _require(self.sampler != "grid", f"space.{path}",
                         f"the grid sampler needs a list of values, got the range {values!r}")
        _require(self.n_trials is None or self.n_trials >= 1, "n_trials", f"must be >= 1 or null, got {self.n_trials}")
        _require(self.n_trials is not None or self.sampler == "grid", "n_trials",
                 f"must be set for the {self.sampler!r} sampler (only grid defaults to its size)")
        _require(self.trial_epochs is None or self.trial_epochs >= 1, "trial_epochs",
                 f"must be >= 1 or null, got {self.trial_epochs}")
        for i, v in enumerate(self.incumbents):
            _require(all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in v.values()),
                     f"incumbents.{i}", f"must map paths to weights >= 0, got {v!r}")
        super().__post_init__()


@dataclass
class AutoKDConfig(StudyConfig):
    """Auto-KD (``kdtune.search.autokd``; papers/auto-kd.txt §2, Table 1): MCTS over distiller designs.

    With ``spec`` set, the run trains the student with that distiller spec (a leaf of the space,
    e.g. a search's ``best.yaml``) like any plain run; without it, the run searches the space on the
    validation split (``data.val_fraction``), then (``final``) trains the best spec on all the data.
    """

    spec: str | None = None
    """Distiller spec YAML to train with (no search); null: search."""
    algorithm: Literal["mcts", "random", "tpe"] = "mcts"
    """Search strategy: Monte-Carlo tree search (§2.2), or the random / TPE baselines over the same space."""
    trials: int = 40
    """Finished trials the study needs, over all workers (paper: 100 MCTS iterations)."""
    exploration: float = 1.0
    """C of the UCB rule (eq. 2)."""
    logits: bool = True
    """Search the logit levels too (Auto-KD); false searches the feature distiller only (Auto-KD_f)."""
    space: Literal["table1", "extended"] = "table1"
    """Search space: Table 1's, or §2.1's extended one (+ Rényi distance, logit norm, weight warm-up / early stop)."""
    teachers: list[ModelConfig] = field(default_factory=list)
    """Extra teachers besides ``teacher`` (multi-teacher, eq. 5-6): each teacher's terms weighted by its mu."""
    reward: Literal["ce_cka", "acc", "ce", "ce_l1"] = "ce_cka"
    """Trial reward on the validation split: eq. 3 ``1 - (CE + 1 - CKA)``, or Table 9's alternatives."""
    teacher_layers: list[str] = field(default_factory=lambda: ["stage:-1"])
    """Teacher module paths (or stage:<i>) of the distilled features; several = multi-layer (eq. 5)."""
    student_layers: list[str] = field(default_factory=lambda: ["stage:-1"])
    """Student module paths, paired one-to-one with teacher_layers."""
    layer_weights: Literal["equal", "train_free"] = "equal"
    """Per-layer factor mu_q: 1, or the train-free ``H(f_T) * CKA(f_S, f_T)`` of eq. 6."""
    cache: bool = True
    """Proxy: teacher logits + features computed once and read from disk (§2.3, offline processing)."""
    sparsity: float = 0.5
    """Proxy: fraction of the student's conv/linear weights held at zero (§2.3); 0 = dense."""
    regrow_every: int = 50
    """Sparse proxy: steps between magnitude prune + random regrow of the mask."""
    regrow_fraction: float = 0.2
    """Sparse proxy: share of the active weights pruned and regrown each time."""
    subset: float = 0.2
    """Proxy: share of the (post-split) training data a trial trains on (§2.3); 1 = all."""
    epoch_fraction: float = 0.2
    """Proxy: share of ``train.epochs`` a trial trains for (early stop, §2.3); 1 = all."""
    export: str | None = None
    """Also write the best spec to this path (a stable name for ``autokd_final`` configs to train from)."""
    min_steps: int = 150
    """Proxy: least optimiser steps of a trial; subset, then epochs, are raised (with a message) to reach it
    (kdtune.search.proxies says why 150)."""
    incumbents: list[str] = field(default_factory=list)
    """Distiller spec YAMLs of hand designs scored in the same study as incumbents (beside plain KD)."""
    fidelity_check: int = 0
    """Also train the top-k designs by proxy reward in full and report the proxy's Spearman rho; 0: off."""

    def __post_init__(self) -> None:
        _require(self.trials >= 1, "trials", f"must be >= 1, got {self.trials}")
        _require(self.exploration >= 0, "exploration", f"must be >= 0, got {self.exploration}")
        _require(bool(self.teacher_layers) and len(self.teacher_layers) == len(self.student_layers),
                 "student_layers", f"must pair one-to-one with teacher_layers, got {self.teacher_layers} "
                 f"and {self.student_layers}")
        _require(0 <= self.sparsity < 1, "sparsity", f"must be in [0, 1), got {self.sparsity}")
        _require(self.regrow_every >= 1, "regrow_every", f"must be >= 1, got {self.regrow_every}")
        _require(0 <= self.regrow_fraction < 1, "regrow_fraction", f"must be in [0, 1), got {self.regrow_fraction}")
        _require(0 < self.subset <= 1, "subset", f"must be in (0, 1], got {self.subset}")
        _require(0 < self.epoch_fraction <= 1, "epoch_fraction", f"must be in (0, 1], got {self.epoch_fraction}")
        _require(self.space in ("table1", "extended"), "space", f"must be table1 or extended, got {self.space!r}")
        _require(self.min_steps >= 1, "min_steps", f"must be >= 1, got {self.min_steps}")
        _require(self.fidelity_check == 0 or self.fidelity_check >= 2, "fidelity_check",
                 f"must be 0 (off) or >= 2 (a rank correlation needs two designs), got {self.fidelity_check}")
        super().__post_init__()


@dataclass(kw_only=True)
class RunConfig:
    """Everything a run needs. Keyword-only, because ``student`` is required but not first."""

    name: str = ""
    """Run name; "" takes the config file's stem (set by :func:`load_config`)."""
    seed: int = 0
    """Global seed (model init, data order, augmentation)."""
    output_dir: str = "runs"
    """Directory under which the run directory ``<output_dir>/<name>`` is created."""
    plugins: list[str] = field(default_factory=list)
    """Python modules imported before names are resolved (they register the user's models, ...);
    ``kdtune run --plugin`` adds to them. Only these modules are imported — YAML stays data."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data settings."""
    student: ModelConfig
    """The network being trained."""
    teacher: ModelConfig | None = None
    """The teacher; None trains the student alone."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation losses and their weighting."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop settings."""
    selfdistill: SelfDistillConfig | None = None
    """Teacher-free self-distillation (exits, DSN/SD/MetaDistiller); None: not used."""
    search: SearchConfig | None = None
    """Search the fixed path weights v on the validation split, then retrain the best; None: a plain run."""
    distpro: DistProConfig | None = None
    """DistPro search of a weight process over stage pathways x transforms; None: not used."""
    autokd: AutoKDConfig | None = None
    """Auto-KD: search a distiller design by MCTS, or train with a found spec (``autokd.spec``); None: not used."""


# --------------------------------------------------------------------------------------------
# Generic dict <-> dataclass machinery
# --------------------------------------------------------------------------------------------

_NONE_TYPE = type(None)
# YAML 1.1 reads "1e-3" (no dot) as a string; accept such numbers for float fields.
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Annotations are strings (postponed evaluation); resolve them once per class.
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    """Readable name of a type annotation, e.g. ``list[int]``, ``str | None``."""
    if tp is Any:
        return "Any"
    if tp is _NONE_TYPE:
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _wrong_type(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{path or 'config'}: expected {_type_name(tp)}, got {_describe(value)}")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (recursively)."""
    if tp is Any:
        return value
    if tp is _NONE_TYPE:
        if value is not None:
            raise _wrong_type(path, tp, value)
        return None

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (Union, types.UnionType):
        if value is None:
            if _NONE_TYPE in args:
                return None
            raise _wrong_type(path, tp, value)
        options = [a for a in args if a is not _NONE_TYPE]
        if len(options) == 1 and options[0] in (int, float, str, bool):
            # Optional scalar: say "int | null", as null is also fine.
            try:
                return _convert(value, options[0], path)
            except ConfigError:
                raise _wrong_type(path, tp, value) from None
        if len(options) == 1:
            # Optional[section]: the section's own error (unknown key ...) is more precise.
            return _convert(value, options[0], path)
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError:
                continue
        raise _wrong_type(path, tp, value)

    if origin is Literal:
        # Compare types too: True == 1 must not match Literal[1].
        if any(value == c and type(value) is type(c) for c in args):
            return value
        near = closest(str(value), [str(c) for c in args]) if isinstance(value, str) else []
        hint = f" Did you mean {near[0]!r}?" if near else ""
        choices = ", ".join(repr(c) for c in args)
        raise ConfigError(f"{path or 'config'}: expected one of {choices}, got {_describe(value)}.{hint}")

    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(path, tp, value)
        item = args[0] if args else Any
        return [_convert(v, item, _join(path, i)) for i, v in enumerate(value)]

    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(path, tp, value)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_convert(v, item, _join(path, i)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{path or 'config'}: expected {_type_name(tp)} ({len(args)} items), got {_describe(value)}"
            )
        return tuple(_convert(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args, strict=True)))

    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(path, tp, value)
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            key = _convert(k, key_tp, _join(path, k))
            out[key] = _convert(v, val_tp, _join(path, k))
        return out

    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            # An empty YAML section ("train:" with its keys commented out) means all defaults.
            value = {}
        if not isinstance(value, Mapping):
            raise _wrong_type(path, tp, value)
        return from_dict(tp, value, path)

    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong_type(path, tp, value)
        return value
    if tp is int:
        # bool is an int subclass; "epochs: true" is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(path, tp, value)
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(path, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _wrong_type(path, tp, value)
        return value

    # A schema bug, not a user error: say which annotation needs support here.
    raise TypeError(f"{path or 'config'}: unsupported field type {tp!r} in the config schema")


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build the dataclass ``cls`` from plain data, recursively, validating keys and types.

    Args:
        cls: A dataclass type whose fields are annotated with supported types (int, float, str,
            bool, None, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, Any,
            Literal, nested dataclasses). Define schema classes at module level: postponed
            annotations are resolved in their module's globals.
        data: The mapping to read, e.g. from ``yaml.safe_load``.
        path: Dotted path of ``data`` in the whole config, used in error messages.

    Returns:
        An instance of ``cls``; fields absent from ``data`` take their defaults.

    Raises:
        ConfigError: On an unknown key (with the allowed keys and the closest match), a value of
            the wrong type, a missing required field or a value rejected by ``__post_init__``;
            the message gives the dotted path, e.g. ``train.optimizer.lr``.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise _wrong_type(path, cls, data)

    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    unknown = [k for k in data if k not in names]
    if unknown:
        lines = []
        for key in unknown:
            near = closest(str(key), names, n=3)
            hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
            where = f"in '{path}'" if path else "at top level"
            lines.append(f"unknown key {str(key)!r} {where} ({_join(path, key)}).{hint}")
        lines.append(f"Allowed keys{f' in {path!r}' if path else ''}: {', '.join(names)}")
        raise ConfigError("\n".join(lines))

    required = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [_join(path, name) for name in required if name not in data]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")

    hints = _hints(cls)
    kwargs = {k: _convert(v, hints[k], _join(path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except _FieldError as e:
        raise ConfigError(f"{_join(path, e.field_name)}: {e.detail}") from None


def to_dict(obj: Any, path: str = "") -> Any:
    """Turn a config dataclass (or any plain data) into YAML-safe dicts, lists and scalars.

    Args:
        obj: A dataclass instance, or nested dicts/lists/tuples of plain values.
        path: Dotted path of ``obj``, used in error messages.

    Returns:
        For a dataclass, a dict with every field (defaults included); tuples become lists.

    Raises:
        ConfigError: If a value (e.g. inside a ``kwargs`` dict) is not plain data.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name), _join(path, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v, _join(path, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, _join(path, i)) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ConfigError(
        f"{path or 'config'}: cannot save a {type(obj).__name__} in a config; use plain data "
        "(numbers, strings, booleans, lists, dicts)"
    )


# --------------------------------------------------------------------------------------------
# Overrides
@dataclass
class DistProConfig:
    """DistPro's search (``kdtune.search.distpro``; papers/distpro.txt §3, Alg. 1): learns α(t) for
    every pathway of the search space and writes ``<run>/process.json``. Needs ``data.val_fraction``
    (0.2 in the paper) for L_val. Retrain with ``distill.weighting: {name: process, kwargs: {file: ...}}``."""

    connections: Literal["all", "j>=i", "same"] = "all"
    """Teacher-stage x student-stage pairs: ``all``, ``j>=i`` (ReviewKD-style) or ``same``."""
    transforms: list[str] = field(default_factory=lambda: ["conv1x1", "conv3x3", "distpro"])
    """Candidate transforms per connection (each one pathway with its own α)."""
    transform_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra arguments per transform, recorded in the process for retraining; e.g. ``{conv3x3: {pool_first:
    true}, distpro: {pool_first: true}}`` runs those adapters at the teacher's resolution (16x cheaper
    from a 28x28 student stage to a 7x7 teacher stage; not Fig. 4's order)."""
    distance: str = "hcl"
    """Distance of every pathway: ``hcl`` (ReviewKD), ``mse``, ``l1``."""
    tap: Literal["pre", "post"] = "pre"
    """Stage value the pathways read: ``pre`` (before the stage's final activation, as ReviewKD's HCL and
    the released DistPro code) or ``post`` (the stage output). Recorded per pathway in the process."""
    logit_pathway: bool = False
    """Add KD on the logits as one more pathway with its own α (a configured ``kd`` logit loss supplies
    its kwargs, else the catalogue's tau 4); recorded in the process and replayed like the others."""
    teacher_stages: list[str] | None = None
    """Teacher module paths of the stages; null finds the stage outputs automatically."""
    student_stages: list[str] | None = None
    """Student module paths of the stages; null finds them automatically."""
    normalization: Literal["biased_softmax", "softmax", "l1_biased", "l1", "raw", "sigmoid"] = "biased_softmax"
    """α from α̃: eq. 2's biased softmax, or a Table 7 alternative."""
    g: float = 1.0
    """Bias of the biased softmax (eq. 2); with ``learn_g`` its initial value."""
    learn_g: bool = False
    """Also learn g with α̃'s hypergradient and optimiser (not in the paper): the pathways' total weight
    Σα = Σe^α̃ / (Σe^α̃ + e^g), which α̃'s updates alone leave near L/(L+1). Biased softmax only."""
    init: float = 1.0
    """Initial α̃ (α₀ = 1, §3.3)."""
    tau: float | None = 0.5
    """A replay of the process skips pathways with α̃ <= tau (§3.4); null keeps all. The search computes all."""
    hypergradient: Literal["finite_difference", "exact"] = "finite_difference"
    """Eq. 5 (finite difference, ε = radius / ‖∇θ' L_val‖) or exact double backward."""
    radius: float = 0.01
    """The 0.01 of ε = 0.01 / ‖∇θ' L_val‖."""
    undo_lr_decay: bool = True
    """Divide the hypergradient by the student's lr schedule factor ξ_t/ξ_0 before α̃'s Adam step: eq. 4's
    hypergradient is ∝ ξ_t, and after a 0.1 step decay Adam (β2 0.999) keeps stepping at the old scale's
    tenth for ~1,000 steps, longer than a short search: α froze at the first milestone
    (:class:`kdtune.search.distpro.DistProSearch`). The default since 2026-12-06; false is the raw form."""
    alpha_optimizer: Literal["adam", "sgd"] = "adam"
    """α's own optimiser (the released code: Adam, betas 0.5, 0.999)."""
    alpha_lr: float = 0.05
    """α's learning rate (§4.1: 0.05)."""
    alpha_betas: tuple[float, float] = (0.5, 0.999)
    """Adam betas of α's optimiser."""
    alpha_weight_decay: float = 0.0
    """L2 decay of α̃ (pulls α̃ to 0, i.e. towards dropping)."""
    export: str | None = None
    """Also copy the finished ``process.json`` to this path (a stable name for retrain configs)."""

    def __post_init__(self) -> None:
        _require(bool(self.transforms), "transforms", "must list at least one transform, e.g. [conv1x1]")
        extra = sorted(set(self.transform_kwargs) - set(self.transforms))
        _require(not extra, "transform_kwargs", f"names transforms that are not candidates: {extra} "
                 f"(transforms: {self.transforms})")
        from kdtune.transforms import check_transform_options  # torch-heavy: only when a section has kwargs

        for name, kwargs in self.transform_kwargs.items():
            try:
                check_transform_options(name, kwargs)
            except (KeyError, ValueError) as e:
                _require(False, "transform_kwargs", str(e).strip("'\""))
        _require(self.radius > 0, "radius", f"must be > 0, got {self.radius}")
        _require(not self.learn_g or self.normalization == "biased_softmax", "learn_g",
                 f"learns the bias of the biased softmax; normalization {self.normalization!r} has none "
                 f"(use normalization: biased_softmax)")
        _require(self.alpha_lr > 0, "alpha_lr", f"must be > 0, got {self.alpha_lr}")
        _require(self.alpha_weight_decay >= 0, "alpha_weight_decay", f"must be >= 0, got {self.alpha_weight_decay}")
        _require(all(0 <= b < 1 for b in self.alpha_betas), "alpha_betas", f"must be in [0, 1), got {self.alpha_betas}")


# --------------------------------------------------------------------------------------------

#: Short override names -> dotted paths, e.g. ``epochs=3`` means ``train.epochs=3``.
ALIASES: dict[str, str] = {
    "epochs": "train.epochs",
    "seed": "seed",
    "weighting": "distill.weighting.name",
    "lr": "train.optimizer.lr",
    "method": "selfdistill.method",
    "process": "distill.weighting.kwargs.file",
    "baseline": "distill.weighting.kwargs.mode",
    "spec": "autokd.spec",  # kdtune run autokd_final.yaml spec=runs/<search>/best.yaml
}


def register_alias(short: str, dotted: str) -> None:
    """Let ``short=value`` stand for ``dotted=value`` in overrides (e.g. ``method``)."""
    if not short or any(c in short for c in ".= "):
        raise ValueError(f"alias must be a plain name without '.', '=' or spaces, got {short!r}")
    if not dotted or "=" in dotted:
        raise ValueError(f"alias target must be a dotted key, got {dotted!r}")
    if ALIASES.get(short, dotted) != dotted:
        warnings.warn(f"override alias {short!r} redefined: {ALIASES[short]!r} -> {dotted!r}", stacklevel=2)
    ALIASES[short] = dotted


def _search_section(key: str, data: Mapping[str, Any]) -> str:
    """``search.<k>`` means ``autokd.<k>`` in an Auto-KD config (one with an ``autokd`` section and no
    ``search`` section), so ``kdtune run autokd_search.yaml search.trials=40`` works as for a weight
    search: "the search" of a config is whichever search it runs."""
    if key.startswith("search.") and "autokd" in data and "search" not in data:
        return "autokd." + key.removeprefix("search.")
    return key


_OVERRIDE_FORM = "expected dotted.key=value, e.g. train.epochs=10 or distill.pathways.0.weight=2"


def _index(part: str, seq: list[Any], key: str, allow_append: bool) -> int:
    """Parse a list index in an override key; ``len(seq)`` appends when ``allow_append``."""
    if not part.isdigit():
        raise ConfigError(f"override {key!r}: {part!r} must be a list index (0..{len(seq) - 1})")
    i = int(part)
    if i < len(seq) or (allow_append and i == len(seq)):
        return i
    raise ConfigError(f"override {key!r}: index {i} out of range, the list has {len(seq)} item(s)")


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of raw config ``data`` with ``dotted.key=value`` overrides applied.

    Values are parsed with ``yaml.safe_load`` (``3``, ``0.1``, ``true``, ``null``, ``[1, 2]``,
    ``{a: 1}``; quote for a string: ``name="'3'"``; an empty value is null). Keys may use
    :data:`ALIASES` and list indices (``distill.pathways.0.weight=2``); index ``len(list)``
    appends a new item; in an Auto-KD config ``search.<key>`` stands for ``autokd.<key>``.
    Missing sections are created, and keys are not checked here: run the result through
    :func:`from_dict`, which rejects unknown keys with the allowed ones.

    Args:
        data: Raw config, e.g. from :func:`load_raw`; not modified.
        overrides: Strings of the form ``dotted.key=value``.

    Returns:
        The updated copy.

    Raises:
        ConfigError: On a malformed override, an unparsable value, a bad list index or a path
            that runs through a scalar.
    """
    out = copy.deepcopy(dict(data))
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"malformed override {override!r}: {_OVERRIDE_FORM}")
        key = _search_section(ALIASES.get(key, key), out)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {override!r}: value is not valid YAML ({e})") from None

        parts = key.split(".")
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                i = _index(part, node, key, allow_append=True)
                if i == len(node):
                    node.append(None)
            elif isinstance(node, dict):
                i = part
            else:
                where = ".".join(parts[:depth])
                raise ConfigError(
                    f"override {override!r}: {where!r} is {_describe(node)}, not a section or a list"
                )
            if last:
                node[i] = value
            else:
                child = node[i] if isinstance(node, list) else node.get(i)
                if child is None:
                    # Create the missing section; a list if the next part is an index.
                    child = node[i] = [] if parts[depth + 1].isdigit() else {}
                node = child
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no tag constructs an object or runs code) that refuses a key given twice
    in one mapping: plain YAML keeps the last value silently, so a pasted block overrides an earlier
    setting without anyone noticing."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; it is not a key
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                line = first_line.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if line != key_node.start_mark.line + 1:
                raise ConfigError(f"{key_node.start_mark.name}: key {key!r} is given twice in one mapping, on lines "
                                  f"{line} and {key_node.start_mark.line + 1}; keep one (YAML would silently "
                                  f"keep the last)")
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(stream: Any) -> Any:
    """``yaml.safe_load`` that raises :class:`ConfigError` on a duplicate key (naming it and both lines)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``top`` over ``base``: nested dicts merge, anything else in ``top`` replaces."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_raw(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config into a plain dict, resolving ``base:`` files (not validated).

    Args:
        path: The YAML file. A top-level ``base`` (a path relative to this file, or a list of
            them, merged in order) is deep-merged under the file's own keys.

    Returns:
        The merged mapping, without the ``base`` key.

    Raises:
        ConfigError: If a file is missing, is not a mapping, or the ``base`` chain loops.
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"config 'base' files form a cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = safe_load_unique(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file; a config is a YAML text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got {_describe(data)}")

    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a file path or a list of them, got {_describe(bases)}")
    merged: dict[str, Any] = {}
    for b in bases:
        merged = _deep_merge(merged, load_raw(path.parent / b, (*_seen, resolved)))
    return _deep_merge(merged, data)


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Load, override and validate a run config.

    Args:
        path: YAML file (may use ``base:``, see :func:`load_raw`).
        overrides: ``dotted.key=value`` strings applied before validation (see
            :func:`apply_overrides`).

    Returns:
        The validated :class:`RunConfig`; an empty ``name`` becomes the file's stem.

    Raises:
        ConfigError: With the file name and the dotted path of the offending key.
    """
    data = apply_overrides(load_raw(path), overrides)
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not cfg.name:
        cfg.name = Path(path).stem
    return cfg


def save_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write a config dataclass as YAML, atomically (temporary file, then ``os.replace``).

    A reader never sees a half-written file, even if the run is killed mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a config is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
