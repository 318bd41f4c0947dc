"""MCTS over the real Auto-KD space with a synthetic reward: efficiency, determinism, statelessness,
two workers on one SQLite study, and resuming after SIGKILL."""

import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from optuna.trial import TrialState

from kdtune.search.mcts import (
    DEPTH_ATTR,
    LEAF_ATTR,
    MCTSSampler,
    NodeStats,
    backpropagate,
    leaf_of,
    propose,
    run_tree_search,
    tree_statistics,
    ucb,
)
from kdtune.search.space import LEVELS
from kdtune.search.weights import SURPLUS_ATTR

BRANCHING = [len(lv.choices) for lv in LEVELS]


def synthetic(seed):
    """An additive reward over the 8 levels with one known best leaf."""
    r = random.Random(seed)
    scores = [[r.random() for _ in range(b)] for b in BRANCHING]
    best = tuple(max(range(b), key=lambda i, s=s: s[i]) for b, s in zip(BRANCHING, scores, strict=True))
    return (lambda leaf: sum(s[i] for s, i in zip(scores, leaf, strict=True)) / len(BRANCHING)), best


def test_ucb_is_eq2_by_hand():
    """Auto-KD eq. 2: R_i/N_i + C sqrt(2 ln N_b / N_i). R = 3, N = 4, N_b = 20, C = 0.5:
    0.75 + 0.5 * sqrt(2 * 2.995732 / 4) = 0.75 + 0.5 * 1.223874 = 1.361937."""
    assert ucb(NodeStats(visits=4, reward=3.0), 20, 0.5) == pytest.approx(1.361937, abs=1e-6)
    assert ucb(NodeStats(visits=1, reward=0.2), 1, 2.0) == pytest.approx(0.2)  # ln 1 = 0: no exploration bonus


def evaluations_to_best(seed, budget, algorithm, c=0.4):
    reward, best = synthetic(seed)
    stats = {}
    for n in range(1, budget + 1):
        rng = random.Random(seed * 1_000_003 + n)
        if algorithm == "mcts":
            leaf, depth = propose(stats, BRANCHING, c, rng)
        else:
            leaf, depth = tuple(rng.randrange(b) for b in BRANCHING), 0
        if leaf == best:
            return n
        backpropagate(stats, leaf, depth, reward(leaf))
    return budget + 1  # not found within the budget (counts as budget + 1)


def test_mcts_finds_the_best_leaf_in_fewer_evaluations_than_random_search():
    mcts = [evaluations_to_best(s, 3000, "mcts") for s in range(20)]
    rand = [evaluations_to_best(s, 3000, "random") for s in range(20)]
    assert statistics.mean(mcts) < 0.6 * statistics.mean(rand), (mcts, rand)


def test_backpropagation_stops_at_the_expanded_node():
    stats = {}
    backpropagate(stats, (1, 2, 0), 1, 0.5)
    assert set(stats) == {(), (1,)} and stats[()].visits == 1 and stats[(1,)].reward == 0.5
    # Expansion picks an untried child of the root until all three are tried, then UCB descends.
    leaf, depth = propose(stats, [3, 3, 3], 1.0, random.Random(0))
    assert depth == 1 and leaf[0] != 1


def test_a_running_trial_counts_as_a_virtual_loss_only_once_its_leaf_and_depth_are_stored():
    """Another worker writes a RUNNING trial's depth, then its leaf (two storage writes): a reader between
    them must skip it, not fail (KeyError 'mcts:depth' in a two-worker run)."""
    done = optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.25,
                                     system_attrs={LEAF_ATTR: [0, 0, 0], DEPTH_ATTR: 1})
    running = optuna.trial.create_trial(state=TrialState.RUNNING, system_attrs={LEAF_ATTR: [1, 0, 0],
                                                                                DEPTH_ATTR: 1})
    half_written = optuna.trial.create_trial(state=TrialState.RUNNING, system_attrs={LEAF_ATTR: [2, 0, 0]})
    stats = tree_statistics([done, running, half_written], LEVELS)
    assert stats[()].visits == 2  # the finished trial and the fully stored running one
    assert stats[(1,)].visits == 1 and stats[(1,)].reward == 0.25  # virtual loss = the worst reward seen
    assert (2,) not in stats


def run_sampler(seed, n, names=None):
    reward, _ = synthetic(0)
    study = optuna.create_study(direction="maximize", sampler=MCTSSampler(LEVELS, 0.4, seed))
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        params = {lv.name: trial.suggest_categorical(lv.name, list(lv.choices)) for lv in LEVELS}
        return reward(leaf_of(params, LEVELS))

    study.optimize(objective, n_trials=n)
    return study, [leaf_of(t.params, LEVELS) for t in study.trials]


def test_sampler_is_deterministic_and_equals_the_stateful_loop():
    study, leaves = run_sampler(seed=3, n=30)
    assert run_sampler(seed=3, n=30)[1] == leaves
    assert run_sampler(seed=4, n=30)[1] != leaves
    # The stateless sampler (tree rebuilt from the trials each time) makes the same choices as a
    # stateful MCTS loop with the same random streams.
    reward, _ = synthetic(0)
    stats, expected = {}, []
    for n in range(30):
        leaf, depth = propose(stats, BRANCHING, 0.4, random.Random(3 * 1_000_003 + n))
        expected.append(leaf)
        backpropagate(stats, leaf, depth, reward(leaf))
    assert leaves == expected
    rebuilt = tree_statistics(study.trials, LEVELS)
    assert {k: (v.visits, round(v.reward, 9)) for k, v in rebuilt.items()} == \
        {k: (v.visits, round(v.reward, 9)) for k, v in stats.items()}


def test_a_study_of_another_algorithm_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    run_tree_search(lambda t, c: 0.0, LEVELS[:2], storage, "s", 2, "random", heartbeat=1)
    with pytest.raises(ValueError, match="study_name"):
        run_tree_search(lambda t, c: 0.0, LEVELS[:2], storage, "s", 2, "mcts", heartbeat=1)


WORKER = textwrap.dedent("""
    import json, random, sys, time
    from kdtune.search.mcts import leaf_of, run_tree_search
    from kdtune.search.space import LEVELS
    storage, n, sleep, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    r = random.Random(0)
    scores = [[r.random() for _ in lv.choices] for lv in LEVELS]
    def objective(trial, choices):
        time.sleep(sleep)
        leaf = leaf_of(choices, LEVELS)
        with open(log, "a") as f:
            f.write(json.dumps({"number": trial.number}) + "\\n")
        return sum(s[i] for s, i in zip(scores, leaf, strict=True))
    run_tree_search(objective, LEVELS, storage, "shared", n, "mcts", 0.4, seed=0, heartbeat=int(sys.argv[5]))
""")

#: Seconds between a worker's heartbeats; its trial is stale (failed by any other worker) after 3 of
#: them. Scaled with the machine's load, so that a live worker slowed down by other jobs is never
#: taken for a dead one; the tests wait on trial states, never for a guessed duration.
HEARTBEAT = min(4, max(1, math.ceil(os.getloadavg()[0] / (os.cpu_count() or 1))))


def start_worker(tmp_path, n, sleep, log):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), f"sqlite:///{tmp_path / 'study.db'}", str(n), str(sleep),
                             str(log), str(HEARTBEAT)], env=env, stderr=subprocess.PIPE)


def open_as_a_worker(tmp_path):
    """Open the study as a starting worker does (0 trials to run): trials of dead workers past the
    grace period are failed and re-queued for retry."""
    return run_tree_search(lambda t, c: 0.0, LEVELS, f"sqlite:///{tmp_path / 'study.db'}", "shared", 0, "mcts",
                           0.4, seed=0, heartbeat=HEARTBEAT)


def wait_for(condition, what, timeout=240.0):
    """Poll a state until it holds (not a sleep of a guessed length)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def load(tmp_path):
    return optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'study.db'}")


def test_two_workers_share_one_sqlite_study_without_losing_or_repeating_trials(tmp_path):
    log = tmp_path / "calls.jsonl"
    open_as_a_worker(tmp_path)  # create the study first so the two workers do not race on creating the tables
    workers = [start_worker(tmp_path, 12, 0.1, log) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=240)
        assert w.returncode == 0, err.decode()[-2000:]
    trials = load(tmp_path).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    calls = [json.loads(line)["number"] for line in log.read_text().splitlines()]
    # Every objective call is one complete trial (none lost, none run twice); the total is exactly N.
    assert sorted(calls) == sorted(t.number for t in complete)
    assert len(set(calls)) == len(calls)
    assert len(complete) == 12
    # A trial claimed once N were complete or running is pruned before the objective runs.
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    assert all(t.state == TrialState.PRUNED and t.user_attrs.get(SURPLUS_ATTR) for t in others)
    # Both workers built one tree: the expansion depths grow as in a single MCTS.
    assert max(t.system_attrs["mcts:depth"] for t in complete) >= 2


def test_search_killed_with_sigkill_resumes_with_all_finished_trials(tmp_path):
    log = tmp_path / "calls.jsonl"
    worker = start_worker(tmp_path, 12, 0.3, log)

    def finished(n):
        return sum(t.state == TrialState.COMPLETE for t in load(tmp_path).get_trials()) >= n

    def mid_trial():  # three trials finished and the next one's objective running
        return log.exists() and finished(3) and any(t.state == TrialState.RUNNING for t in load(tmp_path).get_trials())

    wait_for(mid_trial, "three finished trials and a running one")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = {t.number: (t.params, t.value) for t in load(tmp_path).get_trials() if t.state == TrialState.COMPLETE}
    assert len(before) >= 3
    # Past the grace period the killed trial is stale: wait until a starting worker fails (and re-queues) it.
    def killed_trial_failed():
        open_as_a_worker(tmp_path)
        return TrialState.RUNNING not in [t.state for t in load(tmp_path).get_trials()]

    wait_for(killed_trial_failed, "the killed worker's trial to be failed as stale")
    resumed = start_worker(tmp_path, 12, 0.0, log)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err.decode()[-2000:]
    after = {t.number: (t.params, t.value) for t in load(tmp_path).get_trials() if t.state == TrialState.COMPLETE}
    assert len(after) == 12
    assert all(after[k] == v for k, v in before.items())  # every finished trial kept, unchanged
    states = [t.state for t in load(tmp_path).get_trials()]
    assert TrialState.RUNNING not in states  # the killed worker's trial was failed (and retried)
