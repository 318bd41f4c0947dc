"""The KD floor: plain KD (and hand designs) in a search's own study; proxies long enough to rank anything."""

from __future__ import annotations

import json
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import create_trial

from helpers import tiny_autokd
from kdtune.config import ConfigError, RunConfig, from_dict
from kdtune.search import autokd, weights
from kdtune.search.incumbents import INCUMBENT_ATTR, add_incumbent, find_incumbent, floor_summary, kd_config
from kdtune.search.mcts import tree_statistics
from kdtune.search.proxies import proxy_budget, spearman
from kdtune.search.space import LEVELS, DistillerSpec


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# --------------------------------------------------------------------------- proxy budget


def test_a_too_small_proxy_is_raised_to_the_minimum_steps_with_a_message():
    # 4000 images, batch 128, 30 epochs; 0.2 x 0.2: 800 images = 7 batches x 6 epochs = 42 steps < 150.
    subset, epochs, message = proxy_budget(4000, 128, 30, 0.2, 0.2, 150)
    assert (subset, epochs) == (0.8, 6)  # 3200 images = 25 batches x 6 epochs = 150 steps
    assert "42 optimiser steps < autokd.min_steps 150" in message and "raised subset to 0.8 and epochs to 6" in message
    # Subset first, then epochs: 400 images at batch 128 are 4 batches, 150 steps need 38 epochs; 30 is the run.
    subset, epochs, message = proxy_budget(400, 128, 30, 0.2, 0.2, 150)
    assert (subset, epochs) == (1.0, 30) and "never trains longer" in message
    assert proxy_budget(400, 128, 30, 0.2, 0.2, 100) == (1.0, 25, proxy_budget(400, 128, 30, 0.2, 0.2, 100)[2])
    assert proxy_budget(4000, 128, 30, 0.2, 0.2, 42) == (0.2, 6, None)  # enough already: unchanged, silent


def test_min_steps_and_fidelity_check_are_validated():
    base = {"student": {"name": "resnet8"}, "teacher": {"name": "resnet8"}}
    with pytest.raises(ConfigError, match="autokd.min_steps: must be >= 1"):
        from_dict(RunConfig, {**base, "autokd": {"min_steps": 0}})
    with pytest.raises(ConfigError, match="autokd.fidelity_check: must be 0 .off. or >= 2"):
        from_dict(RunConfig, {**base, "autokd": {"fidelity_check": 1}})


def test_spearman_by_hand():
    # One swapped pair of 4: rho = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8.
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    # Ties get mean ranks: x ranks (1.5, 1.5, 3), y ranks (3, 2, 1): cov -1.5, var 1.5 and 2 -> -1.5 / sqrt(3).
    assert spearman([1, 1, 2], [3, 2, 1]) == pytest.approx(-1.5 / 3 ** 0.5)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# --------------------------------------------------------------------------- incumbents in a study


def test_kd_config_is_plain_kd_and_keeps_calibration():
    cfg = from_dict(RunConfig, {**tiny_autokd("x"), "distill": {"calibrate": {"ratio": 0.5}}})
    kd = kd_config(cfg)
    assert kd.autokd is None and kd.distill.pathways == [] and kd.distill.weighting.name == "fixed"
    (ll,) = kd.distill.logit_losses
    assert (ll.name, ll.weight, ll.kwargs) == ("kd", 1.0, {"tau": 4.0})
    assert kd.distill.calibrate is not None and kd.distill.calibrate.ratio == 0.5


def test_the_tree_skips_incumbents():
    study = optuna.create_study(direction="maximize")
    dists = {lv.name: optuna.distributions.CategoricalDistribution(list(lv.choices)) for lv in LEVELS}
    spec = DistillerSpec()
    study.add_trial(create_trial(params=spec.choices(), distributions=dists, value=0.1))
    add_incumbent(study, "kd", 0.9, {"val_acc": 0.8})
    stats = tree_statistics(study.trials, LEVELS)
    assert stats[()].visits == 1 and stats[()].mean == pytest.approx(0.1)  # KD's 0.9 is not in the tree
    assert find_incumbent(study, "kd").user_attrs[INCUMBENT_ATTR] == "kd"
    assert study.best_trial.user_attrs[INCUMBENT_ATTR] == "kd"  # but it is the study's best


def test_floor_summary_says_by_how_much_or_that_kd_wins():
    study = optuna.create_study(direction="maximize")
    kd = add_incumbent(study, "kd", 0.5, {"val_acc": 0.70})
    study.add_trial(create_trial(value=0.6, user_attrs={"val_acc": 0.75}))
    best = study.best_trial
    out = floor_summary(best, kd)
    assert out["beats_kd"] and out["margin_val_acc"] == pytest.approx(0.05) and "+5.00 points" in out["message"]
    out = floor_summary(kd, kd)
    assert not out["beats_kd"] and "the final run uses KD" in out["message"]


def test_weight_search_puts_kd_in_the_study_and_returns_kd_when_it_wins(tmp_path, monkeypatch):
    """Selection logic with a fake training: KD (no pathway) scores 0.9, every searched v 0.5."""
    cfg = from_dict(RunConfig, {
        "seed": 0, "name": "ws", "data": {"dataset": "fashion_mnist", "train_per_class": 5, "val_fraction": 0.4},
        "student": {"name": "resnet8"}, "teacher": {"name": "resnet8"},
        "distill": {"logit_losses": [{"name": "kd"}],
                    "pathways": [{"teacher": "stage:0", "student": "stage:0", "method": "at"}]},
        "search": {"sampler": "grid", "space": {"at": [10, 1000]}, "incumbents": [{"at": 1.0}], "heartbeat": 1}})
    trained = []

    def fake_train(parent, trial_cfg, run_dir):
        trained.append(run_dir.name)
        acc = 0.9 if not trial_cfg.distill.pathways else 0.5 + trial_cfg.distill.pathways[0].weight * 1e-5
        return {"val_acc": acc, "train_seconds": 0.0}

    finals = []
    monkeypatch.setattr(weights, "train_config", fake_train)
    monkeypatch.setattr(weights, "retrain_best", lambda final_cfg, run_dir, cb, key, summ: finals.append(final_cfg)
                        or (run_dir, {key: summ}))
    _, summary = weights.run_search(cfg, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "search.json").read_text())
    assert trained[:2] == ["incumbent-kd", "incumbent-v-at=1.0"] and set(trained[2:]) == {"at=10.0", "at=1000.0"}
    assert info["complete_trials"] == 2 and set(info["incumbents"]) == {"kd", "v:at=1.0"}
    assert [t["incumbent"] for t in info["trials"]] == ["kd", "v:at=1.0", None, None]
    assert info["chosen"] == "kd" and not info["kd_floor"]["beats_kd"]
    (final,) = finals
    assert final.distill.pathways == [] and [ll.name for ll in final.distill.logit_losses] == ["kd"]
    # Resumed: the incumbents are found in the study, not trained again.
    trained.clear()
    weights.run_search(cfg, tmp_path / "run")
    assert trained == []


def _fake_autokd_score(full_acc):
    """A stand-in for TrialContext.score: KD's proxy reward 1.0, a searched spec's its feature weight / 100."""

    def score(self, trial_cfg, run_dir, label, spec=None, full=False):
        pathways = trial_cfg.distill.pathways
        key = "kd" if not pathways else str(pathways[0].weight)
        if full:
            return 0.0, {"val_acc": full_acc[key]}
        reward = 1.0 if not pathways else pathways[0].weight / 100
        return reward, {"val_acc": 0.5, "run_dir": str(run_dir)}

    return score


def test_autokd_returns_kd_when_kd_wins_and_reports_the_proxy_fidelity(tmp_path, monkeypatch):
    # Proxy rewards: KD 1.0, specs W_f / 100 (<= 0.5); full accuracies in the reverse order of the proxy for
    # the top 3 (KD, then the two best specs): rho of 3 designs in reverse order = -1.
    full_acc = {"kd": 0.1, "50.0": 0.2, "25.0": 0.3, "5.0": 0.4, "1.0": 0.5}
    monkeypatch.setattr(autokd.TrialContext, "score", _fake_autokd_score(full_acc))
    finals = []
    monkeypatch.setattr(weights, "retrain_best", lambda final_cfg, run_dir, cb, key, summ: finals.append(final_cfg)
                        or (run_dir, {key: summ}))
    cfg = from_dict(RunConfig, tiny_autokd("ak", kd_incumbent=True, trials=6, algorithm="random", cache=False,
                                           fidelity_check=3))
    autokd.run_autokd(cfg, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "autokd.json").read_text())
    assert info["chosen"] == "kd" and info["kd_floor"]["beats_kd"] is False
    assert info["complete_trials"] == 6 and list(info["incumbents"]) == ["kd"]
    (final,) = finals
    assert final.distill.pathways == [] and final.distill.logit_losses[0].name == "kd"
    fid = info["fidelity"]
    assert fid["k"] == 3 and fid["designs"][0] == {"design": "kd", "trial": 0, "proxy_reward": 1.0, "full_val_acc": 0.1}
    expected = spearman([d["proxy_reward"] for d in fid["designs"]], [d["full_val_acc"] for d in fid["designs"]])
    assert fid["spearman_rho"] == pytest.approx(expected)
    for d in fid["designs"][1:]:  # each searched design trained "in full": its own full accuracy (by W_f)
        feature_weight = d["design"].split("-wf")[1].split("-")[0]
        assert d["full_val_acc"] == full_acc[str(float(feature_weight))]


def test_uninformative_proxy_warning():
    ctx = SimpleNamespace(cfg=from_dict(RunConfig, tiny_autokd("w")), proxy_steps=2, train=[0] * 50, subset=1.0)
    at_chance = SimpleNamespace(user_attrs={"val_acc": 0.12})
    message = autokd.proxy_warning(at_chance, 10, ctx)
    assert "uninformative" in message and "12.0%" in message and "autokd.min_steps (now 1)" in message
    assert autokd.proxy_warning(SimpleNamespace(user_attrs={"val_acc": 0.16}), 10, ctx) is None  # 1.6 x chance
    assert autokd.proxy_warning(None, 10, ctx) is None


def test_autokd_real_search_with_the_kd_incumbent_at_chance(tmp_path, capsys):
    """Real training (untrained teacher, 2 proxy steps): KD is in the study, the tree ignores it, the
    proxy is raised as far as the run allows and is reported as uninformative."""
    cfg = from_dict(RunConfig, tiny_autokd("real", epochs=2, kd_incumbent=True, trials=2, epoch_fraction=0.5,
                                           min_steps=10, cache=False))
    autokd.run_autokd(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert "raised subset to 1 and epochs to 2" in out and "WARNING: autokd proxy is uninformative" in out
    info = json.loads((tmp_path / "run" / "autokd.json").read_text())
    assert info["proxy_epochs"] == 2 and info["proxy_steps"] == 2 and info["proxy_warning"]
    assert [t["incumbent"] for t in info["trials"]] == ["kd", None, None]
    study = optuna.load_study(study_name="real", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert tree_statistics(study.trials, autokd.levels())[()].visits == 2
