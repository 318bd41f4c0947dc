"""Several teachers for one student: Auto-KD's multi-teacher extension (papers/auto-kd.txt §2.4, eq. 5-6).

The :class:`~kdtune.distiller.Distiller` holds *one* frozen teacher and reads its features by
module path. Several teachers fit that unchanged as one :class:`TeacherEnsemble` module whose
members are named submodules: teacher j's module ``layer3`` is the path ``<member_j>.layer3``, and
its logits are the output of the member itself, the path ``<member_j>``. So every per-teacher term
of eq. 5 is an ordinary pathway,

    L = sum_j mu_j [ W_f * D_f(T_f<f_S, f_Tj>) + W_p * D_p(p_S / tau, p_Tj / tau) ],

feature terms between a student layer and ``<member_j>.<layer>``, logit terms between the
student's classifier (:func:`logits_module`) and ``<member_j>`` (distances ``logit_kd`` /
``logit_dist``). Capture, the offline teacher cache and the trainer need no change.

A config names the ensemble as a model, ``ModelConfig(name="teacher_ensemble", kwargs={"members":
{name: model config}})`` (:func:`ensemble_config`); :func:`kdtune.build.build_model` builds it member by
member (the module itself is :class:`kdtune.ensemble.TeacherEnsemble`), so a saved ``config.yaml``
trains and resumes like any run.

A teacher or student whose forward returns a tuple / list / dict is read through its config's
``output`` (as in a plain run): the ensemble averages the selected logits, a per-teacher logit
pathway reads ``<member_j>`` through it (``teacher_selector``), and the student's side is the
submodule that outputs the selected logits (``net.head`` of a ``{"logits": self.net.head(h)}``).

Limitation: the ensemble's own output (what the trainer's teacher-agreement metrics and a plain
``logit_losses`` entry see) is the mean of the members' logits; per-teacher logit terms must be
pathways, because a logit loss only receives that one output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdtune.capture import Selector
from kdtune.config import ModelConfig, to_dict
from kdtune.distiller import pick_logits
from kdtune.ensemble import ENSEMBLE, TeacherEnsemble

__all__ = ["ENSEMBLE", "TeacherEnsemble", "ensemble_config", "logits_module", "member_names"]


def member_names(teachers: Sequence[ModelConfig]) -> list[str]:
    """Unique member names from the model names (``resnet8``, ``resnet8_2`` for a repeat)."""
    names: list[str] = []
    for mc in teachers:
        base = mc.name.replace(".", "_")
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def ensemble_config(teachers: Sequence[ModelConfig]) -> ModelConfig:
    """The config of a :class:`TeacherEnsemble` of ``teachers`` (named by :func:`member_names`)."""
    members = {name: to_dict(mc) for name, mc in zip(member_names(teachers), teachers, strict=True)}
    return ModelConfig(name=ENSEMBLE, kwargs={"members": members})


@torch.no_grad()
def logits_module(model: nn.Module, x: Tensor, output: Selector = None, role: str = "student") -> str:
    """Path of the submodule whose output *is* the model's logits, e.g. ``fc``.

    Args:
        model: a classifier; it is run once on ``x`` in eval mode (then its mode is restored).
        x: an input batch (N, C, H, W).
        output: where the logits are in the model's output (its config's ``output``); None: the
            output is the logits.
        role: the model's config key (``student``), named in an error.

    Raises:
        OutputError: ``output`` does not find the logits (one line naming the output's keys).
        ValueError: the logits are not the output of a submodule (e.g. reshaped after it).
    """
    outputs: dict[str, Any] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
             for name, m in model.named_modules() if name]
    was = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    logits = pick_logits(out, output, f"{role} {type(model).__name__}", f"{role}.output={{}}")
    for name, value in outputs.items():
        if value is logits:
            return name
    raise ValueError(f"{type(model).__name__}'s logits are not the output of one of its submodules; "
                     f"per-teacher logit distillation needs one (e.g. return self.fc(x))")
