"""From a run config's ``selfdistill`` section to a SelfDistiller and its callbacks (used by the recipe)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kdtune.config import ConfigError, RunConfig
from kdtune.data import Images, dataset_augment
from kdtune.selfdistill.meta import MetaStep
from kdtune.selfdistill.selfdistiller import SelfDistiller
from kdtune.selfdistill.warmup import AlphaWarmup
from kdtune.trainer import Callback

__all__ = ["from_config"]


def from_config(cfg: RunConfig, student: nn.Module, train: Images,
                input_shape: Sequence[int]) -> tuple[SelfDistiller, list[Callback]]:
    """The SelfDistiller of ``cfg.selfdistill`` around ``student``, and (for ``md``) its MetaStep callback.

    Args:
        cfg: a run config with a ``selfdistill`` section, no teacher and no distillation terms.
        student: the model to train.
        train: the training set (the meta step splits it in halves).
        input_shape: (C, H, W) of one input.

    Raises:
        ConfigError: the config has a teacher or teacher-based distillation terms.
    """
    sc = cfg.selfdistill
    if sc is None:
        raise ConfigError("the config has no selfdistill section")
    if cfg.teacher is not None:
        raise ConfigError(f"selfdistill (method {sc.method!r}) is teacher-free: set `teacher: null` "
                          f"(the config names teacher {cfg.teacher.name!r})")
    if cfg.student.output is not None:
        raise ConfigError(f"selfdistill reads the student's logits tensor itself: student.output "
                          f"({cfg.student.output!r}) is not supported; make the student return its logits")
    if cfg.distill.logit_losses or cfg.distill.pathways:
        raise ConfigError("selfdistill does not combine with distill.logit_losses / distill.pathways (they need a "
                          "teacher); remove them")
    distiller = SelfDistiller(student, input_shape, method=sc.method, stages=sc.stages, alpha=sc.alpha,
                              tau=sc.tau, generator_lr=sc.generator_lr,
                              generator_residual=sc.generator_residual,
                              meta_objective=sc.meta_objective, generator_anchor=sc.generator_anchor)
    callbacks: list[Callback] = []
    if sc.alpha_warmup > 0 and sc.method != "dsn":  # DSN's exits learn from the labels only (a = 1)
        callbacks.append(AlphaWarmup(distiller, sc.alpha, sc.alpha_warmup))
    if sc.method == "md":
        d = cfg.data
        callbacks.append(MetaStep(distiller, train, every=sc.meta_every, steps=sc.meta_steps,
                                  batch_size=sc.meta_batch_size or d.batch_size,
                                  augment=dataset_augment(d.dataset, d.crop_padding, d.flip), seed=cfg.seed))
    return distiller, callbacks
