"""The "how much, and when" seam: strategies that turn named loss terms into one total.

A strategy is a small ``nn.Module`` (so learned weights are parameters trained with the student
and saved in checkpoints) with explicit, inspectable state::

    total, weights = strategy(terms, step)   # terms: {"kd": 0-dim tensor, "fitnets:layer3": ...}

``weights`` maps every term name to the (detached) weight it was given, for logs and plots.
Register new strategies in ``WEIGHTINGS``; ``build_weighting`` makes one by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kdtune.registry import Registry
from kdtune.weighting.base import Weighting
from kdtune.weighting.mgda import MGDAWeighting, min_norm_weights
from kdtune.weighting.process import DistProWeighting, Process, ProcessWeighting
from kdtune.weighting.schedule import ScheduledWeighting
from kdtune.weighting.static import EqualWeighting, FixedWeighting
from kdtune.weighting.uncertainty import AdaptiveWeighting

WEIGHTINGS: Registry = Registry("weighting")
WEIGHTINGS.register("fixed")(FixedWeighting)
WEIGHTINGS.register("equal")(EqualWeighting)
WEIGHTINGS.register("distpro")(DistProWeighting)
WEIGHTINGS.register("process")(ProcessWeighting)
WEIGHTINGS.register("adaptive")(AdaptiveWeighting)  # Adaptive Distillation eq. 5-6
WEIGHTINGS.register("mgda")(MGDAWeighting)  # Adaptive Distillation eq. 4
WEIGHTINGS.register("schedule")(ScheduledWeighting)  # Auto-KD §2.1: weight warm-up / early stop


def build_weighting(name_or_obj: str | Weighting, names: Sequence[str], base_weights: Mapping[str, float],
                    **kwargs: Any) -> Weighting:
    """Build a registered strategy for the given term names (an instance is returned as is)."""
    if isinstance(name_or_obj, Weighting):
        return name_or_obj
    cls = WEIGHTINGS.get(name_or_obj)
    try:
        return cls(names=list(names), base_weights=dict(base_weights), **kwargs)
    except TypeError as err:
        raise TypeError(f"weighting {name_or_obj!r}: {err}") from None


__all__ = ["WEIGHTINGS", "Weighting", "FixedWeighting", "EqualWeighting", "DistProWeighting", "ProcessWeighting",
           "Process", "AdaptiveWeighting", "MGDAWeighting", "ScheduledWeighting", "min_norm_weights", "build_weighting"]
