"""Static strategies: ``fixed`` (hand-tuned weights) and ``equal``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kdtune.weighting.base import Weighting


class FixedWeighting(Weighting):
    """w_i = v_i, the weight configured on each pathway / logit loss, times a global ``alpha``.

    This is the hand-tuned strategy of Adaptive Distillation (Chennupati et al. 2021, eq. 3:
    L_task + alpha * v^T f_KD), and plain KD when there is one term.
    """

    def __init__(self, names: Sequence[str], base_weights: Mapping[str, float], alpha: float = 1.0) -> None:
        super().__init__(names, base_weights)
        self.alpha = float(alpha)

    def weights_for(self, step: int) -> Mapping[str, float]:
        return {n: self.alpha * w for n, w in self.base_weights.items()}


class EqualWeighting(Weighting):
    """w_i = alpha for every term (v = 1 in Adaptive Distillation's eq. 3), or alpha / L with
    ``normalize=True`` — the equal-weight baseline of DistPro's Table 1 (1/L over L pathways).

    The configured per-term weights are ignored on purpose: that is what makes it a baseline.
    Calibrated weights are not: with them, w_i = alpha * s_i gives every term the same gradient share.
    """

    uses_base_weights = False

    def __init__(self, names: Sequence[str], base_weights: Mapping[str, float], alpha: float = 1.0,
                 normalize: bool = False) -> None:
        super().__init__(names, base_weights)
        self.alpha, self.normalize = float(alpha), bool(normalize)

    def weights_for(self, step: int) -> Mapping[str, float]:
        w = self.alpha / len(self.names) if self.normalize and self.names else self.alpha
        return dict.fromkeys(self.names, w)
