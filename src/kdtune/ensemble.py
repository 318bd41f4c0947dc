"""Several teachers as one module (Auto-KD's multi-teacher extension, :mod:`kdtune.search.multiteacher`).

A config names the ensemble as a model, ``ModelConfig(name="teacher_ensemble", kwargs={"members":
{name: model config}})``; :func:`kdtune.build.build_model` builds it member by member, so a saved
``config.yaml`` trains and resumes like any run.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

#: Model name of a teacher ensemble in a config (built by ``kdtune.build.build_model``).
ENSEMBLE = "teacher_ensemble"


class TeacherEnsemble(nn.Module):
    """Teachers side by side, each a submodule named after it.

    Args:
        members: member name -> model mapping (N, C, H, W) to logits (N, K); names must be valid
            module names (no ".").

    ``forward(x)`` returns the mean of the members' logits (N, K); each member's own logits are
    captured at the path ``<name>``.
    """

    def __init__(self, members: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a teacher ensemble needs at least 2 members, got {list(members)}")
        for name, model in members.items():
            self.add_module(name, model)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.named_children()]

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x) for member in self.children()]).mean(dim=0)
