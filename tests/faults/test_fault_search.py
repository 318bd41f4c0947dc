"""Searches that lose a worker: two ``kdtune run`` workers share one Optuna study (SQLite), one is
killed with SIGKILL in the middle of a trial, and ``--resume`` of its run directory completes the
study. No finished trial is lost or changed, and the study ends with exactly the trials it asked for.
A corrupt study file is a one-line error."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import optuna
import pytest
from faultlib import start_kdtune, wait_for, write_config
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from helpers import tiny_autokd
from kdtune.cli import main
from kdtune.search.incumbents import is_incumbent

HEARTBEAT = 2  # seconds; a trial is stale 3 heartbeats after its worker's last one
TRIALS = 6


def weight_search(storage: str) -> dict[str, Any]:
    return {
        "seed": 0, "name": "ws",
        "data": {"dataset": "fashion_mnist", "train_per_class": 5, "val_fraction": 0.4, "eval_batch_size": 1000,
                 "test_limit": 500},
        "student": {"name": "resnet8"},
        "teacher": {"name": "resnet8"},
        "distill": {"logit_losses": [{"name": "kd"}],
                    "pathways": [{"teacher": "stage:0", "student": "stage:0", "method": "at"}]},
        "train": {"epochs": 1, "progress": False},
        "search": {"sampler": "grid", "space": {"at": [1, 3, 10, 30, 100, 300], "kd": [1]}, "final": False,
                   "storage": storage, "heartbeat": HEARTBEAT},
    }


def autokd_search(storage: str) -> dict[str, Any]:
    return tiny_autokd("ak", trials=TRIALS, final=False, storage=storage, heartbeat=HEARTBEAT)


def load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=RDBStorage(storage, heartbeat_interval=HEARTBEAT,
                                                                  grace_period=3 * HEARTBEAT))


def complete(study: optuna.Study) -> dict[int, tuple[dict[str, Any], float]]:
    return {t.number: (t.params, t.value) for t in study.get_trials(states=(TrialState.COMPLETE,))}


def running_in(study: optuna.Study, run_dir: Path) -> bool:
    """A trial of ``run_dir``'s worker is running (its objective has started)."""
    return any(str(t.user_attrs.get("run_dir", "")).startswith(str(run_dir))
               for t in study.get_trials(states=(TrialState.RUNNING,)))


def stale_trials_failed(study: optuna.Study) -> bool:
    """Fail the trials whose worker stopped beating (as any worker does on start); True when none runs."""
    optuna.storages.fail_stale_trials(study)
    return not study.get_trials(states=(TrialState.RUNNING,))


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("make_config,name", [(weight_search, "ws"), (autokd_search, "ak")],
                         ids=["weight-search", "autokd"])
def test_a_worker_killed_mid_trial_and_resumed_loses_no_finished_trial(tmp_path, make_config, name):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    config = make_config(storage)
    # The first worker creates the study before the second joins (no race on creating the tables): the
    # second starts once the first is in its first trial. Nothing here opens the database before that.
    victim = start_kdtune(["run", str(write_config(tmp_path / "a.yaml", config, tmp_path / "a"))])
    wait_for(lambda: next((tmp_path / "a").glob("*/trials/*"), None), "the first worker's first trial")
    other = start_kdtune(["run", str(write_config(tmp_path / "b.yaml", config, tmp_path / "b"))])
    (victim_dir,) = (tmp_path / "a").iterdir()

    # Kill the first worker in the middle of a trial, once two trials have finished.
    wait_for(lambda: len(complete(load(storage, name))) >= 2 and running_in(load(storage, name), victim_dir),
             "two finished trials and one of the first worker's running")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = complete(load(storage, name))

    _, err = other.communicate(timeout=600)
    assert other.returncode == 0, err
    wait_for(lambda: stale_trials_failed(load(storage, name)), "the killed worker's trial to go stale")
    assert main(["run", "--resume", str(victim_dir)]) == 0

    study = load(storage, name)
    after = complete(study)
    searched = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if not is_incumbent(t)]
    assert len(searched) == TRIALS  # beside them, the plain-KD incumbent the search scores once
    assert all(after.get(number) == done for number, done in before.items())  # every finished trial kept, unchanged
    assert not study.get_trials(states=(TrialState.RUNNING,))
    for t in searched:
        assert (Path(t.user_attrs["run_dir"]) / "summary.json").exists()


def test_a_corrupt_study_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "study.db").write_bytes(b"not a database, " * 512)
    before = (tmp_path / "study.db").read_bytes()
    config = weight_search(f"sqlite:///{tmp_path / 'study.db'}")
    assert main(["run", str(write_config(tmp_path / "s.yaml", config, tmp_path / "runs"))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "cannot open the Optuna study 'ws'" in err and "study.db" in err and "file is not a database" in err
    assert (tmp_path / "study.db").read_bytes() == before  # left as it was, for the user to restore
