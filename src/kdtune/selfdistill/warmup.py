"""A warm-up of eq. 4's label weight: exits learn from the labels first, from soft targets later.

MetaDistiller's exit loss (eq. 4) is ``a * CE(y, S_k) + (1 - a) * tau^2 KL(T_k || S_k)`` with a = 0.5
from the first step. T_k comes from the network itself (the final output, or the generator on its
maps), so early in training it is close to uniform: on a 5-epoch run of ResNet-8 (MNIST-3k-own's
protocol) T_k's mean max-probability rose from 0.16 to 0.46, and half of each exit's loss pulled it
towards that near-uniform target — the exits tested ~20 points under DSN's (benchmarks/RESULTS.md,
``own_resnet8``). The warm-up lets ``a`` fall linearly from 1 (labels only, as DSN) at step 0 to the
configured value at ``warmup`` x the run's steps, and keeps it there (as the progressive
self-distillation of Kim et al. 2021 raises its soft-target share with training). It applies to
``sd`` and ``md`` alike; the meta step reads the same current ``a``. ``warmup = 0`` is the paper's
constant ``a``.

Measured (3 seeds each, benchmarks/RESULTS.md), warm-up over the whole run vs constant a = 0.5: on the
5-epoch own pairs MD's exits 64.8 / 69.5 vs 49.0 / 56.1 % (``own_resnet8``; DSN 70.4 / 73.8) and
90.5 / 92.2 vs 81.9 / 85.6 % (``own_pair``; DSN 92.1 / 93.9), final output +1.3 / +1.7; on FMNIST-5k's
30 epochs (``tail5k``) exits 85.55 / 87.15 vs 85.66 / 87.13 %, final 88.30 vs 88.47 %. Hence the config's default
(``selfdistill.alpha_warmup: 1``); :class:`SelfDistiller` itself keeps a constant ``alpha``.
"""

from __future__ import annotations

from kdtune.selfdistill.selfdistiller import SelfDistiller
from kdtune.trainer import Callback, Trainer

__all__ = ["AlphaWarmup", "alpha_at"]


def alpha_at(step: int, total_steps: int, alpha: float, warmup: float) -> float:
    """a of eq. 4 at ``step`` (0-based) of ``total_steps``: 1 -> ``alpha`` linearly over the first
    ``warmup`` x ``total_steps`` steps, ``alpha`` after them (and always, for ``warmup = 0``)."""
    ramp = warmup * total_steps
    if ramp <= 0 or step >= ramp:
        return alpha
    return 1.0 - (1.0 - alpha) * step / ramp


class AlphaWarmup(Callback):
    """Sets ``distiller.alpha`` before every training step from the trainer's global step, so a resumed
    run continues the ramp exactly where it stopped.

    Args:
        distiller: the SelfDistiller (``sd`` or ``md``) whose ``alpha`` moves.
        alpha: the value ``a`` reaches (``selfdistill.alpha``).
        warmup: fraction of the run's steps the ramp takes, in (0, 1].
    """

    def __init__(self, distiller: SelfDistiller, alpha: float, warmup: float) -> None:
        if not 0.0 < warmup <= 1.0:
            raise ValueError(f"warmup must be in (0, 1], got {warmup}")
        if distiller.method == "dsn":
            raise ValueError("DSN's exits learn from the labels only (a = 1): an alpha warm-up needs method sd or md")
        self.distiller, self.alpha, self.warmup = distiller, float(alpha), float(warmup)

    def on_batch_start(self, trainer: Trainer, x, y) -> None:  # noqa: ANN001 - the Callback signature
        total = trainer.cfg.epochs * len(trainer.train_loader)
        self.distiller.alpha = alpha_at(trainer.global_step, total, self.alpha, self.warmup)
