"""Distillation *paths* (Adaptive Distillation §3.1): terms grouped into the units that get one weight.

The distiller gives one term per logit loss and per pathway (``kd``, ``at:layer1->layer1``,
``at:layer2->layer2`` ...). The paper's paths are coarser by default: "AT" is the attention loss
summed over the backbone stages, one weight v_AT for all of them (its Fig. 3a); "layerwise"
makes every stage's term its own path (Fig. 3b, Table 3 "Adaptive-layerwise").

Grouping rule: a term's path is the text before its first ``:`` — the method label of a
pathway (``at``, ``nst``, ``fitnets`` ...) or the name of a logit loss (``kd``, ``l2_logit``).
``layerwise=True`` makes every term a path; ``groups`` names paths explicitly by glob patterns.
``fixed`` (glob patterns) keeps terms out of every path: they enter the loss at their configured
weight (the catalogue's unless set), as plain KD does, while the strategy weighs the other paths.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from torch import Tensor

from kdtune.weighting.base import Weighting


def path_of(term: str) -> str:
    """The default path of a term: its method label (``"at:layer1->layer1"`` -> ``"at"``)."""
    return term.split(":", 1)[0]


def group_terms(names: Sequence[str], layerwise: bool = False,
                groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Map path name -> the term names it sums, in first-seen order.

    Args:
        names: the term names of the distiller.
        layerwise: every term is its own path.
        groups: explicit paths, ``{path: [glob patterns of term names]}``; every term must match
            exactly one path. Overrides the default rule (and ``layerwise``).

    Raises:
        ValueError: a term matched by no path or by several, or an explicit path matching nothing.
    """
    if groups is not None:
        out: dict[str, list[str]] = {g: [] for g in groups}
        for name in names:
            hits = [g for g, pats in groups.items() if any(fnmatch.fnmatchcase(name, p) for p in pats)]
            if len(hits) != 1:
                what = "no path" if not hits else f"several paths {hits}"
                raise ValueError(f"term {name!r} matches {what}; groups={dict(groups)} must cover each term "
                                 f"exactly once (terms: {list(names)})")
            out[hits[0]].append(name)
        empty = [g for g, members in out.items() if not members]
        if empty:
            raise ValueError(f"paths {empty} match no term; terms are {list(names)}")
        return out
    if layerwise:
        return {n: [n] for n in names}
    out = {}
    for name in names:
        out.setdefault(path_of(name), []).append(name)
    return out


def default_fixed(names: Sequence[str], fixed: Sequence[str] | None) -> list[str]:
    """``fixed`` as given; None (the path strategies' default): ``["kd"]`` when plain KD's term ``kd`` sits beside
    other terms, else ``[]``. Plain KD then stays at its configured weight and the strategy weighs the rest: the KD
    floor of ``adaptive`` and ``mgda`` (their docstrings give the measurements)."""
    if fixed is not None:
        return list(fixed)
    return ["kd"] if "kd" in names and len(names) > 1 else []


def fixed_terms(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The terms that match any of the glob ``patterns``; a pattern that matches none is an error."""
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"fixed patterns {unmatched} match no term; terms are {list(names)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


class PathWeighting(Weighting):
    """Base of strategies that weight *paths* (groups of terms) with one weight each.

    The path loss is the plain sum of its terms, f_p = sum_{i in p} term_i: the configured
    per-term weights (``base_weights``) are ignored, as in the paper, where v replaces them.
    Calibrated weights (``scales``) are not ignored: f_p = sum_{i in p} s_i term_i, so v starts
    from them (v = 1 at the start of ``adaptive``; ``mgda`` solves eq. 4 on the scaled gradients).

    Args:
        names, base_weights: as for :class:`~kdtune.weighting.base.Weighting`.
        alpha: global distillation weight alpha of eq. 3 (``L_task + alpha v^T f_KD``).
        layerwise: every term its own path (the "-layerwise" variants).
        groups: explicit ``{path: [glob patterns]}``; see :func:`group_terms`.
        fixed: glob patterns of terms kept out of the paths, e.g. ``["kd"]``: each adds
            ``base_weight * scale * term`` to the total (not multiplied by alpha), and the strategy
            weighs only the others. Not in the papers: it keeps plain KD's term as it is while the
            feature paths are weighted (a floor against eq. 6's v -> 1/f turning down a large KD loss).

    Attributes:
        paths: path name -> its term names; ``path_names`` their order (the index of z, w ...).
        fixed_terms: the terms ``fixed`` matched.
    """

    uses_base_weights = False

    def __init__(self, names: Sequence[str], base_weights: Mapping[str, float], alpha: float = 1.0,
                 layerwise: bool = False, groups: Mapping[str, Sequence[str]] | None = None,
                 fixed: Sequence[str] | None = None) -> None:
        super().__init__(names, base_weights)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.fixed_terms = fixed_terms(self.names, fixed or [])
        learned = [n for n in self.names if n not in self.fixed_terms]
        if not learned:
            raise ValueError(f"fixed={list(fixed or [])} matches every term {self.names}: nothing is left to weigh; "
                             f"use weighting 'fixed' instead")
        self.paths = group_terms(learned, layerwise, groups)
        self.path_names = list(self.paths)
        self._path_of = {t: p for p, members in self.paths.items() for t in members}

    def forward(self, terms: Mapping[str, Tensor], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        """The strategy's weighting of the paths (:meth:`weigh_paths`) plus each fixed term at its weight."""
        total, logged = self.weigh_paths({n: v for n, v in terms.items() if n not in self.fixed_terms}, step)
        for name in self.fixed_terms:
            if name in terms:
                w = self.base_weights[name] * self.scales[name]
                total = total + w * terms[name]
                logged[name] = w
        return total, logged

    def weigh_paths(self, terms: Mapping[str, Tensor], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        """(total, {term: weight}) over the path terms present; the strategy's rule."""
        raise NotImplementedError

    def path_losses(self, terms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """f_p = sum_i s_i term_i over the present terms of each path (s_i: :attr:`scales`, 1 unless
        calibrated); a path with no term present is absent."""
        out: dict[str, Tensor] = {}
        for name, value in terms.items():
            if name not in self._path_of:
                raise KeyError(f"unknown term {name!r}; this weighting was built for {self.names}")
            p = self._path_of[name]
            value = value * self.scales[name] if self.scales[name] != 1.0 else value
            out[p] = out[p] + value if p in out else value
        return {p: out[p] for p in self.path_names if p in out}  # stable order

    def term_weights(self, path_weights: Mapping[str, float], terms: Mapping[str, Tensor]) -> dict[str, float]:
        """Every present term gets its path's weight times its scale (for ``w/<term>`` logs and plots)."""
        return {t: float(path_weights[self._path_of[t]]) * self.scales[t] for t in terms}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, paths={self.paths}"
