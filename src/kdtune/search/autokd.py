"""Auto-KD: search a distiller design by MCTS with cheap proxies, then distill with it (papers/auto-kd.txt §2).

    kdtune run configs/fmnist/autokd_search.yaml autokd.trials=40          # MCTS over Table 1's space
    kdtune run configs/fmnist/autokd_search.yaml autokd.algorithm=random   # the baseline, same budget
    kdtune run --resume runs/autokd_search-s0-<stamp>                     # continue after an interruption
    kdtune run configs/fmnist/autokd_final.yaml spec=runs/<search>/best.yaml   # full distillation

(The weight search of Adaptive Distillation owns the ``search:`` section, so Auto-KD's settings are
under ``autokd:``.)

A trial trains the student with one leaf of :mod:`kdtune.search.space` under the proxies of
:mod:`kdtune.search.proxies` on a ``autokd.subset`` share of the training split, for
``autokd.epoch_fraction`` of the epochs, and is scored on the held-out validation split
(``data.val_fraction``; never the test set) by the reward of eq. 3,
``R = 1 - (CE_val + L_CKA)``, ``L_CKA = 1 - linear-CKA(f_S, f_T)`` (or Table 9's alternatives).
The study (SQLite in the run directory by default, or ``autokd.storage``) holds the trials; the
tree is rebuilt from them (:mod:`kdtune.search.mcts`), so the search resumes and is shared.

``autokd.space: extended`` searches §2.1's extended space (:mod:`kdtune.search.space`).
``autokd.teachers`` adds teachers (§2.4, eq. 5-6): the student learns from a teacher ensemble
(:mod:`kdtune.search.multiteacher`), every teacher's feature and logit terms weighted by its
train-free factor mu (``layer_weights: train_free``) -- see :class:`DistillPlan`.

Run directory: ``config.yaml``, ``study.db``, ``teacher_cache/`` (offline teacher), ``trials/<spec>/``
(one run per distinct leaf), ``autokd.json`` (trials, rewards, best spec, costs), ``best.yaml``
(the best leaf: a distiller spec), ``tree.png`` and ``rewards.png``; with ``autokd.final`` the run
directory then also holds the final distillation (``best_config.yaml``, ``summary.json`` ...).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn.functional as F
from optuna.trial import FrozenTrial, TrialState
from torch import Tensor, nn

from kdtune import jsonutil
from kdtune.build import build_distiller, build_model, calibrate_run, load_splits, seed_everything
from kdtune.capture import FeatureCapture, Selector, find_stage_outputs
from kdtune.config import ModelConfig, RunConfig
from kdtune.data import BatchLoader, DatasetLoader, dataset_augment, make_loader
from kdtune.distances import cka
from kdtune.distiller import pick_logits
from kdtune.pathways import resolve_stage
from kdtune.search.incumbents import (
    INCUMBENT_ATTR,
    KD,
    add_incumbent,
    find_incumbent,
    floor_summary,
    is_incumbent,
    kd_config,
)
from kdtune.search.mcts import open_tree_study, run_tree_search, tree_statistics
from kdtune.search.multiteacher import ensemble_config, logits_module, member_names
from kdtune.search.proxies import CachedTeacher, SparseStudent, TeacherCache, proxy_budget, proxy_subset, spearman
from kdtune.search.space import DistillerSpec, Level, levels
from kdtune.trainer import Callback, NonFiniteLossError, Trainer

# --------------------------------------------------------------------------- train-free weights (eq. 5-6)


def feature_entropy(f: Tensor) -> Tensor:
    """``D_entropy`` of eq. 6: Shannon entropy (nats) of the softmax-normalised feature, batch mean.

    ``H = -mean_n sum_i p_ni log p_ni``, ``p_n = softmax(vec f_n)`` over the C*H*W values of a sample.

    Shapes: (N, ...) -> 0-dim.
    """
    log_p = F.log_softmax(f.flatten(1), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


@torch.no_grad()
def train_free_weights(student: nn.Module, teacher: nn.Module, x: Tensor, student_layers: Sequence[str],
                       teacher_layers: Sequence[str]) -> list[float]:
    """Train-free factors ``mu_q = H(f_T^q) * CKA(f_S^q, f_T^q)`` (Auto-KD eq. 6), one per layer pair.

    Computed once, before training, from the (initial) student and the teacher on the batch ``x``
    (N, C, H, W); CKA is linear CKA (Kornblith et al. 2019), 1 - :func:`kdtune.distances.cka`.
    Works for pairs from different teachers too: call it per teacher and concatenate. The paper
    does not normalise mu; neither do we (the searched W_f multiplies it, eq. 5).

    Args:
        student, teacher: the models (put in eval mode for the probe, then restored).
        x: a batch of training inputs.
        student_layers, teacher_layers: paired module paths (``stage:<i>`` allowed).
    """
    s_paths = _resolve(student, x, student_layers, "student")
    t_paths = _resolve(teacher, x, teacher_layers, "teacher")
    s_feats, t_feats = _features(student, x, s_paths), _features(teacher, x, t_paths)
    return [float(feature_entropy(t_feats[t]) * (1.0 - cka(s_feats[s], t_feats[t])))
            for s, t in zip(s_paths, t_paths, strict=True)]


def _resolve(model: nn.Module, x: Tensor, paths: Sequence[str], role: str) -> list[str]:
    stages = find_stage_outputs(model, x[:2]) if any(p.startswith("stage:") for p in paths) else []
    return [resolve_stage(p, stages, role) for p in paths]


def _features(model: nn.Module, x: Tensor, paths: Sequence[str]) -> dict[str, Tensor]:
    was = model.training
    model.eval()
    with FeatureCapture(model, list(dict.fromkeys(paths)), detach=True) as cap:
        model(x)
        out = {p: cap[p] for p in paths}
    model.train(was)
    return out


# --------------------------------------------------------------------------- reward (eq. 3, Table 9)

#: Reward of a diverged trial (non-finite loss or reward), and the lowest reward a trial can get:
#: eq. 3 is unbounded below when CE explodes, and one such trial would swamp a node's mean reward.
#: (A student that predicts uniformly over 10 classes scores about 1 - (2.3 + 1) = -2.3.)
REWARD_FLOOR = -5.0



@torch.no_grad()
def reward_metrics(student: nn.Module, teacher: nn.Module, loader: BatchLoader | DatasetLoader,
                   student_layers: Sequence[str], teacher_layers: Sequence[str],
                   max_cka_samples: int = 1000, student_output: Selector = None,
                   teacher_output: Selector = None) -> dict[str, float]:
    """Validation metrics a reward is made of.

    Returns ``ce`` (mean CE), ``acc``, ``cka`` (linear CKA of the raw features, mean over the layer
    pairs, on the first ``max_cka_samples`` samples), ``l1`` (``mean_n ||softmax(p_S) - softmax(p_T)||_1``,
    Table 9's L1 to the teacher; the paper does not say on what, we use the outputs). The logits
    are read through ``student_output`` / ``teacher_output`` (the configs' ``output``).
    """
    device = next(student.parameters()).device  # the loader yields CPU batches; the models may be on a GPU
    x0 = next(iter(loader))[0].to(device)
    s_paths = _resolve(student, x0, student_layers, "student")
    t_paths = _resolve(teacher, x0, teacher_layers, "teacher")
    was = student.training
    student.eval()
    ce_sum, correct, l1_sum, n = 0.0, 0, 0.0, 0
    s_keep: dict[str, list[Tensor]] = {p: [] for p in s_paths}
    t_keep: dict[str, list[Tensor]] = {p: [] for p in t_paths}
    with FeatureCapture(student, list(dict.fromkeys(s_paths)), detach=True) as s_cap, \
            FeatureCapture(teacher, list(dict.fromkeys(t_paths)), detach=True) as t_cap:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            ps = pick_logits(student(x), student_output, f"student {type(student).__name__}", "student.output={}")
            pt = pick_logits(teacher(x), teacher_output, f"teacher {type(teacher).__name__}", "teacher.output={}")
            ce_sum += float(F.cross_entropy(ps, y, reduction="sum"))
            correct += int((ps.argmax(1) == y).sum())
            l1_sum += float((ps.softmax(1) - pt.softmax(1)).abs().sum())
            if n < max_cka_samples:  # once per module: several teachers pair with the same student layer
                for p in s_keep:
                    s_keep[p].append(s_cap[p].float().flatten(1))
                for p in t_keep:
                    t_keep[p].append(t_cap[p].float().flatten(1))
            n += len(y)
    student.train(was)
    ckas = [1.0 - float(cka(torch.cat(s_keep[s])[:max_cka_samples], torch.cat(t_keep[t])[:max_cka_samples]))
            for s, t in zip(s_paths, t_paths, strict=True)]
    return {"ce": ce_sum / n, "acc": correct / n, "cka": sum(ckas) / len(ckas), "l1": l1_sum / n}


def reward_from(metrics: dict[str, float], kind: str) -> float:
    """Eq. 3 ``1 - (CE + (1 - CKA))`` (``ce_cka``), or ``acc``, ``ce`` (1 - CE), ``ce_l1`` (1 - (CE + L1)).

    A non-finite or lower value becomes :data:`REWARD_FLOOR`.
    """
    if kind == "ce_cka":
        r = 1.0 - (metrics["ce"] + (1.0 - metrics["cka"]))
    elif kind == "ce":
        r = 1.0 - metrics["ce"]
    elif kind == "ce_l1":
        r = 1.0 - (metrics["ce"] + metrics["l1"])
    elif kind == "acc":
        r = metrics["acc"]
    else:
        raise ValueError(f"unknown reward {kind!r}; choose ce_cka, acc, ce or ce_l1")
    return max(REWARD_FLOOR, r) if math.isfinite(r) else REWARD_FLOOR


# --------------------------------------------------------------------------- configs


def _autokd(cfg: RunConfig):
    if cfg.autokd is None:
        raise ValueError("this needs a config with an autokd section")
    return cfg.autokd


@dataclass
class DistillPlan:
    """Where the config distils, resolved: layer pairs over all teachers and their eq. 6 factors.

    Attributes:
        teacher_layers, student_layers: paired module paths; with several teachers, teacher paths
            are inside the :class:`~kdtune.search.multiteacher.TeacherEnsemble` (``<member>.<path>``)
            and every ``autokd`` layer pair is repeated for each teacher, teacher by teacher.
        mu: one factor per pair (eq. 6), or None (``layer_weights: equal``).
        members: member names, one per teacher; empty with one teacher (no ensemble).
        member_of: index into ``members`` of each pair's teacher.
        member_outputs: where each teacher's logits are in its output (its config's ``output``).
        student_logits: the student's logit module (several teachers: per-teacher logit terms).
    """

    teacher_layers: list[str]
    student_layers: list[str]
    mu: list[float] | None
    members: list[str] = field(default_factory=list)
    member_of: list[int] = field(default_factory=list)
    member_outputs: list[Selector] = field(default_factory=list)
    student_logits: str | None = None

    def member_mu(self) -> list[float]:
        """mu_j of each teacher for its logit term: the mean of its pairs' factors (1 without mu).

        Eq. 5-6 define mu per feature pair; a teacher's logit term takes the mean over its pairs,
        which is its pair's mu with one layer pair per teacher.
        """
        if self.mu is None:
            return [1.0] * len(self.members)
        return [sum(m for m, j in zip(self.mu, self.member_of, strict=True) if j == k)
                / self.member_of.count(k) for k in range(len(self.members))]


def _teachers(cfg: RunConfig) -> list[ModelConfig]:
    if cfg.teacher is None:
        raise ValueError("Auto-KD distils from a teacher: the config has none")
    return [cfg.teacher, *_autokd(cfg).teachers]


def make_plan(cfg: RunConfig) -> DistillPlan:
    """The :class:`DistillPlan` of a config: its ``autokd`` layer pairs and (``train_free``) eq. 6 factors.

    mu is computed from the seeded initial student and each teacher on the first training batch.
    With one teacher the layer paths stay as written (``stage:<i>`` resolved by the distiller); with
    several, each teacher's ``stage:<i>`` is resolved in that teacher, and every model's logits are
    found through its ``output`` (a wrong one fails here, in one line naming its config key).
    """
    ak = _autokd(cfg)
    teachers = _teachers(cfg)
    if len(teachers) == 1:
        mu = compute_mu(cfg) if ak.layer_weights == "train_free" else None
        return DistillPlan(list(ak.teacher_layers), list(ak.student_layers), mu)
    student, models, x = _probe_models(cfg, teachers)
    names = member_names(teachers)
    plan = DistillPlan([], [], [] if ak.layer_weights == "train_free" else None, names,
                       member_outputs=[mc.output for mc in teachers],
                       student_logits=logits_module(student, x, cfg.student.output, "student"))
    s_paths = _resolve(student, x, ak.student_layers, "student")
    keys = ["teacher", *(f"autokd.teachers.{i}" for i in range(len(teachers) - 1))]
    for j, (name, mc, key, teacher) in enumerate(zip(names, teachers, keys, models, strict=True)):
        _check_logits(teacher, x, mc.output, key)
        t_paths = _resolve(teacher, x, ak.teacher_layers, f"teacher {name}")
        plan.teacher_layers += [f"{name}.{p}" for p in t_paths]
        plan.student_layers += s_paths
        plan.member_of += [j] * len(t_paths)
        if plan.mu is not None:
            plan.mu += train_free_weights(student, teacher, x, s_paths, t_paths)
    return plan


def spec_config(cfg: RunConfig, spec: DistillerSpec | None = None, plan: DistillPlan | None = None) -> RunConfig:
    """The plain run config that distils with ``spec`` (default: the file ``autokd.spec``).

    ``plan`` defaults to :func:`make_plan` (layer pairs, mu of eq. 6 with ``layer_weights:
    train_free``). With ``autokd.teachers`` the teacher becomes a teacher ensemble and every teacher
    j gets its terms weighted by mu (eq. 5): ``sum_j mu_j [W_f D_f + W_p D_p]``. The result has no
    ``autokd`` section: it is a plain run (its ``config.yaml`` resumes without the spec file).
    """
    ak = _autokd(cfg)
    if spec is None:
        if ak.spec is None:
            raise ValueError("autokd.spec is not set: give spec=<path to a distiller spec YAML, e.g. best.yaml>")
        spec = DistillerSpec.load(ak.spec)
    teachers = _teachers(cfg)
    plan = make_plan(cfg) if plan is None else plan
    if plan.members:
        out = spec.apply(copy.deepcopy(cfg), plan.teacher_layers, plan.student_layers, plan.mu,
                         list(zip(plan.members, plan.member_mu(), plan.member_outputs, strict=True)),
                         plan.student_logits)
        out.teacher = ensemble_config(teachers)
    else:
        out = spec.apply(copy.deepcopy(cfg), plan.teacher_layers, plan.student_layers, plan.mu)
    out.autokd = None
    return out


@torch.no_grad()
def _check_logits(model: nn.Module, x: Tensor, output: Selector, key: str) -> None:
    """Run ``model`` on ``x`` in eval mode; its logits must be where ``output`` (config ``<key>.output``) says."""
    was = model.training
    model.eval()
    try:
        pick_logits(model(x), output, f"{key} {type(model).__name__}", f"{key}.output={{}}")
    finally:
        model.train(was)


def _probe_models(cfg: RunConfig, teachers: Sequence[ModelConfig]) -> tuple[nn.Module, list[nn.Module], Tensor]:
    """The seeded initial student (as the run builds it), the teachers, and the first training batch."""
    seed_everything(cfg.seed)
    splits = load_splits(cfg)
    student = build_model(cfg.student, splits.train.in_channels, splits.train.num_classes)
    models = [build_model(mc, splits.train.in_channels, splits.train.num_classes) for mc in teachers]
    x, _ = next(iter(make_loader(splits.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed)))
    return student, models, x


def compute_mu(cfg: RunConfig) -> list[float]:
    """Eq. 6 factors for the config's layer pairs (one teacher), from its seeded student, teacher and first batch."""
    ak = _autokd(cfg)
    assert cfg.teacher is not None
    student, (teacher,), x = _probe_models(cfg, [cfg.teacher])
    return train_free_weights(student, teacher, x, ak.student_layers, ak.teacher_layers)


# --------------------------------------------------------------------------- one trial


class TrialContext:
    """What every trial of one search shares: data, proxy loaders and budget, teacher cache, mu."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        ak = _autokd(cfg)
        if cfg.data.val_fraction <= 0:
            raise ValueError("Auto-KD scores trials on a validation split carved from the training data: set "
                             "data.val_fraction > 0 (e.g. 0.2); the test set is never used for selection")
        if cfg.teacher is None:
            raise ValueError("Auto-KD distils from a teacher: the config has none")
        self.cfg, self.run_dir = cfg, run_dir
        splits = load_splits(cfg)
        assert splits.val is not None
        self.full_train = splits.train
        self.subset, self.epochs, self.budget_note = proxy_budget(
            len(splits.train), cfg.data.batch_size, cfg.train.epochs, ak.subset, ak.epoch_fraction, ak.min_steps)
        if self.budget_note is not None:
            print(self.budget_note, flush=True)
        self.train = proxy_subset(splits.train, self.subset, cfg.data.split_seed)
        self.val = splits.val
        self.input_shape = self.train.input_shape
        self.plan = make_plan(cfg)
        self.cache: TeacherCache | None = None
        self.cache_seconds = 0.0
        if ak.cache:
            probe_cfg = spec_config(cfg, DistillerSpec(), self.plan)
            distiller = build_distiller(probe_cfg, self.train.in_channels, self.train.num_classes, self.input_shape)
            self.cache = TeacherCache(run_dir / "teacher_cache", self.train_loader(), self.epochs)
            self.cache_seconds = self.cache.build(distiller)

    @property
    def proxy_steps(self) -> int:
        """Optimiser steps of one proxy trial."""
        return self.epochs * len(self.train_loader())

    def train_loader(self, full: bool = False) -> BatchLoader | DatasetLoader:
        d = self.cfg.data
        return make_loader(self.full_train if full else self.train, d.batch_size, shuffle=True, seed=self.cfg.seed,
                           workers=d.workers, drop_last=d.drop_last,
                           augment=dataset_augment(d.dataset, d.crop_padding, d.flip))

    def val_loader(self) -> BatchLoader | DatasetLoader:
        return make_loader(self.val, self.cfg.data.eval_batch_size, shuffle=False, workers=self.cfg.data.workers)

    def spec_config(self, spec: DistillerSpec) -> RunConfig:
        """The plain run config of a searched (or hand-written) design."""
        return spec_config(self.cfg, spec, self.plan)

    def trainer(self, trial_cfg: RunConfig, run_dir: Path | None, full: bool = False) -> Trainer:
        """A trainer of ``trial_cfg`` under the proxies (``full=True``: all the training split, the full
        epochs, no cache, dense student -- the fidelity check's reference)."""
        ak = _autokd(self.cfg)
        trial_cfg = copy.deepcopy(trial_cfg)
        trial_cfg.train.epochs = self.cfg.train.epochs if full else self.epochs
        trial_cfg.train.progress = False
        seed_everything(self.cfg.seed)
        distiller = build_distiller(trial_cfg, self.train.in_channels, self.train.num_classes, self.input_shape)
        callbacks: list[Callback] = []
        if not full and self.cache is not None:
            callbacks.append(CachedTeacher(self.cache))
        if not full and ak.sparsity > 0:
            callbacks.append(SparseStudent(ak.sparsity, ak.regrow_every, ak.regrow_fraction, seed=self.cfg.seed))
        trainer = Trainer(distiller, self.train_loader(full), self.val_loader(), trial_cfg.train, run_dir=run_dir,
                          callbacks=callbacks, seed=self.cfg.seed)
        calibrate_run(trial_cfg, trainer)  # W_f / W_p then multiply the calibrated weights
        return trainer

    def evaluate(self, trial_cfg: RunConfig, run_dir: Path | None = None, spec: DistillerSpec | None = None,
                 full: bool = False) -> dict[str, Any]:
        """Train ``trial_cfg`` (proxy, or ``full``) and score it on validation; a finished trial dir is reused."""
        ak = _autokd(self.cfg)
        summary_path = run_dir / "summary.json" if run_dir is not None else None
        if summary_path is not None and summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if "reward_metrics" in summary:
                summary["reward"] = reward_from(summary["reward_metrics"], ak.reward)
                return summary
        trainer = self.trainer(trial_cfg, run_dir, full)
        if run_dir is not None and spec is not None:
            spec.save(run_dir / "spec.yaml")
        summary = trainer.fit()
        d = trainer.distiller
        assert d.teacher is not None
        summary["reward_metrics"] = reward_metrics(
            d.student, d.teacher, self.val_loader(), self.plan.student_layers, self.plan.teacher_layers,
            student_output=d.output_selectors["student"], teacher_output=d.output_selectors["teacher"])
        summary["reward"] = reward_from(summary["reward_metrics"], ak.reward)
        summary["eval_split"] = "val"
        if summary_path is not None:
            summary_path.write_text(jsonutil.dumps(summary, indent=2) + "\n")
        return summary

    def score(self, trial_cfg: RunConfig, run_dir: Path, label: str, spec: DistillerSpec | None = None,
              full: bool = False) -> tuple[float, dict[str, Any]]:
        """(reward, user attributes) of one design; a diverged one gets :data:`REWARD_FLOOR`."""
        try:
            summary = self.evaluate(trial_cfg, run_dir, spec, full)
        except NonFiniteLossError as err:
            # A distiller that diverges is a bad leaf, not a broken trial: it gets the floor reward, so
            # the tree learns to avoid its branch (a failed trial would leave the leaf untried forever).
            print(f"{label} diverged ({err}); reward {REWARD_FLOOR}", flush=True)
            return REWARD_FLOOR, {"diverged": True, "run_dir": str(run_dir)}
        reward = summary["reward"]  # floored by reward_from
        acc = summary["reward_metrics"]["acc"]
        print(f"{label}  reward {reward:.4f}  val acc {100 * acc:.2f}%", flush=True)
        return float(reward), {"train_seconds": summary.get("train_seconds"), "val_acc": acc, "run_dir": str(run_dir)}


# --------------------------------------------------------------------------- the search


def incumbent_designs(ctx: TrialContext) -> dict[str, tuple[RunConfig, DistillerSpec | None]]:
    """Plain KD (``autokd.kd_incumbent``) and the hand designs of ``autokd.incumbents``: name -> (config, spec)."""
    ak = _autokd(ctx.cfg)
    designs: dict[str, tuple[RunConfig, DistillerSpec | None]] = {}
    if ak.kd_incumbent:
        designs[KD] = (kd_config(ctx.cfg), None)
    for path in ak.incumbents:
        spec = DistillerSpec.load(path)
        designs[f"spec:{Path(path).stem}"] = (ctx.spec_config(spec), spec)
    return designs


def score_incumbents(study: optuna.Study, ctx: TrialContext,
                     designs: dict[str, tuple[RunConfig, DistillerSpec | None]]) -> dict[str, FrozenTrial]:
    """Score every incumbent design not yet in the study, with the trials' proxy and reward, and add it."""
    out = {}
    for name, (trial_cfg, spec) in designs.items():
        found = find_incumbent(study, name)
        if found is None:
            trial_dir = ctx.run_dir / "trials" / f"incumbent-{name.replace(':', '-')}"
            reward, attrs = ctx.score(trial_cfg, trial_dir, f"incumbent {name}", spec)
            found = add_incumbent(study, name, reward, attrs)
        out[name] = found
    return out


def proxy_warning(kd: FrozenTrial | None, num_classes: int, ctx: TrialContext) -> str | None:
    """A message when plain KD's proxy accuracy is near chance (< 1.5 / K): the proxy then ranks noise."""
    if kd is None or kd.user_attrs.get("val_acc") is None:
        return None
    acc, chance = float(kd.user_attrs["val_acc"]), 1.0 / num_classes
    if acc >= 1.5 * chance:
        return None
    ak = _autokd(ctx.cfg)
    return (f"autokd proxy is uninformative: plain KD reaches {100 * acc:.1f}% validation accuracy after "
            f"{ctx.proxy_steps} optimiser steps on {len(ctx.train)} images, near chance ({100 * chance:.1f}%), so the "
            f"trials' rewards rank noise. Give the proxy more training: raise autokd.min_steps (now {ak.min_steps}), "
            f"autokd.subset (now {ctx.subset:g}) or autokd.epoch_fraction (now {ak.epoch_fraction:g}), or train.epochs")


def fidelity_check(study: optuna.Study, ctx: TrialContext, k: int,
                   designs: dict[str, tuple[RunConfig, DistillerSpec | None]]) -> dict[str, Any]:
    """Train the top-``k`` designs by proxy reward in full (all the training split, full epochs, no
    proxies); Spearman's rho between their proxy rewards and full validation accuracies."""
    done = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
                  key=lambda t: -float(t.value))
    rows = []
    for t in done[:k]:
        name = t.user_attrs.get(INCUMBENT_ATTR)
        spec = None if name is not None else DistillerSpec.from_choices(t.params)
        trial_cfg = designs[name][0] if name is not None else ctx.spec_config(spec)
        label = name or spec.key()
        trial_dir = ctx.run_dir / "fidelity" / label.replace(":", "-")
        _, attrs = ctx.score(trial_cfg, trial_dir, f"fidelity: {label} trained in full", spec, full=True)
        rows.append({"design": label, "trial": t.number, "proxy_reward": float(t.value),
                     "full_val_acc": attrs.get("val_acc", 0.0)})
    rho = spearman([r["proxy_reward"] for r in rows], [r["full_val_acc"] for r in rows])
    print(f"fidelity check: Spearman rho {rho:.3f} between proxy reward and full validation accuracy "
          f"over the top {len(rows)} designs", flush=True)
    return {"k": len(rows), "spearman_rho": rho, "designs": rows}


def run_autokd(cfg: RunConfig, run_dir: Path, callbacks: tuple[Callback, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Score the incumbents (plain KD, hand designs), search the distiller space (or continue the search),
    write the best spec, then (``final``) distil with the best design including the incumbents.

    Returns:
        (run_dir, summary): the final run's summary with an ``autokd`` entry, or only ``{"autokd": ...}``.
    """
    from kdtune.search.weights import open_search_dir, retrain_best

    ak = _autokd(cfg)
    if ak.spec is not None:
        raise ValueError("autokd.spec is set: this config trains with a spec; run it with `kdtune run` "
                         "(recipe.run), not run_autokd")
    run_dir, storage, study_name = open_search_dir(cfg, run_dir, ak)
    ctx = TrialContext(cfg, run_dir)
    space = levels(ak.logits, ak.space)
    study = open_tree_study(space, storage, study_name, ak.algorithm, ak.exploration, cfg.seed, ak.heartbeat,
                            ak.max_retry)
    designs = incumbent_designs(ctx)
    incumbents = score_incumbents(study, ctx, designs)
    warning = proxy_warning(incumbents.get(KD), ctx.train.num_classes, ctx)
    if warning is not None:
        print(f"WARNING: {warning}", flush=True)

    def objective(trial: optuna.Trial, choices: dict[str, Any]) -> float:
        spec = DistillerSpec.from_choices(choices)
        trial_dir = run_dir / "trials" / spec.key()
        trial.set_user_attr("run_dir", str(trial_dir))
        reward, attrs = ctx.score(ctx.spec_config(spec), trial_dir, f"trial {trial.number}: {spec.key()}", spec)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return reward

    # Incumbents are complete trials of the study: the target counts them on top of autokd.trials.
    study = run_tree_search(objective, space, storage, study_name, ak.trials + len(incumbents), ak.algorithm,
                            ak.exploration, cfg.seed, ak.heartbeat, ak.max_retry)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    searched = [t for t in complete if not is_incumbent(t)]
    if not searched:
        raise RuntimeError(f"no trial of study {study_name!r} completed; see {run_dir / 'trials'}")
    best = max(searched, key=lambda t: float(t.value))
    best_spec = DistillerSpec.from_choices(best.params)
    best_spec.save(run_dir / "best.yaml")
    if ak.export is not None:
        best_spec.save(ak.export)
    chosen = study.best_trial  # the best including the incumbents
    floor = floor_summary(chosen, incumbents.get(KD))
    info = {"study_name": study_name, "storage": storage, "algorithm": ak.algorithm, "reward": ak.reward,
            "space": ak.space, "teachers": ctx.plan.members or [_teachers(cfg)[0].name],
            "best_spec": best_spec.to_dict(), "best_reward": best.value, "best_trial": best.number,
            "chosen": floor["chosen"], "chosen_trial": chosen.number, "kd_floor": floor,
            "incumbents": {n: {"reward": t.value, "val_acc": t.user_attrs.get("val_acc")}
                           for n, t in incumbents.items()},
            "proxy_warning": warning, "proxy_budget_note": ctx.budget_note,
            "complete_trials": len(searched), "proxy_epochs": ctx.epochs, "proxy_subset": ctx.subset,
            "proxy_train_images": len(ctx.train), "proxy_steps": ctx.proxy_steps,
            "cache_build_seconds": ctx.cache_seconds, "mu": ctx.plan.mu,
            "trials_train_seconds": sum(t.user_attrs.get("train_seconds") or 0.0 for t in complete),
            "trials": trials_table(study)}
    if ak.fidelity_check:
        info["fidelity"] = fidelity_check(study, ctx, ak.fidelity_check, designs)
    (run_dir / "autokd.json").write_text(jsonutil.dumps(info, indent=2) + "\n")
    plot_search(run_dir, space)
    print(f"best spec {best_spec.key()}  reward {best.value:.4f} ({len(searched)} trials; {run_dir / 'best.yaml'})",
          flush=True)
    if "message" in floor:
        print(floor["message"], flush=True)
    search_summary = {k: v for k, v in info.items() if k != "trials"}
    if not ak.final:
        return run_dir, {"autokd": search_summary}
    name = chosen.user_attrs.get(INCUMBENT_ATTR)
    final_cfg = designs[name][0] if name is not None else ctx.spec_config(best_spec)
    return retrain_best(final_cfg, run_dir, callbacks, "autokd", search_summary)


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial: number, state, choices, reward, validation accuracy, seconds, run directory."""
    return [{"number": t.number, "state": t.state.name, "incumbent": t.user_attrs.get(INCUMBENT_ATTR),
             "choices": t.params, "reward": t.value,
             "val_acc": t.user_attrs.get("val_acc"), "train_seconds": t.user_attrs.get("train_seconds"),
             "mcts_depth": t.system_attrs.get("mcts:depth"), "run_dir": t.user_attrs.get("run_dir")}
            for t in study.get_trials(deepcopy=False)]


# --------------------------------------------------------------------------- report


def plot_search(run_dir: str | Path, space: Sequence[Level] | None = None, max_depth: int = 3) -> list[Path]:
    """``tree.png`` (explored tree: visits and mean reward per node) and ``rewards.png`` (reward per trial).

    The tree is rebuilt from ``autokd.json`` exactly as MCTS sees it (back-propagation to each
    trial's expansion depth); nodes deeper than ``max_depth`` are left out to keep it readable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import create_trial

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "autokd.json").read_text())
    done = [t for t in info["trials"]
            if t["state"] == "COMPLETE" and t["reward"] is not None and not t.get("incumbent")]
    if space is None:
        space = levels("logit_distance" in (done[0]["choices"] if done else {"logit_distance": 1}),
                       info.get("space", "table1"))
    frozen = [create_trial(params=t["choices"], value=t["reward"], system_attrs=(
        {"mcts:depth": t["mcts_depth"]} if t.get("mcts_depth") is not None else {}),
        distributions={lv.name: optuna.distributions.CategoricalDistribution(list(lv.choices)) for lv in space})
        for t in done]
    stats = tree_statistics(frozen, space, virtual_loss=False)

    # Tree: nodes placed by depth (rows) and order of their leaf ranges (columns).
    depth = min(max_depth, len(space))
    nodes = sorted((p for p in stats if len(p) <= depth), key=lambda p: (len(p), p))
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * sum(1 for p in nodes if len(p) == depth)), 1.8 * (depth + 1)))
    pos: dict[tuple[int, ...], tuple[float, float]] = {}
    for d in range(depth + 1):
        row = [p for p in nodes if len(p) == d]
        for i, p in enumerate(row):
            pos[p] = ((i + 0.5) / max(len(row), 1), -d)
    means = [stats[p].mean for p in nodes]
    lo, hi = (min(means), max(means)) if means else (0.0, 1.0)
    cmap = plt.get_cmap("viridis")
    for p in nodes:
        x, y = pos[p]
        if len(p) > 0:
            px, py = pos[p[:-1]]
            ax.plot([px, x], [py, y], color="0.7", lw=0.8, zorder=1)
        st = stats[p]
        c = cmap((st.mean - lo) / (hi - lo) if hi > lo else 0.5)
        ax.scatter([x], [y], s=60 + 25 * math.sqrt(st.visits), color=c, zorder=2)
        label = "root" if not p else str(space[len(p) - 1].choices[p[-1]])
        ax.annotate(f"{label}\nN={st.visits} R={st.mean:.3f}", (x, y), fontsize=6, ha="center", va="top",
                    xytext=(0, -7), textcoords="offset points")
    ax.set_yticks([-d for d in range(depth + 1)], ["root"] + [space[d].name for d in range(depth)])
    ax.set_xticks([])
    ax.set_title(f"Auto-KD search tree ({info['algorithm']}, {len(done)} trials): visits N, mean reward R")
    fig.tight_layout()
    tree_png = run_dir / "tree.png"
    fig.savefig(tree_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [t["number"] for t in done]
    ys = [t["reward"] for t in done]
    best = [max(ys[: i + 1]) for i in range(len(ys))]
    ax.scatter(xs, ys, s=12, label="trial reward")
    ax.plot(xs, best, color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"reward ({info['reward']})")
    ax.legend()
    fig.tight_layout()
    rewards_png = run_dir / "rewards.png"
    fig.savefig(rewards_png, dpi=120)
    plt.close(fig)
    return [tree_png, rewards_png]
