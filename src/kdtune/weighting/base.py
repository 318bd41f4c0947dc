"""Base class of weighting strategies."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn


class Weighting(nn.Module):
    """Turns a dict of named distillation terms into ``(total, weights)``.

    Args:
        names: the term names, fixed for the run (pathway names and logit-loss names).
        base_weights: each term's configured weight (pathway/logit-loss ``weight``).

    Subclasses implement :meth:`weights_for` (a weight tensor per term, may depend on ``step``
    and carry gradients to learned parameters) or override :meth:`forward` entirely.

    Attributes:
        diagnostics: extra scalars of the last :meth:`forward` (e.g. MGDA's gradient cosine
            similarities, ``{"cos/at|kd": 0.3}``); the distiller adds them to its output dict,
            so the trainer logs them with the weights. Empty for most strategies.
    """

    def __init__(self, names: Sequence[str], base_weights: Mapping[str, float]) -> None:
        super().__init__()
        self.names = list(names)
        self.base_weights = {n: float(base_weights.get(n, 1.0)) for n in self.names}
        self.diagnostics: dict[str, float] = {}

    def bind(self, distiller: nn.Module) -> None:
        """Called once by the distiller that owns this strategy, after it is built.

        A no-op by default. A strategy that needs more than the terms — MGDA differentiates each
        term w.r.t. the student's parameters — keeps a reference here. Keep it out of the module
        tree (``self.__dict__[...]``), or the student would be registered twice.
        """

    def weights_for(self, step: int) -> Mapping[str, Tensor | float]:
        raise NotImplementedError

    def active(self, step: int) -> Collection[str] | None:
        """Terms worth computing at ``step`` (``None``: all). A strategy that gives some terms
        no weight (DistPro's pathway dropping) lists the others, and the distiller skips the
        dropped pathways' transforms and losses entirely."""
        return None

    def forward(self, terms: Mapping[str, Tensor], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        """total = sum_i w_i * terms_i over the terms present (a dropped pathway is absent)."""
        weights = self.weights_for(step)
        total: Tensor = torch.zeros(())
        logged: dict[str, float] = {}
        for name, value in terms.items():
            w = weights[name]
            total = total + w * value
            logged[name] = float(w.detach()) if isinstance(w, Tensor) else float(w)
        return total, logged

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={w:g}" for n, w in self.base_weights.items())
