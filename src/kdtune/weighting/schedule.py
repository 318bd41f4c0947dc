"""Step-scheduled fixed weights: Auto-KD's distillation-weight warm-up and early stop.

Auto-KD's extended space (papers/auto-kd.txt §2.1, "Extended Search Space" item 3) adds
"options for setting warm-up and early-stop for loss weights" without values or formula. Here
both act on every distillation term (``W_f`` and ``W_p`` of eq. 1), never on the cross-entropy:

    w_i(t) = alpha * v_i * s(t),   T = total optimiser steps of the run, k = ``fraction``
    constant:    s(t) = 1
    warmup:      s(t) = min(1, t / (k T))       (linear ramp from 0 over the first k of training)
    early_stop:  s(t) = 1 if t < k T else 0      (the student trains on the labels alone after k)

The trainer hands the run length over before the first step (:meth:`ScheduledWeighting.set_total_steps`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from kdtune.weighting.static import FixedWeighting

SCHEDULES = ("constant", "warmup", "early_stop")


class ScheduledWeighting(FixedWeighting):
    """``w_i(t) = alpha * v_i * s(t)`` with s a warm-up or early-stop schedule (Auto-KD §2.1).

    Args:
        names, base_weights: the terms and their configured weights v_i.
        alpha: global factor (as ``fixed``).
        schedule: ``constant``, ``warmup`` or ``early_stop``.
        fraction: k, the share of training the ramp lasts (warmup) or after which the terms stop
            (early_stop), in (0, 1].
        total_steps: T, if already known; otherwise the trainer sets it before the first step.
    """

    def __init__(self, names: Sequence[str], base_weights: Mapping[str, float], alpha: float = 1.0,
                 schedule: str = "constant", fraction: float = 0.2, total_steps: int | None = None) -> None:
        super().__init__(names, base_weights, alpha)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule weighting: unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
        if not 0 < fraction <= 1:
            raise ValueError(f"schedule weighting: fraction must be in (0, 1], got {fraction}")
        self.schedule, self.fraction = schedule, float(fraction)
        self.total_steps: int | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        """T, the run's length in optimiser steps (epochs x batches per epoch)."""
        if total_steps < 1:
            raise ValueError(f"schedule weighting: total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)

    def factor(self, step: int) -> float:
        """s(t) of the module docstring."""
        if self.schedule == "constant":
            return 1.0
        if self.total_steps is None:
            raise RuntimeError("schedule weighting: the run length is unknown; the Trainer sets it, or call "
                               "weighting.set_total_steps(epochs * batches_per_epoch)")
        k_steps = self.fraction * self.total_steps
        if self.schedule == "warmup":
            return min(1.0, step / k_steps)
        return 1.0 if step < k_steps else 0.0

    def weights_for(self, step: int) -> Mapping[str, float]:
        s = self.factor(step)
        return {n: self.alpha * w * s for n, w in self.base_weights.items()}

    def active(self, step: int) -> Collection[str] | None:
        """After an early stop no term is computed at all (no transform, no loss)."""
        return () if self.schedule == "early_stop" and self.factor(step) == 0.0 else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, schedule={self.schedule}, fraction={self.fraction:g}"
