"""Incumbents: plain KD (and hand designs) scored in a search's own study, so automation never returns worse.

A search (Auto-KD, the weight search) first scores the plain KD design -- logits only, KD with
tau = 4 at weight 1 (calibrated if ``distill.calibrate`` is on) -- and any hand design the config
names, with the same proxy and objective as its trials, and adds them to the same Optuna study as
finished trials marked with the user attribute :data:`INCUMBENT_ATTR`. The MCTS tree skips them
(they are no leaf of it); the final choice is the best trial *including* them, and the search
summary says by how much the chosen design beats KD on validation (:func:`floor_summary`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdtune.config import DistillConfig, LogitLossConfig, RunConfig, WeightingConfig

#: User attribute naming an incumbent trial (``"kd"``, or a hand design's name); absent on searched trials.
INCUMBENT_ATTR = "incumbent"
KD = "kd"


def kd_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` distilling with plain KD only: logits, tau 4, weight 1, fixed weighting; no search section.

    ``distill.calibrate`` and ``distill.task_weight`` are kept (the floor is KD as this run would train it).
    """
    out = copy.deepcopy(cfg)
    out.search, out.autokd = None, None
    out.distill = DistillConfig(task_weight=cfg.distill.task_weight,
                                logit_losses=[LogitLossConfig("kd", 1.0, {"tau": 4.0})],
                                weighting=WeightingConfig("fixed"), calibrate=copy.deepcopy(cfg.distill.calibrate))
    return out


def is_incumbent(trial: FrozenTrial) -> bool:
    return INCUMBENT_ATTR in trial.user_attrs


def find_incumbent(study: optuna.Study, name: str) -> FrozenTrial | None:
    """The finished incumbent trial ``name`` of the study (a resumed search does not score it again)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get(INCUMBENT_ATTR) == name:
            return t
    return None


def add_incumbent(study: optuna.Study, name: str, value: float, user_attrs: Mapping[str, Any]) -> FrozenTrial:
    """Add a finished incumbent trial (no parameters: it is no point of the searched space)."""
    study.add_trial(optuna.trial.create_trial(value=float(value), params={}, distributions={},
                                              user_attrs={**user_attrs, INCUMBENT_ATTR: name}))
    found = find_incumbent(study, name)
    assert found is not None
    return found


def floor_summary(best: FrozenTrial, kd: FrozenTrial | None, metric: str = "val_acc") -> dict[str, Any]:
    """How the chosen trial compares with KD on validation: ``{chosen, beats_kd, margin, message}``.

    ``margin`` is the chosen trial's validation ``metric`` (user attribute or, when absent, its value)
    minus KD's; without a KD incumbent only ``chosen`` is given.
    """
    chosen = best.user_attrs.get(INCUMBENT_ATTR, "searched")
    if kd is None:
        return {"chosen": chosen}

    def score(t: FrozenTrial) -> float:
        return float(t.user_attrs.get(metric, t.value))

    margin = score(best) - score(kd)
    if best.number == kd.number:
        message = (f"no searched design beats plain KD on validation (KD {metric} {100 * score(kd):.2f}%, "
                   f"objective {kd.value:.4f}): the final run uses KD")
    else:
        message = (f"the chosen design ({chosen}, trial {best.number}) beats plain KD on the objective "
                   f"({best.value:.4f} vs {kd.value:.4f}); {metric} {100 * score(best):.2f}% vs {100 * score(kd):.2f}% "
                   f"({100 * margin:+.2f} points)")
    return {"chosen": chosen, "beats_kd": best.number != kd.number, "kd_objective": kd.value,
            f"kd_{metric}": score(kd), f"margin_{metric}": margin, "message": message}
