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
        scales: a per-term factor applied to the term before the strategy weighs it, 1 unless the
            weights were calibrated (:meth:`set_scales`, :mod:`kdtune.calibration`): every strategy
            then starts from the calibrated weights -- ``fixed`` / ``schedule`` / ``distpro`` /
            ``process`` give term i ``w_i * s_i``, ``equal`` ``alpha * s_i``, and ``mgda`` /
            ``adaptive`` weigh the path losses ``sum_i s_i f_i``. Logged weights include it.
        diagnostics: extra scalars of the last :meth:`forward` (e.g. MGDA's gradient cosine
            similarities, ``{"cos/at|kd": 0.3}``); the distiller adds them to its output dict,
            so the trainer logs them with the weights. Empty for most strategies.
    """

    #: Whether the strategy multiplies each term by its configured weight (``fixed``: yes; ``equal``,
    #: ``mgda``, ``adaptive``: no, they set the weight themselves).
    uses_base_weights = True

    def __init__(self, names: Sequence[str], base_weights: Mapping[str, float]) -> None:
        super().__init__()
        self.names = list(names)
        self.base_weights = {n: float(base_weights.get(n, 1.0)) for n in self.names}
        self.scales = dict.fromkeys(self.names, 1.0)
        self.diagnostics: dict[str, float] = {}

    def set_scales(self, scales: Mapping[str, float]) -> None:
        """Set the per-term factors (calibration); terms not named keep theirs."""
        unknown = sorted(set(scales) - set(self.names))
        if unknown:
            raise ValueError(f"scales for unknown terms {unknown}; this weighting was built for {self.names}")
        self.scales.update({n: float(s) for n, s in scales.items()})

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
        """total = sum_i w_i * s_i * terms_i over the terms present (a dropped pathway is absent)."""
        weights = self.weights_for(step)
        total: Tensor = torch.zeros(())
        logged: dict[str, float] = {}
        for name, value in terms.items():
            w = weights[name] * self.scales[name]
            total = total + w * value
            logged[name] = float(w.detach()) if isinstance(w, Tensor) else float(w)
        return total, logged

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={w:g}" for n, w in self.base_weights.items())
