"""Monte-Carlo tree search over a tree of decisions, stateless over an Optuna study (Auto-KD §2.2).

One MCTS iteration (papers/auto-kd.txt §2.2, after Browne et al. 2012):

1. **Selection** — from the root, while the node's children have all been tried, descend to the
   child with the largest UCB (eq. 2) ``nu(n_i) = R_i / N_i + C * sqrt(2 ln N_b / N_i)``
   (R_i: summed reward, N_i: visits of the child, N_b: visits of its parent).
2. **Expansion** — at the first node with an untried child, pick one untried child at random; it
   joins the tree.
3. **Simulation** — complete the remaining levels at random; the leaf (a distiller) is evaluated
   (a proxy training run, or any objective) and its reward returned.
4. **Back-propagation** — add the reward and one visit to every node from the root to the
   expanded node.

Stateless design (SPEC: "the tree is a function of the finished trials"). The statistics are never
stored: :func:`tree_statistics` rebuilds them from the study's finished trials — each trial records
its leaf (its params) and its expansion depth (system attr ``mcts:depth``). :class:`MCTSSampler`
is an Optuna sampler that, in ``before_trial``, rebuilds the tree, runs selection / expansion /
simulation and writes the chosen leaf into the trial; the objective reads it with
``suggest_categorical``. So a search resumes after any interruption, and several workers on one
study (SQLite file, or an RDB URL across machines) search one tree. Trials still RUNNING in other
workers count as visits with a pessimistic reward ("virtual loss"), so parallel workers spread out
instead of all descending the same branch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from kdtune.search.incumbents import is_incumbent
from kdtune.search.space import Level

Path = tuple[int, ...]
DEPTH_ATTR = "mcts:depth"
LEAF_ATTR = "mcts:leaf"


@dataclass
class NodeStats:
    """Visits N and summed reward R of one tree node (a path prefix)."""

    visits: int = 0
    reward: float = 0.0

    @property
    def mean(self) -> float:
        return self.reward / self.visits if self.visits else float("nan")


def backpropagate(stats: dict[Path, NodeStats], leaf: Path, depth: int, reward: float) -> None:
    """Add one visit and ``reward`` to the nodes ``leaf[:0] (root) .. leaf[:depth]`` (step 4)."""
    for d in range(depth + 1):
        node = stats.setdefault(tuple(leaf[:d]), NodeStats())
        node.visits += 1
        node.reward += reward


def ucb(child: NodeStats, parent_visits: int, c: float) -> float:
    """Eq. 2: ``R_i / N_i + C * sqrt(2 ln N_b / N_i)``."""
    return child.reward / child.visits + c * math.sqrt(2.0 * math.log(max(parent_visits, 1)) / child.visits)


def propose(stats: Mapping[Path, NodeStats], branching: Sequence[int], c: float,
            rng: random.Random) -> tuple[Path, int]:
    """One selection + expansion + random simulation (steps 1-3).

    Args:
        stats: node statistics (:func:`tree_statistics`); a node is in the tree iff it has visits.
        branching: number of children at each level.
        c: exploration constant C of eq. 2.
        rng: random source of expansion, simulation and UCB ties.

    Returns:
        (leaf, depth): the leaf to evaluate (one child index per level) and the depth of the node
        that back-propagation must stop at (the expanded node; ``len(branching)`` when selection
        reached a leaf already in the tree).
    """
    path: list[int] = []
    for depth, k in enumerate(branching):
        children = [tuple(path) + (i,) for i in range(k)]
        untried = [i for i, ch in enumerate(children) if ch not in stats or stats[ch].visits == 0]
        if untried:  # expansion: one untried child joins the tree, the rest is simulated
            path.append(rng.choice(untried))
            path += [rng.randrange(b) for b in branching[depth + 1:]]
            return tuple(path), depth + 1
        parent = stats[tuple(path)].visits if tuple(path) in stats else 1
        scores = [ucb(stats[ch], parent, c) for ch in children]
        best = max(scores)
        path.append(rng.choice([i for i, s in enumerate(scores) if s == best]))
    return tuple(path), len(branching)


# --------------------------------------------------------------------------- the study's view


def leaf_of(params: Mapping[str, Any], levels: Sequence[Level]) -> Path:
    """Child indices of a trial's params (level name -> chosen value)."""
    return tuple(level.choices.index(params[level.name]) for level in levels)


def tree_statistics(trials: Sequence[FrozenTrial], levels: Sequence[Level],
                    virtual_loss: bool = True) -> dict[Path, NodeStats]:
    """Rebuild the node statistics from a study's trials (finished ones, plus running ones).

    A COMPLETE trial back-propagates its value along its leaf down to its recorded expansion depth
    (``mcts:depth``; trials made by another sampler count down to the full leaf). With
    ``virtual_loss``, a RUNNING trial that already has its leaf counts as a visit with the worst
    reward seen so far, so concurrent workers do not all pick the same branch; it is replaced by
    its true reward once it finishes. FAIL / PRUNED trials are ignored (a retry re-enters), and so
    are incumbents (:mod:`kdtune.search.incumbents`).
    """
    stats: dict[Path, NodeStats] = {}
    trials = [t for t in trials if not is_incumbent(t)]  # KD / hand designs: scored, but no leaf of the tree
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    for t in sorted(complete, key=lambda t: t.number):
        leaf = _stored_leaf(t, levels)
        backpropagate(stats, leaf, int(t.system_attrs.get(DEPTH_ATTR, len(levels))), float(t.value))
    if virtual_loss and complete:
        worst = min(float(t.value) for t in complete)
        for t in trials:
            if t.state == TrialState.RUNNING and LEAF_ATTR in t.system_attrs and DEPTH_ATTR in t.system_attrs:
                backpropagate(stats, tuple(t.system_attrs[LEAF_ATTR]), int(t.system_attrs[DEPTH_ATTR]), worst)
    return stats


def _stored_leaf(t: FrozenTrial, levels: Sequence[Level]) -> Path:
    if LEAF_ATTR in t.system_attrs:
        return tuple(t.system_attrs[LEAF_ATTR])
    return leaf_of(t.params, levels)


class MCTSSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler that proposes leaves of a decision tree by MCTS (Auto-KD §2.2).

    Use it with an objective that asks every level in order with
    ``trial.suggest_categorical(level.name, level.choices)``; any other parameter is sampled at
    random. Deterministic: the proposal of trial number k depends only on ``seed``, k and the
    trials finished before it, so a sequential search with the same seed repeats exactly.

    Args:
        levels: the tree, root first (:data:`kdtune.search.space.LEVELS`).
        exploration: C of eq. 2.
        seed: seed of expansion / simulation / tie-breaking.
    """

    def __init__(self, levels: Sequence[Level], exploration: float = 1.0, seed: int = 0) -> None:
        self.levels = tuple(levels)
        self.names = {level.name for level in self.levels}
        self.exploration = float(exploration)
        self.seed = int(seed)
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Rebuild the tree from the study, run one selection/expansion/simulation, store the leaf."""
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        stats = tree_statistics([t for t in trials if t.number != trial.number], self.levels)
        rng = random.Random(self.seed * 1_000_003 + trial.number)
        leaf, depth = propose(stats, [len(level.choices) for level in self.levels], self.exploration, rng)
        # Depth first: another worker reads a RUNNING trial only once its leaf is there (two separate
        # writes; the other order let a reader see a leaf without its depth: KeyError 'mcts:depth').
        study._storage.set_trial_system_attr(trial._trial_id, DEPTH_ATTR, depth)
        study._storage.set_trial_system_attr(trial._trial_id, LEAF_ATTR, list(leaf))

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if param_name not in self.names:
            return self._fallback.sample_independent(study, trial, param_name, param_distribution)
        index = [level.name for level in self.levels].index(param_name)
        level = self.levels[index]
        if not isinstance(param_distribution, CategoricalDistribution) or \
                tuple(param_distribution.choices) != tuple(level.choices):
            raise ValueError(f"MCTS level {param_name!r} must be suggested as a categorical over {level.choices}, "
                             f"got {param_distribution}")
        leaf = trial.system_attrs.get(LEAF_ATTR)
        if leaf is None:  # e.g. a trial enqueued by hand: nothing proposed for it
            return self._fallback.sample_independent(study, trial, param_name, param_distribution)
        return level.choices[leaf[index]]


def make_sampler(algorithm: str, levels: Sequence[Level], exploration: float, seed: int) -> optuna.samplers.BaseSampler:
    """``mcts`` (:class:`MCTSSampler`), or the baselines ``random`` and ``tpe`` over the same levels."""
    if algorithm == "mcts":
        return MCTSSampler(levels, exploration, seed)
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise ValueError(f"unknown search algorithm {algorithm!r}; choose mcts, random or tpe")


def suggest_leaf(trial: optuna.Trial, levels: Sequence[Level]) -> dict[str, Any]:
    """Ask every level of the tree, in order; returns level name -> value."""
    return {level.name: trial.suggest_categorical(level.name, list(level.choices)) for level in levels}


def run_tree_search(objective: Callable[[optuna.Trial, dict[str, Any]], float], levels: Sequence[Level],
                    storage: str, study_name: str, n_trials: int, algorithm: str = "mcts",
                    exploration: float = 1.0, seed: int = 0, heartbeat: int = 60, max_retry: int = 2,
                    catch: tuple[type[Exception], ...] = ()) -> optuna.Study:
    """Run (or continue, or join) a tree search until the study holds ``n_trials`` complete trials.

    The study lives in ``storage`` (SQLite file or RDB URL) with heartbeats, through the weight
    search's helpers (:func:`kdtune.search.weights.open_rdb_study`, :func:`~kdtune.search.weights.optimize_until`):
    a dead worker's trial is failed after ``3 * heartbeat`` s and retried, a second worker on the
    same study shares the tree, and the study refuses to be continued with another algorithm or tree.

    Args:
        objective: ``objective(trial, choices) -> reward`` to maximise; choices maps level -> value.
        levels: the tree.
        storage, study_name: where the study lives.
        n_trials: complete trials wanted over all workers.
        algorithm: ``mcts`` | ``random`` | ``tpe``.
        exploration: C of eq. 2 (mcts).
        seed: sampler seed.
        heartbeat, max_retry: dead-worker detection and retries.
        catch: exceptions that fail one trial without stopping the search.
    """
    from kdtune.search.weights import optimize_until

    study = open_tree_study(levels, storage, study_name, algorithm, exploration, seed, heartbeat, max_retry)
    optimize_until(study, lambda trial: objective(trial, suggest_leaf(trial, levels)), n_trials, catch)
    return study


def open_tree_study(levels: Sequence[Level], storage: str, study_name: str, algorithm: str = "mcts",
                    exploration: float = 1.0, seed: int = 0, heartbeat: int = 60, max_retry: int = 2) -> optuna.Study:
    """The tree search's study (created, or loaded to continue / join it): see :func:`run_tree_search`."""
    from kdtune.search.weights import open_rdb_study

    made_with = {"algorithm": algorithm, "levels": {level.name: list(level.choices) for level in levels}}
    return open_rdb_study(storage, study_name, make_sampler(algorithm, levels, exploration, seed), made_with,
                          heartbeat, max_retry)
