"""Search over the fixed path weights v: Optuna studies that resume and are shared (tiny objectives),
and one end-to-end search on real Fashion-MNIST (a few images, 1 epoch)."""

import json
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from kdtune.config import ConfigError, RunConfig, SearchConfig, from_dict, load_config
from kdtune.search.weights import (
    SURPLUS_ATTR,
    apply_weights,
    config_paths,
    grid_size,
    is_surplus,
    open_study,
    run_study,
    trial_key,
)

GRID = {"at": [1.0, 10.0, 100.0], "kd": [0.1, 1.0]}


def objective_counting(calls):
    def objective(trial, v):
        calls.append(dict(v))
        return -abs(v["at"] - 10.0) - abs(v["kd"] - 1.0)  # best: at=10, kd=1
    return objective


def storage(tmp_path):
    return f"sqlite:///{tmp_path / 'study.db'}"


def complete(study):
    return study.get_trials(states=(TrialState.COMPLETE,))


def test_grid_covers_every_point_once_and_finds_the_best(tmp_path):
    calls = []
    study = run_study(SearchConfig(space=GRID), objective_counting(calls), storage(tmp_path), "s")
    assert len(calls) == grid_size(GRID) == 6
    assert sorted((c["at"], c["kd"]) for c in calls) == sorted((a, k) for a in GRID["at"] for k in GRID["kd"])
    assert study.best_params == {"at": 10.0, "kd": 1.0}


def test_resume_continues_to_n_trials_without_redoing(tmp_path):
    spec = SearchConfig(sampler="tpe", space={"at": {"low": 1.0, "high": 1000.0, "log": True}, "kd": [0.1, 1.0]},
                        n_trials=3)
    first = []
    run_study(spec, objective_counting(first), storage(tmp_path), "s", seed=1)
    assert len(first) == 3
    again = []
    run_study(spec, objective_counting(again), storage(tmp_path), "s", seed=1)  # already complete
    assert again == []
    more = []
    spec.n_trials = 5
    study = run_study(spec, objective_counting(more), storage(tmp_path), "s", seed=1)
    assert len(more) == 2 and len(complete(study)) == 5
    assert all(1.0 <= t.params["at"] <= 1000.0 for t in study.trials)


def test_two_workers_share_one_study(tmp_path):
    # Worker A is stopped after 2 trials; worker B, with its own storage connection, finishes
    # the grid: together every point exactly once.
    spec = SearchConfig(space=GRID)
    a_calls, b_calls = [], []
    run_study(SearchConfig(space=GRID, n_trials=2), objective_counting(a_calls), storage(tmp_path), "shared")
    study = run_study(spec, objective_counting(b_calls), storage(tmp_path), "shared")
    assert len(a_calls) == 2 and len(b_calls) == 4
    points = [(c["at"], c["kd"]) for c in a_calls + b_calls]
    assert len(set(points)) == 6 and len(complete(study)) == 6


def test_a_worker_joining_while_the_last_trial_runs_adds_no_trial(tmp_path):
    # The N+1 race, made deterministic: worker B starts (and sees N - 1 complete trials) while
    # worker A's N-th trial is still running. B's claimed trial must be pruned before it trains.
    spec = SearchConfig(sampler="random", space={"at": [1.0, 10.0, 100.0], "kd": [0.1, 1.0]}, n_trials=3)
    a_calls, b_calls = [], []
    b_objective = objective_counting(b_calls)

    def a_objective(trial, v):
        a_calls.append(trial.number)
        if len(a_calls) == 3:  # A's last needed trial is RUNNING: B joins now, on its own connection
            run_study(spec, b_objective, storage(tmp_path), "shared", seed=7)
        return 0.0

    study = run_study(spec, a_objective, storage(tmp_path), "shared")
    assert a_calls == [0, 1, 2] and b_calls == []  # B trained nothing
    states = {t.number: t.state for t in study.get_trials()}
    assert [n for n, s in states.items() if s == TrialState.COMPLETE] == [0, 1, 2]
    assert states[3] == TrialState.PRUNED and study.trials[3].user_attrs[SURPLUS_ATTR]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask(), not optimize()
def test_claim_counts_only_complete_and_earlier_running_trials(tmp_path):
    study = open_study(SearchConfig(space=GRID), storage(tmp_path), "s", seed=0)
    done = study.ask()
    study.tell(done, 1.0)
    first, second = study.ask(), study.ask()  # two workers claim at once; one trial is missing (N = 2)
    assert not is_surplus(study, first, 2)  # 1 complete + no earlier running trial: it runs
    assert is_surplus(study, second, 2)  # 1 complete + `first` running: surplus
    assert not is_surplus(study, second, 3)
    study.tell(second, state=TrialState.PRUNED)  # what optimize_until does with a surplus claim
    study.tell(first, state=TrialState.FAIL)  # if `first` fails, a later claim is needed again
    assert not is_surplus(study, study.ask(), 2)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the dead worker uses ask(), not optimize()
def test_a_dead_workers_trial_is_failed_and_retried_with_the_same_v(tmp_path):
    spec = SearchConfig(space=GRID, heartbeat=1)
    study = open_study(spec, storage(tmp_path), "s", seed=0)
    # A worker asks for a trial, beats once, then dies without telling the study.
    dead = study.ask()
    v = {p: dead.suggest_categorical(p, vs) for p, vs in GRID.items()}
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(5.0)  # well past the grace period (3 heartbeats; stored times may be rounded)
    calls = []
    study = run_study(spec, objective_counting(calls), storage(tmp_path), "s")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and study.trials[dead.number].state == TrialState.FAIL
    assert len(complete(study)) == 6 and v in calls  # its v was trained again, by the retry
    assert sorted((c["at"], c["kd"]) for c in calls) == sorted((a, k) for a in GRID["at"] for k in GRID["kd"])


def test_a_study_made_with_another_space_is_refused(tmp_path):
    run_study(SearchConfig(space=GRID, n_trials=1), objective_counting([]), storage(tmp_path), "s")
    with pytest.raises(ValueError, match="study_name"):
        run_study(SearchConfig(space={"at": [1.0, 2.0]}), objective_counting([]), storage(tmp_path), "s")


def test_search_config_validation():
    with pytest.raises(ConfigError, match="grid sampler needs a list"):
        from_dict(SearchConfig, {"space": {"at": {"low": 1, "high": 10}}})
    with pytest.raises(ConfigError, match="n_trials"):
        from_dict(SearchConfig, {"sampler": "random", "space": {"at": [1, 2]}})
    with pytest.raises(ConfigError, match="space.at"):
        from_dict(SearchConfig, {"sampler": "tpe", "n_trials": 3, "space": {"at": {"low": 0, "high": 1, "log": True}}})


TINY = {
    "seed": 0,
    "data": {"dataset": "fashion_mnist", "train_per_class": 5, "val_fraction": 0.4, "eval_batch_size": 1000,
             "test_limit": 500},
    "student": {"name": "resnet8"},
    "teacher": {"name": "resnet8"},  # untrained: enough for the plumbing
    "distill": {"logit_losses": [{"name": "kd"}],
                "pathways": [{"teacher": "stage:0", "student": "stage:0", "method": "at"},
                             {"teacher": "stage:1", "student": "stage:1", "method": "at"}],
                "weighting": {"name": "adaptive", "kwargs": {"alpha": 0.5}}},
    "train": {"epochs": 1, "progress": False, "log_every": 1},
    "search": {"sampler": "grid", "space": {"at": [10, 1000], "kd": [1]}, "kd_incumbent": False},
}


def test_apply_weights_sets_every_term_of_a_path():
    cfg = from_dict(RunConfig, TINY)
    assert config_paths(cfg) == {"kd": ["logit_losses.0"], "at": ["pathways.0", "pathways.1"]}
    out = apply_weights(cfg, {"at": 100.0})
    assert [p.weight for p in out.distill.pathways] == [100.0, 100.0]
    assert out.distill.logit_losses[0].weight is None  # not searched: unchanged
    assert out.distill.weighting.name == "fixed" and out.distill.weighting.kwargs == {"alpha": 0.5}
    assert out.search is None and cfg.search is not None  # a copy
    with pytest.raises(ValueError, match=r"its paths are \['at', 'kd'\]"):
        apply_weights(cfg, {"nst": 1.0})


def test_kdtune_run_search_then_final_run_then_resume(tmp_path, capsys):
    from kdtune.cli import main

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs")}))
    assert main(["run", str(path), "name=s"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = json.loads((run_dir / "search.json").read_text())
    assert info["complete_trials"] == 2 and set(info["best_v"]) == {"at", "kd"}
    for t in info["trials"]:
        trial = json.loads((run_dir / "trials" / trial_key(t["v"]) / "summary.json").read_text())
        assert trial["eval_split"] == "val" and trial["val_acc"] == t["val_acc"]
        # Trials train on 30 images and are scored on the 20 held-out ones, never on test.
        trial_cfg = load_config(run_dir / "trials" / trial_key(t["v"]) / "config.yaml")
        assert trial_cfg.data.val_fraction == 0.4 and trial_cfg.distill.weighting.name == "fixed"
    best = load_config(run_dir / "best_config.yaml")
    assert best.data.val_fraction == 0 and best.search is None
    assert [p.weight for p in best.distill.pathways] == [info["best_v"]["at"]] * 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["search"]["best_v"] == info["best_v"] and summary["test_acc"] is not None
    assert (run_dir / "weights.png").exists() and (run_dir / "curves.png").exists()
    capsys.readouterr()

    # Resuming a finished search trains nothing again.
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "trials").rglob("last.pt")}
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "trials").rglob("last.pt")} == before
    assert "trial 0:" not in capsys.readouterr().out
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{run_dir / 'study.db'}")
    assert len(study.trials) == 2


def test_search_needs_a_validation_split(tmp_path):
    from kdtune.recipe import run

    cfg = from_dict(RunConfig, {**TINY, "data": {**TINY["data"], "val_fraction": 0.0}})
    with pytest.raises(ValueError, match="val_fraction"):
        run(cfg, tmp_path / "r")


def test_trial_epochs_shortens_trials_but_not_the_final_run(tmp_path):
    from kdtune.recipe import run

    spec = {**TINY, "train": {**TINY["train"], "epochs": 2},
            "search": {"sampler": "grid", "space": {"at": [10], "kd": [1]}, "trial_epochs": 1, "kd_incumbent": False}}
    cfg = from_dict(RunConfig, spec)
    run_dir, summary = run(cfg, tmp_path / "r")
    (trial_dir,) = (run_dir / "trials").iterdir()
    assert load_config(trial_dir / "config.yaml").train.epochs == 1
    assert len((trial_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert load_config(run_dir / "best_config.yaml").train.epochs == 2
    with pytest.raises(ConfigError, match="trial_epochs"):
        from_dict(SearchConfig, {"space": {"at": [1]}, "trial_epochs": 0})
