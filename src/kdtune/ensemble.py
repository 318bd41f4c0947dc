"""Several teachers as one module (Auto-KD's multi-teacher extension, :mod:`kdtune.search.multiteacher`).

A config names the ensemble as a model, ``ModelConfig(name="teacher_ensemble", kwargs={"members":
{name: model config}})``; :func:`kdtune.build.build_model` builds it member by member, so a saved
``config.yaml`` trains and resumes like any run.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kdtune.capture import Selector
from kdtune.distiller import pick_logits

#: Model name of a teacher ensemble in a config (built by ``kdtune.build.build_model``).
ENSEMBLE = "teacher_ensemble"


class TeacherEnsemble(nn.Module):
    """Teachers side by side, each a submodule named after it.

    Args:
        members: member name -> model mapping (N, C, H, W) to logits (N, K), or to a tuple / list /
            dict holding them (``outputs``); names must be valid module names (no ".").
        outputs: member name -> where its logits are in its output (a key or an index, as a model
            config's ``output``); a member not named returns its logits.

    ``forward(x)`` returns the mean of the members' logits (N, K); each member's own output is
    captured at the path ``<name>`` (its logits through ``outputs[name]``).
    """

    def __init__(self, members: Mapping[str, nn.Module], outputs: Mapping[str, Selector] | None = None) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a teacher ensemble needs at least 2 members, got {list(members)}")
        for name, model in members.items():
            self.add_module(name, model)
        self.outputs: dict[str, Selector] = dict(outputs or {})

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.named_children()]

    def member_logits(self, name: str, x: Tensor) -> Tensor:
        """Member ``name``'s logits (N, K) for a batch."""
        member, selector = getattr(self, name), self.outputs.get(name)
        out = member(x)
        if selector is None and not isinstance(out, Mapping | tuple | list):
            return out  # its logits (or the teacher fast path's trace of them: not a Tensor yet)
        return pick_logits(out, selector, f"teacher {name} ({type(member).__name__})",
                           f"teacher.kwargs.members.{name}.output={{}}")

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.member_logits(name, x) for name in self.names]).mean(dim=0)
