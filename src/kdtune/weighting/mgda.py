"""``mgda``: multi-objective path weights, the min-norm point of the path gradients (Adaptive Distillation §3.4).

Chennupati et al. 2021, eq. 4, after MGDA-UB (Sener & Koltun 2018): at every step, with g_i the
gradient of path i w.r.t. the student's parameters (zeros where the path does not reach),

    eq. 4:  v* = argmin_{v in simplex}  || sum_i v_i g_i ||_2^2

and the update direction is ``grad L_task + alpha * sum_i v*_i g_i``. The combination d = sum v*_i g_i
satisfies g_i . d >= ||d||^2 >= 0 for every i (the optimality condition of eq. 4), so -d
increases no path's loss to first order; d = 0 means a Pareto-stationary point.

The strategy fits the weighting interface: it computes the g_i through
:func:`~kdtune.weighting.gradients.path_gradients`, solves eq. 4 and returns
``total = alpha * sum_i v*_i f_i`` with v* detached, whose gradient is exactly the combined direction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
import torch
from torch import Tensor, nn

from kdtune.weighting.gradients import cosine_matrix, path_gradients
from kdtune.weighting.paths import PathWeighting, default_fixed
from kdtune.weighting.uncertainty import cosine_diagnostics


def min_norm_2(gram: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact min-norm point of the segment [g_1, g_2] from its Gram matrix M (2, 2).

    min_{g in [0, 1]} ||g g_1 + (1 - g) g_2||^2 is reached at
    g* = clip((M_22 - M_12) / (M_11 - 2 M_12 + M_22), 0, 1)  (Sener & Koltun 2018, Alg. 1).

    Returns:
        (weights (2,), squared norm of the min-norm point).
    """
    m11, m12, m22 = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
    denom = m11 - 2.0 * m12 + m22  # ||g_1 - g_2||^2
    gamma = 0.5 if denom <= 0.0 else min(1.0, max(0.0, (m22 - m12) / denom))
    w = np.array([gamma, 1.0 - gamma])
    return w, float(w @ gram @ w)


def min_norm_weights(gram: Tensor | np.ndarray, max_iter: int = 1000, tol: float = 1e-12) -> np.ndarray:
    """v* = argmin_{v in simplex} v^T M v, the min-norm point of conv{g_i} (eq. 4), from M = G G^T.

    Two paths: the closed form :func:`min_norm_2`. More: Frank-Wolfe with away steps
    (Lacoste-Julien & Jaggi 2015) and exact line search, started from the best pair's closed form
    as in Sener & Koltun 2018 (Alg. 2). Plain Frank-Wolfe converges as O(1/t); the away steps
    (moving weight off the worst vertex in use) make it linear, which matters when the optimum
    lies on a face of the simplex.

    Args:
        gram: (K, K) positive semi-definite Gram matrix of the path gradients.
        max_iter: iteration cap.
        tol: stop when the Frank-Wolfe duality gap, relative to max_i M_ii, falls below it.

    Returns:
        (K,) float64 weights, >= 0, summing to 1.
    """
    m = np.asarray(gram.detach().cpu().double() if isinstance(gram, Tensor) else gram, dtype=np.float64)
    k = m.shape[0]
    if m.shape != (k, k) or k == 0:
        raise ValueError(f"min_norm_weights needs a square (K, K) Gram matrix, got shape {m.shape}")
    if k == 1:
        return np.ones(1)
    scale = float(np.max(np.diag(m)))
    if not np.isfinite(scale):
        raise ValueError(f"min_norm_weights: the path gradients are not finite (Gram diagonal {np.diag(m)})")
    if scale <= 0.0:  # every gradient is zero: any point is optimal
        return np.full(k, 1.0 / k)
    m = m / scale  # the weights do not depend on the scale; the tolerance then is relative
    if k == 2:
        return min_norm_2(m)[0]

    # Start at the best pair's exact solution.
    best = None
    for i, j in combinations(range(k), 2):
        w2, val = min_norm_2(m[np.ix_([i, j], [i, j])])
        if best is None or val < best[0]:
            best = (val, i, j, w2)
    _, i, j, w2 = best
    w = np.zeros(k)
    w[i], w[j] = w2

    for _ in range(max_iter):
        mw = m @ w                       # half the gradient of w^T M w
        f = float(w @ mw)
        t = int(np.argmin(mw))           # Frank-Wolfe vertex
        fw_gap = f - mw[t]               # >= 0; 0 at the optimum
        if fw_gap <= tol:
            break
        support = np.flatnonzero(w > 0)
        a = int(support[np.argmax(mw[support])])  # away vertex: worst vertex in use
        away_gap = mw[a] - f
        if fw_gap >= away_gap or w[a] >= 1.0:
            d = -w.copy()
            d[t] += 1.0
            step_max = 1.0
        else:
            d = w.copy()
            d[a] -= 1.0
            step_max = w[a] / (1.0 - w[a])
        dmd = float(d @ m @ d)
        step = step_max if dmd <= 0.0 else min(step_max, max(0.0, -float(mw @ d) / dmd))
        w = w + step * d
        w[w < 1e-16] = 0.0               # an away step that empties a vertex removes it exactly
        w /= w.sum()
    return w


class MGDAWeighting(PathWeighting):
    """Multi-objective path weights: the min-norm convex combination of path gradients (eq. 4).

    Each training step: g_p = d f_p / d(student parameters) for every path p (one extra backward
    pass per path), v* = :func:`min_norm_weights` of their Gram matrix, and
    ``total = alpha * sum_p v*_p f_p`` (v* detached), so the trainer's backward produces
    ``grad L_task + alpha * sum_p v*_p g_p`` on the student. Adapter parameters (a pathway's own
    transform) are not shared between paths, so, as in MGDA-UB, only the student's parameters
    enter eq. 4; each adapter gets its path's gradient scaled by alpha v*_p.

    Args:
        names, base_weights: term names; the configured weights are ignored (v is solved).
        alpha: global distillation weight, combining the min-norm direction with the task gradient.
        layerwise: every term its own path.
        groups: explicit ``{path: [glob patterns of term names]}``.
        fixed: glob patterns of terms kept at their configured weight, outside eq. 4 (:class:`PathWeighting`).
            None (default): plain KD's term ``kd`` when there is one beside other paths (as ``adaptive``);
            ``[]``: every term is a path, as the paper has it. Why: for two paths eq. 4's solution leans to
            the smaller gradient, and plain KD's is the large one, so MGDA switches KD off. Measured
            (benchmarks/RESULTS.md): on the own MNIST pair (`own_pair`) KD's gradient is 100-1,700x AT's,
            w/kd was <= 0.0003 from the first logged step and the run ended below the student alone (91.45
            vs 92.37; KD 97.30); calibrated start weights only delay it (w/kd 0.0 from step ~130 on
            FMNIST-5k). With KD fixed and the AT stages one path, eq. 4 has a single path (v = 1): MGDA
            then adds nothing beyond that path at weight alpha; ``layerwise=True`` lets it weigh the stages.
        max_iter, tol: Frank-Wolfe settings of :func:`min_norm_weights`.

    Attributes:
        weights: (P,) buffer, the last v* (uniform before the first step). Used as is when no
            gradient can be taken (under ``torch.no_grad``), and saved in checkpoints.

    Also logs ``cos/<p>|<q>``, the cosine similarity between path gradients (paper Fig. 4c).

    Note:
        Under DDP every rank solves eq. 4 on its own mini-batch gradients; DDP then averages the
        resulting directions (each a descent direction for that rank's batch).
    """

    def __init__(self, names: Sequence[str], base_weights: Mapping[str, float], alpha: float = 1.0,
                 layerwise: bool = False, groups: Mapping[str, Sequence[str]] | None = None,
                 max_iter: int = 1000, tol: float = 1e-12, fixed: Sequence[str] | None = None) -> None:
        super().__init__(names, base_weights, alpha, layerwise, groups, default_fixed(names, fixed))
        self.max_iter, self.tol = int(max_iter), float(tol)
        self.register_buffer("weights", torch.full((len(self.path_names),), 1.0 / max(1, len(self.path_names))))
        self._student: nn.Module | None = None

    def bind(self, distiller: nn.Module) -> None:
        """Remember the student (``distiller.student``, or a module given directly) whose
        parameters the path gradients are taken w.r.t.; kept out of the module tree."""
        self.__dict__["_student"] = getattr(distiller, "student", distiller)

    def path_weights(self) -> dict[str, float]:
        """Last solved v*_p per path (without alpha)."""
        return dict(zip(self.path_names, self.weights.tolist(), strict=True))

    def weigh_paths(self, terms: Mapping[str, Tensor], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        """Solve eq. 4 on this batch's path gradients; total = alpha * sum_p v*_p f_p (v* detached)."""
        self.diagnostics = {}
        losses = self.path_losses(terms)
        if not losses:
            return torch.zeros((), device=self.weights.device), {}
        names = list(losses)
        index = [self.path_names.index(p) for p in names]
        f = torch.stack(list(losses.values()))  # (P',)
        if torch.is_grad_enabled() and f.requires_grad and len(names) > 1:
            v = self._solve(list(losses.values()), names)
            self.weights.zero_()
            self.weights[index] = v
        elif len(names) == 1:
            v = torch.ones(1, device=f.device)
        else:  # no graph (evaluation): reuse the last solution, renormalised over the present paths
            v = self.weights[index]
            v = v / v.sum() if float(v.sum()) > 0 else torch.full_like(v, 1.0 / len(v))
        total = self.alpha * (v.to(f.dtype).detach() * f).sum()
        return total, self.term_weights(dict(zip(names, (self.alpha * v).tolist(), strict=True)), terms)

    def _solve(self, losses: list[Tensor], names: list[str]) -> Tensor:
        if self._student is None:
            raise RuntimeError("mgda needs the student's parameters: the Distiller calls bind(); "
                               "a standalone MGDAWeighting needs .bind(student)")
        params = [p for p in self._student.parameters() if p.requires_grad]
        grads = path_gradients(losses, params)   # (P', D), zeros where a path does not reach
        gram = (grads.double() @ grads.double().T)  # (P', P'); float64 for a well-posed solve
        w = min_norm_weights(gram, self.max_iter, self.tol)
        self.diagnostics = cosine_diagnostics(names, cosine_matrix(gram))
        return torch.as_tensor(w, dtype=self.weights.dtype, device=self.weights.device)
