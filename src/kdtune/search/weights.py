"""Search over the fixed path weights v as an Optuna study (Adaptive Distillation §3.3, Fig. 1b).

    kdtune run configs/fmnist/adaptive_search.yaml              # grid over v, then retrain the best
    kdtune run --resume runs/adaptive_search-s0-<stamp>         # continue: the study lives in the run dir
    kdtune run configs/fmnist/adaptive_search.yaml search.storage=postgresql://host/db search.final=false
                                                                # one more worker on a shared study

The paper's "hand-tuned" baseline treats v of eq. 3 (``L_task + alpha v^T f_KD``) as a
hyper-parameter chosen before training — by grid search, random search, or a model-based method
(here TPE). Each trial trains the run's config with weighting ``fixed``, every pathway / logit loss
of path p weighted v_p (a path is a method label — ``at`` is the AT loss of every stage — or a
logit loss, as in :mod:`kdtune.weighting.paths`), alpha taken from the config's weighting kwargs.
A trial's score is the final-epoch top-1 accuracy on the held-out validation split of the training
data (``data.val_fraction``); the test set is never read for selection. With ``search.final`` the
best v is then retrained on the whole training set (no split) in the run directory itself, which
then reads like any run (``summary.json`` with test accuracy, plus a ``search`` entry).

Run directory: ``config.yaml`` (the search config), ``study.db`` (default storage), ``trials/<v>/``
(one plain run directory per distinct v, evaluated on validation), ``search.json`` (all trials,
best v), ``best_config.yaml`` (a plain config reproducing the final run) and the final run's files.

Resuming and sharing: the study is loaded whenever it exists, so running again continues it.
Trials are keyed by their v, so a trial interrupted mid-training resumes from its checkpoint; a
trial whose worker died is marked failed once its heartbeat is ``3 * search.heartbeat`` seconds
old and retried (up to ``search.max_retry`` times) by the next worker to start a trial.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from kdtune import jsonutil
from kdtune.build import make_trainer
from kdtune.config import RunConfig, SearchConfig, StudyConfig, WeightingConfig, save_config
from kdtune.errors import KdtuneError
from kdtune.pathways import Pathway
from kdtune.search.incumbents import (
    INCUMBENT_ATTR,
    KD,
    add_incumbent,
    find_incumbent,
    floor_summary,
    is_incumbent,
    kd_config,
)
from kdtune.weighting.paths import path_of

if TYPE_CHECKING:
    from kdtune.trainer import Callback

#: objective(trial, v) -> score to maximise; v maps path -> weight.
Objective = Callable[[optuna.Trial, dict[str, float]], float]


# --------------------------------------------------------------------------- v <-> config


def config_paths(cfg: RunConfig) -> dict[str, list[str]]:
    """Path -> the config items it weights (``logit_losses.0``, ``pathways.2`` ...), in order.

    A pathway's path is the label of its term name (method, else distance, or its own ``name``
    up to the first ``:``); a logit loss's path is its name.
    """
    out: dict[str, list[str]] = {}
    for i, ll in enumerate(cfg.distill.logit_losses):
        out.setdefault(path_of(ll.name), []).append(f"logit_losses.{i}")
    for i, p in enumerate(cfg.distill.pathways):
        name = Pathway(teacher=p.teacher, student=p.student, method=p.method, transform=p.transform,
                       distance=p.distance, name=p.name).resolved().name
        out.setdefault(path_of(name), []).append(f"pathways.{i}")
    return out


def apply_weights(cfg: RunConfig, v: Mapping[str, float]) -> RunConfig:
    """A copy of ``cfg`` that trains with fixed weights v: weighting ``fixed`` (the config's alpha
    kept), each pathway / logit loss of path p weighted v_p, others unchanged; no ``search``.

    Raises:
        ValueError: a path of v matches nothing in the config (lists the paths it has).
    """
    paths = config_paths(cfg)
    unknown = sorted(set(v) - set(paths))
    if unknown:
        raise ValueError(f"search.space names paths {unknown} that the config does not have; "
                         f"its paths are {sorted(paths)} (method labels of pathways, names of logit losses)")
    out = copy.deepcopy(cfg)
    out.search = None
    for p, items in paths.items():
        if p not in v:
            continue
        for item in items:
            kind, index = item.split(".")
            getattr(out.distill, kind)[int(index)].weight = float(v[p])
    alpha = cfg.distill.weighting.kwargs.get("alpha", 1.0)
    out.distill.weighting = WeightingConfig(name="fixed", kwargs={"alpha": float(alpha)})
    return out


def trial_key(v: Mapping[str, float]) -> str:
    """Directory name of a trial: its v, exactly (``at=1000.0,kd=0.1``)."""
    return ",".join(f"{p}={float(w)!r}" for p, w in sorted(v.items())).replace("/", "_")


# --------------------------------------------------------------------------- the study


def grid_size(space: Mapping[str, Any]) -> int:
    """Number of points of a grid space (every value a list)."""
    return math.prod(len(values) for values in space.values())


def suggest(trial: optuna.Trial, space: Mapping[str, Any]) -> dict[str, float]:
    """v for a trial: a list is a categorical choice (the grid's axes), a range a float."""
    v = {}
    for p, values in space.items():
        if isinstance(values, list):
            v[p] = float(trial.suggest_categorical(p, [float(x) for x in values]))
        else:
            v[p] = trial.suggest_float(p, float(values["low"]), float(values["high"]), log=bool(values.get("log")))
    return v


def make_sampler(spec: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    """grid: every combination of the listed values; random; tpe (Bergstra et al. 2011). Seeded."""
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({p: [float(x) for x in vs] for p, vs in spec.space.items()}, seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


class StudyStorageError(KdtuneError, RuntimeError):
    """The Optuna storage of a search cannot be opened (corrupt file, wrong URL, server down)."""


def open_rdb_study(storage: str, study_name: str, sampler: optuna.samplers.BaseSampler,
                   made_with: Mapping[str, Any], heartbeat: int, max_retry: int) -> optuna.Study:
    """Create a maximising study in an RDB storage, or load it if it exists (resume / another worker).

    Shared by every kdtune search (this weight search, Auto-KD's tree search). The storage is an
    RDB (SQLite file or server URL) with heartbeats, so trials of a dead worker are failed after
    ``3 * heartbeat`` seconds and retried (up to ``max_retry`` times) with the same parameters.
    ``made_with`` (plain data: sampler, space ...) is stored on the study; loading it with different
    settings is an error, so two searches never mix in one study.

    Raises:
        ValueError: the stored study was made with other settings.
    """
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they are what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:  # Optuna >= 4.9
            from optuna.storages import RetryHeartbeatStaleTrialCallback

            retry = {"heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=max_retry)}
        except ImportError:
            from optuna.storages import RetryFailedTrialCallback

            retry = {"failed_trial_callback": RetryFailedTrialCallback(max_retry=max_retry)}
        try:
            # Workers sharing a SQLite file wait for each other's writes; SQLite's default 5 s wait
            # is too short on a loaded machine ("database is locked").
            engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
            rdb = RDBStorage(storage, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                             **retry)
            study = optuna.create_study(storage=rdb, study_name=study_name, direction="maximize",
                                        sampler=sampler, load_if_exists=True)
        except SQLAlchemyError as err:  # a corrupt / truncated SQLite file, an unreachable server ...
            cause = getattr(err, "orig", None) or err  # the driver's own error says it best
            raise StudyStorageError(
                f"cannot open the Optuna study {study_name!r} in {storage}: {type(cause).__name__}: "
                f"{cause}. The file is corrupt or not a study database: restore it from a backup, "
                f"or move it away to start the search over (finished trials' run directories stay in trials/)"
            ) from None
    made_with = json.loads(json.dumps(made_with))
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", made_with)
    elif stored != made_with:
        raise ValueError(f"study {study_name!r} in {storage} was made with {stored}, not {made_with}; "
                         f"give this search another study_name or storage")
    return study


def open_study(spec: SearchConfig, storage: str, study_name: str, seed: int) -> optuna.Study:
    """The weight search's study (:func:`open_rdb_study` with its sampler and space).

    Raises:
        ValueError: the stored study was made with another sampler or space.
    """
    return open_rdb_study(storage, study_name, make_sampler(spec, seed), {"sampler": spec.sampler, "space": spec.space},
                          spec.heartbeat, spec.max_retry)


def count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def optimize_until(study: optuna.Study, func: Callable[[optuna.Trial], float], target: int,
                   catch: tuple[type[Exception], ...] = ()) -> optuna.Study:
    """Run ``func`` trials until the study holds ``target`` complete trials over all workers.

    Stale trials of dead workers are failed first (and re-queued by the retry callback). With
    several workers the total is exactly ``target``: each claimed trial is checked by
    :func:`claim_within_target` before ``func`` runs, so no worker trains a trial beyond it.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # kdtune prints its own line per trial
    # A worker that died left its trial RUNNING; past the grace period it is failed and re-queued.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    remaining = target - count(study, TrialState.COMPLETE)
    if remaining > 0:

        def guarded(trial: optuna.Trial) -> float:
            if is_surplus(study, trial, target):
                trial.set_user_attr(SURPLUS_ATTR, True)
                study.stop()  # the earlier claims finish the study; if one fails, its worker goes on
                raise optuna.TrialPruned(f"trial {trial.number} claimed once {target} trials were complete "
                                         f"or running: not run")
            return func(trial)

        # Each worker runs at most the missing number; the callback stops every worker once the
        # study (all workers together) holds enough complete trials.
        study.optimize(guarded, n_trials=remaining, catch=catch,
                       callbacks=[optuna.study.MaxTrialsCallback(target, states=(TrialState.COMPLETE,))])
    return study


#: User attribute of a trial that was claimed after the target was already covered (pruned, never run).
SURPLUS_ATTR = "surplus"


def is_surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """True if the just-claimed ``trial`` is not needed to reach ``target`` complete trials.

    A worker checks the count, then claims a trial; meanwhile another worker may finish the last
    needed one (the N+1 race). So after the claim the count is taken again: complete trials plus
    trials still RUNNING that were claimed *earlier* (smaller number; the storage numbers trials in
    creation order). If they already make ``target``, ``trial`` is surplus: :func:`optimize_until`
    prunes it before training, marks it :data:`SURPLUS_ATTR` and stops that worker. Ordering by
    number makes the check race-free: of two concurrent claims only the later one counts the
    earlier, so exactly one of them runs when one trial is missing.
    """
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    covered = sum(1 for t in trials if t.state == TrialState.COMPLETE or t.number < trial.number)
    return covered >= target


def run_study(spec: SearchConfig, objective: Objective, storage: str, study_name: str, seed: int = 0,
              catch: tuple[type[Exception], ...] = (), extra_trials: int = 0) -> optuna.Study:
    """Run (or continue) a study until it holds ``n_trials`` (+ ``extra_trials``: incumbents already
    in it) complete trials over all workers.

    Args:
        spec: the ``search`` section (sampler, space, n_trials, heartbeat ...).
        objective: ``objective(trial, v) -> score`` to maximise.
        storage: Optuna RDB URL (``sqlite:///path/study.db``, ``postgresql://...``).
        study_name: name of the study in the storage.
        seed: sampler seed.
        catch: exceptions that fail a trial without stopping the search (e.g. a diverged run).

    Returns:
        The study (completed trials: ``study.best_trial``, ``study.trials``).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(spec, storage, study_name, seed)
    target = (spec.n_trials if spec.n_trials is not None else grid_size(spec.space)) + extra_trials
    return optimize_until(study, lambda trial: objective(trial, suggest(trial, spec.space)), target, catch)


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial: number, state, v, score and run directory (for ``search.json``)."""
    return [{"number": t.number, "state": t.state.name, "incumbent": t.user_attrs.get(INCUMBENT_ATTR),
             "v": t.user_attrs.get("v", t.params), "val_acc": t.value, "run_dir": t.user_attrs.get("run_dir")}
            for t in study.get_trials(deepcopy=False)]


# --------------------------------------------------------------------------- kdtune runs


def open_search_dir(cfg: RunConfig, run_dir: str | Path, study: StudyConfig) -> tuple[Path, str, str]:
    """Create a search's run directory, saving its config once (``--resume`` reads it back), and
    return it with the study's storage URL and name (default: SQLite in the run directory, the run name)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").exists():
        save_config(cfg, run_dir / "config.yaml")
    return run_dir, study.storage_url(run_dir), study.study_name or cfg.name


def train_trial(cfg: RunConfig, v: Mapping[str, float], trials_dir: Path) -> dict[str, Any]:
    """Train ``cfg`` with fixed weights v in ``trials_dir/<v>``, evaluated on the validation split
    (:func:`train_config`)."""
    return train_config(cfg, apply_weights(cfg, v), trials_dir / trial_key(v))


def train_config(cfg: RunConfig, trial_cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Train a trial's config (``cfg``'s trial length) in ``run_dir``, evaluated on the validation split.

    A finished trial directory is reused (the same v asked twice, or a retry of a trial whose
    worker died after training); an interrupted one resumes from its checkpoint.

    Returns:
        The trial's summary, with ``val_acc`` / ``val_agreement_error`` (the trainer's test_* keys
        are validation metrics here) and ``eval_split: "val"``.
    """
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("eval_split") == "val":
            return summary
    trial_cfg = copy.deepcopy(trial_cfg)
    trial_cfg.name = f"{cfg.name}-trial"
    if cfg.search is not None and cfg.search.trial_epochs is not None:
        trial_cfg.train.epochs = cfg.search.trial_epochs
    trainer = make_trainer(trial_cfg, run_dir, eval_split="val")
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(trial_cfg, run_dir / "config.yaml")
    summary = trainer.fit(resume=resume)
    summary.update(eval_split="val", val_acc=summary["test_acc"], val_agreement_error=summary.get("agreement_error"))
    summary_path.write_text(jsonutil.dumps(summary, indent=2) + "\n")
    return summary


def incumbent_configs(cfg: RunConfig) -> dict[str, tuple[RunConfig, dict[str, float] | None]]:
    """Plain KD (``search.kd_incumbent``) and the hand-chosen v of ``search.incumbents``: name -> (config, v)."""
    assert cfg.search is not None
    out: dict[str, tuple[RunConfig, dict[str, float] | None]] = {}
    if cfg.search.kd_incumbent:
        out[KD] = (kd_config(cfg), None)
    for v in cfg.search.incumbents:
        v = {p: float(w) for p, w in v.items()}
        out[f"v:{trial_key(v)}"] = (apply_weights(cfg, v), v)
    return out


def score_incumbents(study: optuna.Study, cfg: RunConfig, run_dir: Path,
                     designs: Mapping[str, tuple[RunConfig, dict[str, float] | None]]) -> dict[str, FrozenTrial]:
    """Train every incumbent not yet in the study like a trial and add it (validation accuracy)."""
    out = {}
    for name, (trial_cfg, v) in designs.items():
        found = find_incumbent(study, name)
        if found is None:
            trial_dir = run_dir / "trials" / f"incumbent-{name.replace(':', '-')}"
            summary = train_config(cfg, trial_cfg, trial_dir)
            print(f"incumbent {name}: val acc {100 * summary['val_acc']:.2f}%", flush=True)
            attrs = {"val_acc": summary["val_acc"], "run_dir": str(trial_dir), "v": v,
                     "train_seconds": summary.get("train_seconds")}
            found = add_incumbent(study, name, summary["val_acc"], attrs)
        out[name] = found
    return out


def run_search(cfg: RunConfig, run_dir: Path,
               callbacks: tuple[Callback, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Search v on the validation split, then (``search.final``) retrain the best v on all training data.

    Args:
        cfg: a run config with a ``search`` section and ``data.val_fraction > 0``.
        run_dir: the search's run directory (created, or continued if it exists).
        callbacks: trainer callbacks of the final run.

    Returns:
        (run_dir, summary): the final run's summary with a ``search`` entry (best v, its validation
        accuracy, trial counts), or only ``{"search": ...}`` without a final run.
    """
    from kdtune.trainer import NonFiniteLossError

    spec = cfg.search
    if spec is None:
        raise ValueError("run_search needs a config with a search section")
    if cfg.data.val_fraction <= 0:
        raise ValueError("a weight search scores trials on a validation split carved from the training data: "
                         "set data.val_fraction > 0 (e.g. 0.2); the test set is never used for selection")
    apply_weights(cfg, {p: 1.0 for p in spec.space})  # fail now, not after a trial, on an unknown path
    designs = incumbent_configs(cfg)
    run_dir, storage, study_name = open_search_dir(cfg, run_dir, spec)
    incumbents = score_incumbents(open_study(spec, storage, study_name, cfg.seed), cfg, run_dir, designs)

    def objective(trial: optuna.Trial, v: dict[str, float]) -> float:
        trial.set_user_attr("run_dir", str(run_dir / "trials" / trial_key(v)))
        summary = train_trial(cfg, v, run_dir / "trials")
        trial.set_user_attr("train_seconds", summary.get("train_seconds"))
        print(f"trial {trial.number}: v = {v}  val acc {100 * summary['val_acc']:.2f}%", flush=True)
        return float(summary["val_acc"])

    study = run_study(spec, objective, storage, study_name, cfg.seed, catch=(NonFiniteLossError,),
                      extra_trials=len(incumbents))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    searched = [t for t in complete if not is_incumbent(t)]
    if not searched:
        raise RuntimeError(f"no trial of study {study_name!r} completed; see the trial run directories in "
                           f"{run_dir / 'trials'}")
    best = study.best_trial  # the best including the incumbents
    name = best.user_attrs.get(INCUMBENT_ATTR)
    floor = floor_summary(best, incumbents.get(KD))
    info = {"study_name": study_name, "storage": storage, "sampler": spec.sampler,
            "best_v": best.user_attrs.get("v") if name is not None else best.params,
            "best_val_acc": best.value, "best_trial": best.number, "chosen": floor["chosen"], "kd_floor": floor,
            "incumbents": {n: t.value for n, t in incumbents.items()}, "complete_trials": len(searched),
            # The search's own cost (the final run's time is its summary's train_seconds).
            "trials_train_seconds": sum(t.user_attrs.get("train_seconds") or 0.0 for t in complete),
            "trials": trials_table(study)}
    (run_dir / "search.json").write_text(jsonutil.dumps(info, indent=2) + "\n")
    print(f"best v = {info['best_v']} ({floor['chosen']})  val acc {100 * best.value:.2f}% "
          f"({len(searched)} trials; {run_dir / 'search.json'})", flush=True)
    if "message" in floor:
        print(floor["message"], flush=True)
    search_summary = {k: v for k, v in info.items() if k != "trials"}
    if not spec.final:
        return run_dir, {"search": search_summary}
    final_cfg = designs[name][0] if name is not None else apply_weights(cfg, best.params)
    return retrain_best(final_cfg, run_dir, callbacks, "search", search_summary)


def retrain_best(final_cfg: RunConfig, run_dir: Path, callbacks: tuple[Callback, ...], key: str,
                 search_summary: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Train a search's winning config on all the training data (no validation split) in the
    search's run directory, resuming if it was interrupted; the summary keeps the search's under ``key``."""
    final_cfg.data.val_fraction = 0.0  # retrain on all the training data, evaluate on test
    trainer = make_trainer(final_cfg, run_dir, callbacks=callbacks)
    save_config(final_cfg, run_dir / "best_config.yaml")  # after prepare: with calibrated weights, if measured
    summary = trainer.fit(resume=(run_dir / "checkpoints" / "last.pt").exists())
    summary[key] = search_summary
    (run_dir / "summary.json").write_text(jsonutil.dumps(summary, indent=2) + "\n")
    return run_dir, summary
