"""``adaptive``: path weights v = exp(-z) learned by the main optimiser (Adaptive Distillation §3.5).

Chennupati et al. 2021, "Adaptive Distillation: Aggregating Knowledge from Multiple Paths for
Efficient Distillation", after the uncertainty weighting of multi-task learning (Kendall et al.
2018). With path losses f_i (:mod:`kdtune.weighting.paths`) and proxy parameters z_i:

    eq. 5:  min_{w, z}  L_task(w) + alpha * ( sum_i exp(-z_i) f_i(w) + sum_i z_i )
    eq. 6:  d/dz_i = alpha * (1 - exp(-z_i) f_i)   ->   stationary at z_i = log f_i, v_i = 1 / f_i

so each path is scaled, in expectation, by the inverse of its own loss; the sum of z keeps the
weights from collapsing to 0. The stationary point is not invariant to a constant added to f_i:
App. A.1's soft-target path τ² CE(q_T, q_S) = τ² KL + τ² H(q_T) carries the teacher's entropy, which
drives v_ST to ~1/(τ² H) and switches the path off (measured: v_kd 0.04, FMNIST-5k and -2k-x), so
the shipped configs give ST in the KL form (``kd`` ``form: kl``), which has the same gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from kdtune.weighting.gradients import cosine_matrix, path_gradients
from kdtune.weighting.paths import PathWeighting, default_fixed


class AdaptiveWeighting(PathWeighting):
    """Learned path weights v_i = exp(-z_i), loss alpha (sum_i v_i f_i + sum_i z_i) (eq. 5-6).

    z is an ``nn.Parameter`` of this module, so the distiller's optimiser trains it together
    with the student (no extra optimiser, as the paper says) and checkpoints save it.

    Args:
        names, base_weights: term names; the configured weights are ignored (v is learned).
        alpha: global distillation weight of eq. 3 / 5.
        layerwise: every term its own path (paper's "Adaptive-layerwise", App. A.3).
        groups: explicit ``{path: [glob patterns of term names]}``.
        fixed: glob patterns of terms kept at their configured weight, outside eq. 5 (:class:`PathWeighting`).
            None (default): plain KD's term ``kd``, when there is one beside other paths; ``[]``: every term
            is a path, as the paper has it. Why KD stays out by default: eq. 6 drives v to 1/f, and KD's
            τ²·KL is large exactly when KD helps most (an untrained student against a confident teacher).
            Measured on a pair nothing was tuned on (benchmarks/RESULTS.md, `own_pair`: own MNIST models,
            5 epochs): τ²·KL ≈ 12.5 in epoch 1, so v_kd was 0.08–0.23 over the first 3 epochs and adaptive
            ended 1.7 points under plain KD (95.63 ± 0.96 vs 97.30 ± 0.09); with KD fixed at weight 1,
            97.36 ± 0.09. On FMNIST-5k the paper's form is ahead (it raises v_kd above 1 late in training),
            on FMNIST-2k-x the two are level; KD fixed is above KD on those three (`auto5k`,
            `fmnist2k_auto`, `own_pair`), but 0.4 under it with a large spread in `make demo`'s setting,
            where the paper's form is ahead (benchmarks/quickstart_adaptive.py): the default is the
            smaller worst case measured, not a settled choice.
        grad_cosine: also log the cosine similarity between the paths' student gradients each
            training step (``cos/<p>|<q>``, paper Fig. 4c). Costs one extra backward pass per
            path, so it is off by default; it changes nothing in the update.
        lr: z's learning rate, a parameter group of its own in the main optimiser (no weight decay,
            so eq. 6 holds exactly; it follows the run's schedule). Default 0.1, the paper's (§4, SGD
            0.1 for every classification set-up); None: the student's rate. Why not the student's:
            how fast z reaches eq. 6's stationary point should not depend on the rate a student
            needs. Measured (FMNIST-2k-x, student lr 0.01, 240 steps): with z at the student's rate,
            AT's v·f stayed at 0.01–0.46 over the first quarter of the run (stationary point: 1); at
            0.1 it is 0.87–1.16 from step 30 there, and 0.73–1.74 from step 20 on FMNIST-5k.

    Attributes:
        z: (P,) proxy parameters, one per path in ``path_names`` order, initialised to 0 (v = 1,
            as the paper's initial weights [1, 1]).

    Note:
        With ``lr=None`` the trainer's optimiser applies its weight decay to z too, which adds
        ``wd * z_i`` to eq. 6 and pulls z slightly towards 0 (v towards 1).
    """

    def __init__(self, names: Sequence[str], base_weights: Mapping[str, float], alpha: float = 1.0,
                 layerwise: bool = False, groups: Mapping[str, Sequence[str]] | None = None,
                 grad_cosine: bool = False, lr: float | None = 0.1, fixed: Sequence[str] | None = None) -> None:
        super().__init__(names, base_weights, alpha, layerwise, groups, default_fixed(names, fixed))
        if lr is not None and not lr > 0:
            raise ValueError(f"adaptive weighting: lr (z's learning rate) must be > 0 or null, got {lr}")
        self.z = nn.Parameter(torch.zeros(len(self.path_names)))
        self.grad_cosine = bool(grad_cosine)
        self.lr = None if lr is None else float(lr)
        self._student: nn.Module | None = None

    def bind(self, distiller: nn.Module) -> None:
        """Remember the student (only used by ``grad_cosine``); kept out of the module tree."""
        self.__dict__["_student"] = getattr(distiller, "student", distiller)

    def optimizer_groups(self) -> list[dict[str, object]]:
        """z's own parameter group (:func:`kdtune.trainer.parameter_groups`); none with ``lr=None``."""
        return [] if self.lr is None else [{"params": [self.z], "lr": self.lr, "weight_decay": 0.0}]

    def path_weights(self) -> dict[str, float]:
        """Current v_i = exp(-z_i) per path (without alpha)."""
        return dict(zip(self.path_names, torch.exp(-self.z.detach()).tolist(), strict=True))

    def weigh_paths(self, terms: Mapping[str, Tensor], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        """total = alpha * sum_p (exp(-z_p) f_p + z_p) over the paths present (eq. 5).

        Returns:
            (0-dim total, {term: alpha * exp(-z_p)} for each present term).
        """
        self.diagnostics = {}
        losses = self.path_losses(terms)
        if not losses:
            return torch.zeros((), device=self.z.device), {}
        index = torch.tensor([self.path_names.index(p) for p in losses], device=self.z.device)
        z = self.z[index]                                   # (P',)
        f = torch.stack(list(losses.values()))              # (P',)
        total = self.alpha * (torch.exp(-z) * f + z).sum()  # eq. 5, distillation part f_d
        if self.grad_cosine and torch.is_grad_enabled():
            self._log_cosines(losses)
        v = torch.exp(-z.detach()) * self.alpha
        return total, self.term_weights(dict(zip(losses, v.tolist(), strict=True)), terms)

    def _log_cosines(self, losses: Mapping[str, Tensor]) -> None:
        if self._student is None:
            raise RuntimeError("grad_cosine needs the student's parameters: the Distiller calls bind(); "
                               "a standalone AdaptiveWeighting needs .bind(student)")
        params = [p for p in self._student.parameters() if p.requires_grad]
        if len(losses) < 2 or not any(f.requires_grad for f in losses.values()):
            return
        grads = path_gradients(list(losses.values()), params)  # (P', D)
        self.diagnostics = cosine_diagnostics(list(losses), cosine_matrix((grads @ grads.T).double()))


def cosine_diagnostics(paths: Sequence[str], cos: Tensor) -> dict[str, float]:
    """``{"cos/<p>|<q>": cos_pq}`` for every pair p < q, plus their mean ``cos/mean`` (Fig. 4c)."""
    out = {f"cos/{paths[i]}|{paths[j]}": float(cos[i, j])
           for i in range(len(paths)) for j in range(i + 1, len(paths))}
    if out:
        out["cos/mean"] = sum(out.values()) / len(out)
    return out
