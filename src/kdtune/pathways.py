"""Pathways: one teacher feature distilled into one student feature.

A :class:`Pathway` ties the first three seams together — *where* (a teacher and a student
module path), *how to align* (a transform) and *how to compare* (a distance) — plus its weight.
It is a plain description; :meth:`Pathway.build` turns it into a :class:`PathwayLoss` module once
the feature shapes are known (from :func:`kdtune.capture.probe`).

Module paths may also be ``"stage:<i>"``: the i-th stage output found automatically
(:func:`kdtune.capture.find_stage_outputs`; negative indices count from the last stage). A path
ending in ``":pre"`` (``"stage:0:pre"``, ``"layer1:pre"``) reads that output before its final
activation (:func:`kdtune.capture.pre_activation_path`), as ReviewKD and DistPro distil.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.capture import Selector
from kdtune.distances import DISTANCES
from kdtune.losses import LOSSES
from kdtune.transforms import FeatureTransform, ShapeMismatchError, build_transform, resize_spatial

STAGE_PREFIX = "stage:"
#: Suffix of a pathway path read before the output's final activation.
PRE_ACTIVATION = ":pre"


def full_precision(x: Tensor) -> Tensor:
    """``x`` in fp32 if it is a reduced-precision float (bf16/fp16 from an autocast forward);
    fp32 and fp64 tensors unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


@dataclass
class Pathway:
    """A teacher -> student distillation path.

    Args:
        teacher: dotted module path in the teacher (``"layer3"``) or ``"stage:<i>"``.
        student: dotted module path in the student.
        method: a catalogue name (``kdtune list losses``: ``fitnets``, ``at``, ``rkd`` ...) that
            supplies the transform, distance, their defaults and the usual weight.
        transform: transform name (``kdtune list transforms``) or module; overrides the method's.
        distance: distance name (``kdtune list distances``) or function; overrides the method's.
        weight: the term's weight (default: the method's usual weight, else 1).
        name: the term's name in logs (default ``"<method or distance>:<teacher>-><student>"``).
        transform_kwargs, distance_kwargs: extra arguments, merged over the method's defaults.
        selector: picks the feature out of a module output that is not one tensor (a tuple, list
            or dict, e.g. a transformer block returning ``(hidden, attention)``): an int index, a
            str key (or attribute), or a callable ``output -> Tensor``; used on both sides.
        teacher_selector, student_selector: the same for one side only (override ``selector``).

    Example:
        >>> Pathway(teacher="layer3", student="blocks.2", transform="conv1x1", distance="mse")
    """

    teacher: str
    student: str
    method: str | None = None
    transform: str | FeatureTransform | None = None
    distance: str | Callable[..., Tensor] | None = None
    weight: float | None = None
    name: str | None = None
    transform_kwargs: dict[str, Any] = field(default_factory=dict)
    distance_kwargs: dict[str, Any] = field(default_factory=dict)
    selector: Selector = None
    teacher_selector: Selector = None
    student_selector: Selector = None

    def selectors(self) -> tuple[Selector, Selector]:
        """(teacher, student) selectors: the per-side one, else the shared one."""
        return (self.selector if self.teacher_selector is None else self.teacher_selector,
                self.selector if self.student_selector is None else self.student_selector)

    def resolved(self) -> Pathway:
        """A copy with method defaults filled in: transform, distance, weight, kwargs and name."""
        transform, distance, weight = self.transform, self.distance, self.weight
        distance_kwargs = dict(self.distance_kwargs)
        if self.method is not None:
            spec = LOSSES.get(self.method)
            if spec.kind != "feature":
                raise ValueError(
                    f"pathway {self.teacher}->{self.student}: {self.method!r} is a logit loss; "
                    f"use it as a logit loss (Distiller(logit_losses=[{self.method!r}])), not a pathway"
                )
            transform = spec.transform if transform is None else transform
            distance = spec.distance if distance is None else distance
            weight = spec.weight if weight is None else weight
            distance_kwargs = {**spec.kwargs, **distance_kwargs}
        transform = "identity" if transform is None else transform
        distance = "mse" if distance is None else distance
        label = self.method or (distance if isinstance(distance, str) else getattr(distance, "__name__", "loss"))
        return replace(
            self, transform=transform, distance=distance, weight=1.0 if weight is None else float(weight),
            distance_kwargs=distance_kwargs, name=self.name or f"{label}:{self.teacher}->{self.student}",
        )

    def build(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> PathwayLoss:
        """Make the loss module for features of the given (probed) shapes."""
        p = self.resolved()
        assert p.name is not None and p.distance is not None and p.transform is not None
        try:
            transform = build_transform(p.transform, tuple(student_shape), tuple(teacher_shape), **p.transform_kwargs)
        except ShapeMismatchError as err:
            raise ShapeMismatchError(f"pathway {p.name!r}: {err}") from None
        distance = DISTANCES.get(p.distance)
        loss = PathwayLoss(p.name, transform, distance, p.distance_kwargs)
        loss.check_shapes(student_shape, teacher_shape)
        return loss


class PathwayLoss(nn.Module):
    """``distance(*transform(f_s, f_t))`` for one pathway; holds the (trainable) transform."""

    def __init__(self, name: str, transform: FeatureTransform, distance: Callable[..., Tensor],
                 distance_kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.name, self.transform, self.distance = name, transform, distance
        self.distance_kwargs = dict(distance_kwargs)

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        # A bf16-autocast forward's features are aligned and compared in full precision.
        s, t = self.transform(full_precision(student_feature), full_precision(teacher_feature))
        return self.distance(s, t, **self.distance_kwargs)

    def after_input_conv(self, h: Tensor, teacher_feature: Tensor) -> Tensor:
        """The loss given ``h``, the transform's input convolution already applied (fused)."""
        s, t = self.transform.forward_after_input_conv(h, teacher_feature)
        return self.distance(s, t, **self.distance_kwargs)

    @torch.no_grad()
    def check_shapes(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        """Fail at construction, not at step 1, when the aligned shapes cannot be compared."""
        n = 2  # two samples: enough for BN in train mode and for batch-relation distances
        s = torch.zeros(n, *student_shape[1:])
        t = torch.zeros(n, *teacher_shape[1:])
        was_training = self.transform.training
        self.transform.eval()  # eval: the probe must not move BN running statistics
        try:
            s2, t2 = self.transform(s, t)
        finally:
            self.transform.train(was_training)
        if getattr(self.distance, "same_shape", True) and s2.shape[1:] != t2.shape[1:]:
            raise ShapeMismatchError(
                f"pathway {self.name!r}: student feature {tuple(student_shape)} and teacher feature "
                f"{tuple(teacher_shape)} are {tuple(s2.shape)} vs {tuple(t2.shape)} after transform "
                f"{type(self.transform).__name__}; the distance needs equal shapes — use an adapter "
                f"transform such as 'conv1x1' (see `kdtune list transforms`)"
            )


def fused_input_convs(items: Sequence[tuple[Hashable, PathwayLoss, Tensor, Tensor]]) -> dict[int, Tensor]:
    """The input convolutions of pathways that read one student feature, computed together.

    ``items`` are ``(feature key, pathway, student feature, teacher feature)``. Pathways whose
    transform starts with a convolution (:meth:`FeatureTransform.input_conv`) of the same kind
    (kernel, stride, padding, dilation, bias or not) on the same feature pooled to the same size
    form a group; a group of two or more runs as one ``conv2d`` with the members' weights
    concatenated along the output channels (Cout = sum of theirs), split back per member — the
    same sums as separate convolutions (up to float rounding), one pass over the input. Only the
    pathways given are concatenated, so a dropped pathway costs nothing.

    Returns:
        ``{index into items: h}`` for the members of groups of two or more.
    """
    groups: dict[tuple, list[tuple[int, nn.Conv2d]]] = {}
    for i, (key, pathway, s, t) in enumerate(items):
        found = pathway.transform.input_conv(s, t)
        if found is None:
            continue
        conv, size = found
        if conv.groups != 1 or conv.padding_mode != "zeros":
            continue
        kind = (key, size, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.bias is None)
        groups.setdefault(kind, []).append((i, conv))
    out: dict[int, Tensor] = {}
    for kind, members in groups.items():
        if len(members) < 2:
            continue
        first, size = members[0][0], kind[1]
        s = items[first][2] if size is None else resize_spatial(items[first][2], size)
        convs = [conv for _, conv in members]
        weight = torch.cat([c.weight for c in convs])
        bias = None if convs[0].bias is None else torch.cat([c.bias for c in convs])
        h = F.conv2d(s, weight, bias, convs[0].stride, convs[0].padding, convs[0].dilation)
        fmt = torch.channels_last if h.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        for (i, _), part in zip(members, h.split([c.out_channels for c in convs], dim=1), strict=True):
            out[i] = part.contiguous(memory_format=fmt)  # a channel slice of NHWC is strided: slow kernels
    return out


def resolve_stage(path: str, stages: Sequence[str], role: str) -> str:
    """Map ``"stage:<i>"`` to the i-th automatically found stage output; other paths unchanged."""
    if not path.startswith(STAGE_PREFIX):
        return path
    try:
        return stages[int(path[len(STAGE_PREFIX):])]
    except (ValueError, IndexError):
        raise ValueError(f"{role} path {path!r}: the {role} has {len(stages)} stages {list(stages)}; "
                         f"use stage:0 .. stage:{len(stages) - 1}") from None


def split_pre_activation(path: str) -> tuple[str, bool]:
    """``"stage:0:pre"`` -> (``"stage:0"``, True); any other path -> (path, False)."""
    if path.endswith(PRE_ACTIVATION):
        return path[: -len(PRE_ACTIVATION)], True
    return path, False


def connect_stages(num_teacher_stages: int, num_student_stages: int,
                   pattern: Literal["same", "all", "j>=i"] = "same") -> list[tuple[int, int]]:
    """Teacher-stage x student-stage connections (DistPro §3.1 search space).

    ``same``: stage i -> stage i (aligned from the last stage when the counts differ);
    ``all``: every (i, j) pair; ``j>=i``: only pairs whose student stage j is at least as deep as
    the teacher stage i (the ReviewKD-style pattern of DistPro's search space).
    """
    if pattern == "same":
        k = min(num_teacher_stages, num_student_stages)
        return [(num_teacher_stages - k + i, num_student_stages - k + i) for i in range(k)]
    pairs = [(i, j) for i in range(num_teacher_stages) for j in range(num_student_stages)]
    if pattern == "all":
        return pairs
    if pattern == "j>=i":
        return [(i, j) for i, j in pairs if j >= i]
    raise ValueError(f"unknown connection pattern {pattern!r}; choose 'same', 'all' or 'j>=i'")
