"""DistPro: learn a weight process α(t) over many pathways by bi-level meta-optimisation (search),
then replay it (retrain). Deng et al. 2022, papers/distpro.txt §3, Alg. 1; SPEC.md § DistPro.

Search, from Python::

    pathways, infos = search_space(teacher, student, (1, 28, 28), connections="all")   # 9 x 3 = 27
    distiller = Distiller(student, teacher, pathways, weighting="distpro",
                          weighting_kwargs={"learned": [p.name for p in pathways]}, input_shape=(1, 28, 28))
    search = DistProCallback(val_loader, infos)                 # 20 % held-out split for L_val
    Trainer(distiller, train_loader, test_loader, cfg, run_dir, callbacks=[search]).fit()
    # -> run_dir/process.json (α per pathway per step) and run_dir/process.png (Fig. 6)

Retrain on the full training set, replaying the process stretched to any length::

    process = Process.load("runs/search/process.json")
    distiller = Distiller(student, teacher, pathways_from_process(process), weighting="process",
                          weighting_kwargs={"process": process, "mode": "process"}, input_shape=(1, 28, 28))
    Trainer(distiller, ..., callbacks=[ProcessReplay()]).fit()

One search step (:meth:`DistProSearch.step`, run before the real step on the same batch):

1. teacher outputs for the batch, once (reused by every look-ahead forward and the real step);
2. virtual step θ' = θ − ξ ∇θ L_train(θ, α) (eq. 4), applying the *real* optimiser's rule
   (momentum buffer, weight decay, Nesterov; or Adam/AdamW) to copies — :func:`virtual_step`;
3. v = ∇θ' L_val(θ') on a held-out batch (task loss only, eq. 3);
4. the hypergradient ∇α̃ L_val(θ'(α̃)) = −ξ ∇²α̃θ L_train · v, by central finite difference (eq. 5)
   or exactly by double backward (``hypergradient="exact"``);
5. α̃ ← α̃ − γ · AlphaOpt(hypergradient) with α's own optimiser (lr 0.05).

Every look-ahead forward is functional (``torch.func.functional_call``) on the real parameters
read-only and on *copies* of the buffers: the real student, its BatchNorm statistics and the
teacher are untouched until the trainer's real step. (The released DistPro code "restored" weights
from a ``state_dict()`` that shares storage with them, ran the teacher in train mode, let look-ahead
forwards move BN statistics and rebuilt the validation iterator every step; none of that here.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from kdtune.build import build_model, build_pathways
from kdtune.capture import find_stage_outputs
from kdtune.data import BatchLoader, DatasetLoader, make_loader
from kdtune.distiller import Distiller, LogitLoss, TeacherOutput
from kdtune.losses import LOSSES
from kdtune.pathways import PRE_ACTIVATION, Pathway, connect_stages
from kdtune.trainer import Callback, Trainer
from kdtune.transforms import check_transform_options
from kdtune.weighting.process import (
    DistProWeighting,
    PathwayInfo,
    Process,
    ProcessMismatchError,
    ProcessWeighting,
    distance_from_uniform,
)

DEFAULT_TRANSFORMS: tuple[str, ...] = ("conv1x1", "conv3x3", "distpro")
Hypergradient = Literal["finite_difference", "exact"]

__all__ = [
    "DEFAULT_TRANSFORMS",
    "DistProCallback",
    "DistProSearch",
    "ProcessReplay",
    "logit_losses_from_process",
    "logit_pathway",
    "pathways_from_process",
    "plot_process",
    "search_space",
    "virtual_step",
]


# ---------------------------------------------------------------------------------- search space


def _stages(model: nn.Module, input_shape: Sequence[int], explicit: Sequence[str] | None) -> list[str]:
    if explicit:
        return list(explicit)
    return find_stage_outputs(model, torch.zeros(2, *input_shape))


def search_space(teacher: nn.Module, student: nn.Module, input_shape: Sequence[int],
                 connections: Literal["all", "j>=i", "same"] = "all",
                 transforms: Sequence[str] = DEFAULT_TRANSFORMS, distance: str = "hcl",
                 teacher_stages: Sequence[str] | None = None,
                 student_stages: Sequence[str] | None = None,
                 transform_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                 tap: Literal["pre", "post"] = "pre",
                 ) -> tuple[list[Pathway], list[PathwayInfo]]:
    """DistPro's search space (§3.1, Fig. 2): stage connections × N candidate transforms.

    Each (teacher stage i, student stage j, transform k) is one pathway named ``t{i}-s{j}:{k}``
    with its own weight process A_{i,j,k}; the paper's CIFAR setting is 3 × 3 connections × 3
    transforms = 27 pathways with the HCL distance.

    Args:
        teacher, student: the two networks (stage outputs found by probing, SPEC "Stage outputs").
        input_shape: (C, H, W) of one input.
        connections: ``all`` (i, j) pairs, ``j>=i`` (ReviewKD-style: the student stage at least as
            deep) or ``same`` (i -> i).
        transforms: transform registry names (default: 1×1 adapter, 3×3 block, DistPro's Fig. 4 block).
        distance: distance registry name (HCL by default; ``mse``, ``l1`` selectable).
        teacher_stages, student_stages: explicit module paths overriding the automatic stages.
        transform_kwargs: extra arguments per transform name, e.g. ``{"distpro": {"pool_first": True}}``.
        tap: ``pre`` reads every stage before its final activation (ReviewKD's HCL taps, which §4.1
            follows, and the released DistPro code); ``post`` reads the stage outputs.

    Returns:
        The pathways (module paths resolved) and their :class:`PathwayInfo` (stage indices kept,
        for process files and transfer).
    """
    if not transforms:
        raise ValueError("search_space: give at least one candidate transform")
    if tap not in ("pre", "post"):
        raise ValueError(f"search_space: tap must be 'pre' or 'post', got {tap!r}")
    suffix = PRE_ACTIVATION if tap == "pre" else ""
    transform_kwargs = dict(transform_kwargs or {})
    unknown = sorted(set(transform_kwargs) - set(transforms))
    if unknown:
        raise ValueError(f"search_space: transform_kwargs for {unknown}, which are not candidate transforms "
                         f"{list(transforms)}")
    for name, kwargs in transform_kwargs.items():
        check_transform_options(name, kwargs)
    t_stages = _stages(teacher, input_shape, teacher_stages)
    s_stages = _stages(student, input_shape, student_stages)
    pairs = connect_stages(len(t_stages), len(s_stages), connections)
    pathways, infos = [], []
    for i, j in pairs:
        for tf in transforms:
            name, kwargs = f"t{i}-s{j}:{tf}", dict(transform_kwargs.get(tf, {}))
            pathways.append(Pathway(teacher=t_stages[i] + suffix, student=s_stages[j] + suffix, transform=tf,
                                    distance=distance, weight=1.0, name=name, transform_kwargs=kwargs))
            infos.append(PathwayInfo(name, t_stages[i], s_stages[j], i, j, tf, distance, dict(kwargs), tap))
    return pathways, infos


def pathways_from_process(process: Process, teacher: nn.Module | None = None, student: nn.Module | None = None,
                          input_shape: Sequence[int] | None = None) -> list[Pathway]:
    """The process's feature pathways, rebuilt for a (possibly different) teacher/student pair.

    Pathways recorded with stage indices are rebuilt as ``stage:<i>`` -> ``stage:<j>`` of the new
    pair (transfer by stage index, Table 3); others use their recorded module paths; each reads
    the tap it was searched with (``:pre`` for pre-activation). Logit pathways are not feature
    pathways: :func:`logit_losses_from_process` rebuilds them. When models
    and ``input_shape`` are given, a stage index the new pair lacks is a
    :class:`~kdtune.weighting.process.ProcessMismatchError` listing both pathway sets.
    """
    if teacher is not None and student is not None and input_shape is not None:
        n_t = len(find_stage_outputs(teacher, torch.zeros(2, *input_shape)))
        n_s = len(find_stage_outputs(student, torch.zeros(2, *input_shape)))
        bad = [p for p in process.pathways if p.teacher_stage is not None and p.student_stage is not None
               and (p.teacher_stage >= n_t or p.student_stage >= n_s)]
        if bad:
            transforms = sorted({str(p.transform) for p in process.pathways})
            available = ", ".join(f"t{i}-s{j}:{tf}" for i in range(n_t) for j in range(n_s) for tf in transforms)
            raise ProcessMismatchError(
                f"the process was searched on a pair with more stages than this one "
                f"(teacher {n_t} stages, student {n_s} stages).\n"
                f"  process ({len(process.pathways)}): {', '.join(process.names)}\n"
                f"  this pair can have: {available}\n"
                f"  missing here: {', '.join(p.name for p in bad)}")
    out = []
    for p in process.pathways:
        if p.kind == "logit":
            continue
        staged = p.teacher_stage is not None and p.student_stage is not None
        suffix = PRE_ACTIVATION if p.tap == "pre" else ""
        out.append(Pathway(teacher=(f"stage:{p.teacher_stage}" if staged else p.teacher) + suffix,
                           student=(f"stage:{p.student_stage}" if staged else p.student) + suffix,
                           transform=p.transform, distance=p.distance, weight=1.0, name=p.name,
                           transform_kwargs=dict(p.transform_kwargs)))
    return out


def logit_pathway(name: str = "kd", kwargs: Mapping[str, Any] | None = None) -> tuple[LogitLoss, PathwayInfo]:
    """DistPro's optional logit pathway: a logit loss (catalogue ``name``, its defaults updated by
    ``kwargs``) learned with its own α̃ like a feature pathway, so a process also says how much the
    logits count against the features (not in the paper). Returns the distiller's term and its
    process entry."""
    spec = LOSSES.get(name)
    if spec.kind != "logit":
        raise ValueError(f"the logit pathway needs a logit loss, got {name!r} (a {spec.kind} method)")
    merged = {**spec.kwargs, **dict(kwargs or {})}
    return LogitLoss(name, 1.0, merged), PathwayInfo(name, "", "", distance=name, kind="logit", loss_kwargs=merged)


def logit_losses_from_process(process: Process) -> list[LogitLoss]:
    """The logit pathways of a process, as the distiller's logit terms (their α comes from the process)."""
    return [LogitLoss(str(p.distance), 1.0, dict(p.loss_kwargs)) for p in process.pathways if p.kind == "logit"]


# ---------------------------------------------------------------------------------- virtual step


def _sgd_rule(theta: Tensor, grad: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor:
    """torch.optim.SGD's update, out of place and differentiable in ``grad``.

    ``d = g + λθ``; with momentum μ: ``b = μ b_prev + (1 − dampening) d`` (``b = d`` on the first
    step), then ``d = d + μ b`` (Nesterov) or ``d = b``; ``θ' = θ − lr d``.
    """
    lr, mu, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
    d = grad + wd * theta if wd else grad
    if mu:
        buf = state.get("momentum_buffer")
        buf = d if buf is None else mu * buf + (1.0 - float(group["dampening"])) * d
        d = d + mu * buf if group["nesterov"] else buf
    return theta - lr * d


def _adam_rule(theta: Tensor, grad: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor:
    """torch.optim.Adam / AdamW's update (no amsgrad), out of place and differentiable in ``grad``.

    ``m = β1 m + (1−β1) g``, ``v = β2 v + (1−β2) g²``, ``θ' = θ − lr m̂ / (√v̂ + eps)`` with bias
    corrections at step t+1; weight decay is decoupled (``θ(1 − lr λ)``, AdamW) or added to g (Adam).
    √v is taken of ``max(v, 1e-30)`` so that a double backward through an exactly-zero gradient
    entry stays finite (a change of at most 1e-15 in √v, far below eps).
    """
    lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
    b1, b2 = (float(b) for b in group["betas"])
    t = int(state["step"]) + 1 if "step" in state else 1
    if wd and group.get("decoupled_weight_decay", False):
        theta = theta * (1.0 - lr * wd)
    elif wd:
        grad = grad + wd * theta
    m = b1 * state["exp_avg"] + (1 - b1) * grad if "exp_avg" in state else (1 - b1) * grad
    v = b2 * state["exp_avg_sq"] + (1 - b2) * grad * grad if "exp_avg_sq" in state else (1 - b2) * grad * grad
    denom = v.clamp_min(1e-30).sqrt() / math.sqrt(1 - b2 ** t) + eps
    return theta - (lr / (1 - b1 ** t)) * m / denom


def virtual_step(theta: Mapping[str, Tensor], grads: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
                 params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    """θ' = one step of ``optimizer``'s own rule from θ with gradient g, without touching it (eq. 4).

    The paper writes the plain-SGD step ``θ − ξ ∇θ L_train`` and notes that with momentum "Eq. 4
    has to be modified accordingly"; this applies the real optimiser's rule with its current
    hyper-parameters (``param_groups``: lr after the scheduler, momentum, dampening, Nesterov,
    weight decay, betas) and state (momentum buffers, Adam moments and step), out of place.

    Args:
        theta: name -> current value (N-d tensors), the parameters to step.
        grads: name -> gradient; a parameter without one is left unchanged (as torch does).
        optimizer: the real optimiser (SGD, Adam or AdamW).
        params: name -> the real parameter (keys of ``optimizer.state`` and of its groups).

    Returns:
        name -> θ' for every name of ``grads``, differentiable in the gradients (and in θ).
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if isinstance(optimizer, torch.optim.SGD):
        rule = _sgd_rule
    elif isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
        rule = _adam_rule
    else:
        raise ValueError(f"DistPro's virtual step follows the real optimiser and supports SGD (momentum, "
                         f"dampening, Nesterov, weight decay), Adam and AdamW; got {type(optimizer).__name__}")
    out = {}
    for name, grad in grads.items():
        p = params[name]
        group = groups.get(id(p))
        if group is None:
            raise ValueError(f"parameter {name!r} is not in the optimiser; the look-ahead needs its update rule")
        if group.get("maximize", False) or group.get("amsgrad", False):
            raise ValueError("DistPro's virtual step does not support maximize=True or amsgrad=True")
        out[name] = rule(theta[name], grad, group, optimizer.state.get(p, {}))
    return out


# ---------------------------------------------------------------------------------- the bi-level step


class DistProSearch:
    """DistPro's α update (eq. 2–5) for a distiller whose weighting is :class:`DistProWeighting`.

    Args:
        distiller: student + teacher + the search-space pathways, weighting ``distpro``.
        hypergradient: ``finite_difference`` (eq. 5; 1 teacher forward, 4 student forwards — the
            θ± ones without a graph, the one at θ shared with the real step under ``share_forward`` —
            and 2 backwards per step besides the real step) or ``exact`` (double backward; the
            ground truth the finite difference is tested against).
        radius: r of ε = r / ‖∇θ' L_val‖ (0.01 in the paper, after DARTS).
        undo_lr_decay: divide the hypergradient α̃'s optimiser steps with by the student's learning-rate
            schedule factor ξ_t / ξ_0 (:meth:`lr_decay`). Eq. 4's hypergradient is proportional to ξ_t, so a
            step decay by 0.1 (§4.1) shrinks it tenfold, while Adam's second moment (β2 0.999: a memory of
            ~1,000 steps) still holds the earlier magnitudes: on a search of a few hundred steps α̃'s steps
            shrink tenfold at each milestone and α is frozen after the first. The paper's search (40 CIFAR
            epochs, ~15,600 steps, ~3,900 a stage) lets Adam renormalise within each stage; this keeps
            the hypergradient at its stage-one scale so a short search behaves the same way.
    """

    def __init__(self, distiller: Distiller, hypergradient: Hypergradient = "finite_difference",
                 radius: float = 0.01, undo_lr_decay: bool = True) -> None:
        if not isinstance(distiller.weighting, DistProWeighting):
            raise TypeError(f"DistPro search needs weighting='distpro', got {type(distiller.weighting).__name__}")
        if distiller.teacher is None:
            raise ValueError("DistPro search needs a teacher")
        if hypergradient not in ("finite_difference", "exact"):
            raise ValueError(f"hypergradient must be 'finite_difference' or 'exact', got {hypergradient!r}")
        if radius <= 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        self.distiller, self.mode, self.radius = distiller, hypergradient, float(radius)
        self.undo_lr_decay = bool(undo_lr_decay)
        self.weighting: DistProWeighting = distiller.weighting
        # The learned buffers (α̃, and g with learn_g) by their names in the weighting and in the distiller.
        self.hyper_keys = {name: next(n for n, b in distiller.named_buffers() if b is getattr(self.weighting, name))
                           for name in self.weighting.hyper_names}

    def _hyper_leaves(self) -> dict[str, Tensor]:
        """Detached copies of the learned buffers that autograd differentiates (weighting names)."""
        return {name: getattr(self.weighting, name).detach().clone().requires_grad_(True)
                for name in self.weighting.hyper_names}

    def _flat(self, leaves: Mapping[str, Tensor], grads: Sequence[Tensor | None]) -> Tensor:
        """The hypergradient as one vector, in ``hyper_names`` order: (L,), or (L + 1,) with g."""
        return torch.cat([(torch.zeros_like(leaf) if gr is None else gr.detach()).reshape(-1)
                          for leaf, gr in zip(leaves.values(), grads, strict=True)])

    def _zeros(self) -> Tensor:
        return self._flat(self._hyper_leaves(), [None] * len(self.hyper_keys))

    # ------------------------------------------------------------------ functional pieces

    def _student_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Student parameters the optimiser trains: θ of eq. 4 that L_val depends on.

        (Adapter parameters are in θ too, but L_val = task loss does not depend on them, so their
        virtual step is never needed.)"""
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        return [n for n, p in self.distiller.named_parameters()
                if n.startswith("student.") and p.requires_grad and id(p) in in_opt]

    @staticmethod
    def lr_decay(optimizer: torch.optim.Optimizer) -> float:
        """ξ_t / ξ_0: the schedule's factor now (1 without a scheduler, which records ``initial_lr``)."""
        group = optimizer.param_groups[0]
        return float(group["lr"]) / float(group["initial_lr"]) if group.get("initial_lr") else 1.0

    def _buffers(self, hyper: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """Copies of every buffer (look-ahead forwards move BN statistics of the copies only), the
        learned ones replaced by ``hyper`` (weighting names -> tensors) when given."""
        bufs = {n: b.clone() for n, b in self.distiller.named_buffers()}
        for name, value in (hyper or {}).items():
            bufs[self.hyper_keys[name]] = value
        return bufs

    def _train_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor] | None, x: Tensor, y: Tensor,
                    step: int, teacher: TeacherOutput) -> Tensor:
        """L_train(θ, α) of eq. 2 on the training batch, with the given parameters and α̃ (and g)."""
        out = functional_call(self.distiller, (dict(params), self._buffers(hyper)), (x, y, step),
                              {"teacher_output": teacher})
        return out["loss"]

    def _val_loss(self, student_params: Mapping[str, Tensor], xv: Tensor, yv: Tensor) -> Tensor:
        """L_val(θ') (eq. 3): the task loss only, on a held-out batch, student in train mode (as the
        real step's BN uses batch statistics; only copies of the running statistics move)."""
        student = self.distiller.student
        params = {n.removeprefix("student."): v for n, v in student_params.items()}
        bufs = {n: b.clone() for n, b in student.named_buffers()}
        return F.cross_entropy(self.distiller.logits_of("student", functional_call(student, (params, bufs), (xv,))), yv)

    def _alpha_grad(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, step: int,
                    teacher: TeacherOutput) -> Tensor:
        """∇α̃ L_train(θ, α̃) at fixed θ (with g: ∇ over (α̃, g)): a forward only, as §3.4 counts. α̃
        enters L_train only through the weighting of the terms, which do not depend on it: the network
        runs without a graph and only the weighting of its terms is differentiated (the same gradient as
        through the whole loss)."""
        with torch.no_grad():
            out = functional_call(self.distiller, (dict(params), self._buffers(None)), (x, y, step),
                                  {"teacher_output": teacher})
        terms = {name: out[name] for name in self.weighting.names if name in out}
        leaves = self._hyper_leaves()
        distill, _ = functional_call(self.weighting, leaves, (terms, step))
        return self._flat(leaves, torch.autograd.grad(distill, list(leaves.values()), allow_unused=True))

    # ------------------------------------------------------------------ hypergradients

    def hypergradient(self, x: Tensor, y: Tensor, xv: Tensor, yv: Tensor, optimizer: torch.optim.Optimizer,
                      step: int = 0, teacher_output: TeacherOutput | None = None,
                      train_output: Mapping[str, Tensor] | None = None) -> Tensor:
        """∇α̃ L_val(θ'(α̃)), θ' the virtual step of eq. 4; (L,), or (L + 1,) with g's entry last when
        the weighting learns g.

        Args:
            x, y: training batch (N, C, H, W), (N,); xv, yv: held-out batch.
            optimizer: the real optimiser (its rule and state define the virtual step).
            step: the global step (for strategies that depend on it).
            teacher_output: the teacher's outputs on ``x`` (computed here if not given).
            train_output: the distiller's own forward on ``(x, y)`` at the current θ and α, graph
                kept (finite difference only): its loss gives ∇θ L_train instead of a look-ahead pass.
        """
        t = teacher_output if teacher_output is not None else self.distiller.teacher_forward(x)
        if self.mode == "exact":
            return self._exact(x, y, xv, yv, optimizer, step, t)
        return self._finite_difference(x, y, xv, yv, optimizer, step, t, train_output)

    def _exact(self, x: Tensor, y: Tensor, xv: Tensor, yv: Tensor, optimizer: torch.optim.Optimizer,
               step: int, t: TeacherOutput) -> Tensor:
        """Eq. 4 by double backward: differentiate L_val(θ'(α̃)) through the virtual step."""
        params = dict(self.distiller.named_parameters())
        names = self._student_names(optimizer)
        leaves = self._hyper_leaves()
        loss = self._train_loss(params, leaves, x, y, step, t)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True, allow_unused=True)
        g = {n: gr for n, gr in zip(names, grads, strict=True) if gr is not None}
        theta1 = virtual_step(params, g, optimizer, params)  # θ'(α̃), with graph
        student = {n: p for n, p in params.items() if n.startswith("student.")}
        val = self._val_loss({**student, **theta1}, xv, yv)
        return self._flat(leaves, torch.autograd.grad(val, list(leaves.values()), allow_unused=True))

    def _finite_difference(self, x: Tensor, y: Tensor, xv: Tensor, yv: Tensor, optimizer: torch.optim.Optimizer,
                           step: int, t: TeacherOutput, train_output: Mapping[str, Tensor] | None = None) -> Tensor:
        """Eq. 5: ``−ξ ∇²α̃θ L_train · v ≈ (∇α̃ L_train(θ⁺) − ∇α̃ L_train(θ⁻)) / 2ε``.

        For plain SGD, ∂θ'/∂α̃ = −ξ ∂g/∂α̃ and θ± = θ ± ε v with ε = r/‖v‖, v = ∇θ' L_val(θ').
        For any other rule θ'(g) (momentum, Nesterov, Adam) ∂θ'/∂α̃ = J ∂g/∂α̃ with J = ∂θ'/∂g, so
        the hypergradient is ``∇²α̃θ L_train · u`` with ``u = Jᵀ v`` (a cheap element-wise vjp:
        u = −ξ(1 + μ)v for Nesterov SGD after its first step), and we difference along u:
        ``θ± = θ ± r u/‖u‖``, hypergradient ``= ‖u‖ (∇α̃ L(θ⁺) − ∇α̃ L(θ⁻)) / 2r``. For plain SGD
        this is exactly eq. 5 (the same θ±, ξ = lr).
        """
        params = dict(self.distiller.named_parameters())
        fixed = {n: p.detach() for n, p in params.items()}
        names = self._student_names(optimizer)
        # 1. g = ∇θ L_train(θ, α) at the current α (one student forward + backward).
        shared = train_output is not None  # the real step's forward: its graph is kept for the real backward
        loss = train_output["loss"] if shared else self._train_loss(params, None, x, y, step, t)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True, retain_graph=shared)
        g = {n: gr.detach().requires_grad_(True) for n, gr in zip(names, grads, strict=True) if gr is not None}
        # 2. θ' by the optimiser's rule, kept differentiable in g for the vjp of step 4.
        with torch.enable_grad():
            theta1 = virtual_step(fixed, g, optimizer, params)
        # 3. v = ∇θ' L_val(θ') (one student forward + backward on the held-out batch).
        leaf = {n: v.detach().requires_grad_(True) for n, v in theta1.items()}
        student = {n: p for n, p in fixed.items() if n.startswith("student.")}
        val = self._val_loss({**student, **leaf}, xv, yv)
        v = torch.autograd.grad(val, list(leaf.values()), allow_unused=True)
        used = [(n, vi) for n, vi in zip(leaf, v, strict=True) if vi is not None]
        if not used:
            return self._zeros()
        # 4. u = Jᵀ v.
        u = torch.autograd.grad([theta1[n] for n, _ in used], [g[n] for n, _ in used],
                                grad_outputs=[vi for _, vi in used])
        norm = torch.sqrt(sum((ui.double() ** 2).sum() for ui in u)).item()
        if norm == 0.0 or not math.isfinite(norm):
            return self._zeros()
        # 5. two forwards at θ± (no backward through the network: only α̃ needs a gradient).
        scale = self.radius / norm
        plus = {**fixed, **{n: fixed[n] + scale * ui for (n, _), ui in zip(used, u, strict=True)}}
        minus = {**fixed, **{n: fixed[n] - scale * ui for (n, _), ui in zip(used, u, strict=True)}}
        g_plus = self._alpha_grad(plus, x, y, step, t)
        g_minus = self._alpha_grad(minus, x, y, step, t)
        return (g_plus - g_minus) * (norm / (2.0 * self.radius))

    def step(self, x: Tensor, y: Tensor, xv: Tensor, yv: Tensor, optimizer: torch.optim.Optimizer,
             step: int = 0, share_forward: bool = False) -> tuple[TeacherOutput, Tensor]:
        """One α update (Alg. 1 line 4) before the real step on the same batch (line 5).

        Args:
            share_forward: the look-ahead's first pass (L_train at θ and the current α) *is* the real
                step's forward: it runs on the distiller itself (moving the student's BatchNorm
                statistics, as the real forward does) and the distiller's next forward on ``x``
                reuses it with the updated α (:meth:`Distiller.reuse_forward`) — one student and
                pathway forward fewer per step, the same numbers. Only for a caller whose next
                step is the real step on ``x``, in the same autocast context, outside DDP (whose
                forward syncs buffers first). Finite-difference hypergradients only.

        Returns:
            The teacher's outputs on ``x`` (hand them to the real step) and the hypergradient (L,).
        """
        t = self.distiller.teacher_forward(x)
        shared = (self.distiller(x, y, step, teacher_output=t) if share_forward and self.mode == "finite_difference"
                  else None)
        hyper = _mean_over_ranks(self.hypergradient(x, y, xv, yv, optimizer, step, t, shared))
        decay = self.lr_decay(optimizer)
        if self.undo_lr_decay and decay > 0:  # at lr 0 (a cosine's last step) the hypergradient is 0 too: keep it
            hyper = hyper / decay
        self.weighting.update_alpha(hyper)
        if shared is not None:
            self.distiller.reuse_forward(x, shared)
        return t, hyper


def _mean_over_ranks(hyper: Tensor) -> Tensor:
    """The hypergradient (L,) averaged over the ranks of a torchrun job; unchanged in one process.

    Each rank differentiates L_val on its own shard (its training batch for θ', its held-out batch
    for L_val), so α̃ updated with the local hypergradient would drift apart between ranks. The
    mean is the hypergradient of the mean of the ranks' validation losses (each through its own
    rank's virtual step), the same averaging DDP applies to the student's gradients; every rank
    then takes the same α̃ step from the same optimiser state and records the same process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return hyper
    hyper = hyper.detach().clone()
    dist.all_reduce(hyper, op=dist.ReduceOp.SUM)
    return hyper / dist.get_world_size()


# ---------------------------------------------------------------------------------- callbacks


def _cycle(loader: BatchLoader | DatasetLoader, start: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Held-out batches forever, one per search step; batch k of the stream depends only on k, so
    a resumed search sees the batches an uninterrupted one would. Built once, never per step."""
    n = len(loader)
    epoch, skip = divmod(start, n)
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yield batch
        epoch += 1


class DistProCallback(Callback):
    """Runs DistPro's search inside :meth:`Trainer.fit`: an α update before every real step, the
    process recorded every step, ``process.json`` + ``process.png`` written to the run directory.

    Under torchrun every rank draws its own shard of the held-out batches (as of the training
    batches), the ranks' hypergradients are averaged (:func:`_mean_over_ranks`), so α̃ and the
    process are identical on every rank; only rank 0 writes files. The process recorded so far is
    part of the trainer's checkpoint (:meth:`state_dict`), so a resumed search continues it exactly.

    Args:
        val: the held-out split's batches (80/20 of the training set in the paper, §4.1).
        pathways: :class:`PathwayInfo` of the learned pathways (from :func:`search_space`), in the
            weighting's order; recorded in the process file for replay and transfer.
        hypergradient, radius, undo_lr_decay: see :class:`DistProSearch`.
        meta: provenance stored in the process file (teacher, student, dataset ...).
        export: also write the finished process file here (e.g. a stable path for retrain configs).
    """

    def __init__(self, val: BatchLoader | DatasetLoader, pathways: Sequence[PathwayInfo] | None = None,
                 hypergradient: Hypergradient = "finite_difference", radius: float = 0.01,
                 meta: Mapping[str, Any] | None = None, export: str | Path | None = None,
                 undo_lr_decay: bool = True) -> None:
        self.val, self.infos = val, list(pathways) if pathways is not None else None
        self.undo_lr_decay = undo_lr_decay
        self.export = Path(export) if export is not None else None
        self.mode, self.radius, self.meta = hypergradient, radius, dict(meta or {})
        self.search: DistProSearch | None = None
        self._val_iter: Iterator[tuple[Tensor, Tensor]] | None = None
        self.steps: list[int] = []
        self.alpha: list[list[float]] = []
        self.alpha_tilde: list[list[float]] = []
        self.kept: list[float] = []
        self.g_trace: list[float] = []  # the learned g per step (weighting with learn_g), else empty
        self.seconds = 0.0

    def on_fit_start(self, trainer: Trainer) -> None:
        self.search = DistProSearch(trainer.distiller, self.mode, self.radius, self.undo_lr_decay)
        w = self.search.weighting
        if self.infos is None:
            self.infos = [PathwayInfo(n, "", "") for n in w.learned]
        if [p.name for p in self.infos] != w.learned:
            raise ValueError(f"pathway infos {[p.name for p in self.infos]} differ from the weighting's {w.learned}")
        # Shard the held-out batches like the training batches: each rank its own share.
        self.val.shard(trainer.dist.rank, trainer.dist.world_size)
        self._val_iter = _cycle(self.val, trainer.global_step)
        if trainer.global_step > 0 and not self.steps:  # resumed, but the checkpoint had no recorded process
            self._restore_from_file(trainer)

    def state_dict(self) -> dict[str, Any]:
        """The process recorded so far, in full precision: saved in the trainer's checkpoint
        (atomically with α̃ and its optimiser moments, which are the weighting's buffers)."""
        n = len(self.infos) if self.infos is not None else 0
        return {"steps": torch.tensor(self.steps, dtype=torch.long),
                "alpha": torch.tensor(self.alpha).reshape(len(self.steps), n),
                "alpha_tilde": torch.tensor(self.alpha_tilde).reshape(len(self.steps), n),
                "kept": torch.tensor(self.kept), "g_trace": torch.tensor(self.g_trace), "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the process of a checkpoint (called by the trainer on resume, before fit starts)."""
        self.steps = state["steps"].tolist()
        self.alpha, self.alpha_tilde = state["alpha"].tolist(), state["alpha_tilde"].tolist()
        self.kept, self.seconds = state["kept"].tolist(), float(state["seconds"])
        self.g_trace = state["g_trace"].tolist() if "g_trace" in state else []

    def _restore_from_file(self, trainer: Trainer) -> None:
        """Resume from a checkpoint that predates :meth:`state_dict`: the process so far comes from
        ``process.json`` (values rounded to 6-7 digits), cut to the steps before the checkpoint."""
        path = trainer.run_dir / "process.json" if trainer.run_dir else None
        if path is None or not path.exists():
            raise RuntimeError(f"resuming a DistPro search at step {trainer.global_step}, but its checkpoint holds "
                               f"no recorded process and there is no {path or 'run_dir/process.json'}")
        old = Process.load(path)
        keep = [k for k, s in enumerate(old.steps) if s < trainer.global_step]
        self.steps = [old.steps[k] for k in keep]
        self.alpha = [old.alpha[k].tolist() for k in keep]
        self.alpha_tilde = [old.alpha_tilde[k].tolist() for k in keep]
        self.kept = [old.kept[k] for k in keep] if old.kept else []
        self.g_trace = [old.g_trace[k] for k in keep] if old.g_trace else []
        self.seconds = float(old.meta.get("search_seconds", 0.0))

    def on_batch_start(self, trainer: Trainer, x: Tensor, y: Tensor) -> None:
        assert self.search is not None and self._val_iter is not None
        t0 = time.perf_counter()
        xv, yv = trainer.prepare_batch(*next(self._val_iter))  # the memory format / device of the model
        step = trainer.global_step
        # The real step reuses the look-ahead's forward at θ (same numbers), except under DDP, whose forward
        # syncs buffers first, and in bf16, whose look-ahead runs outside the real step's autocast.
        share = not trainer.dist.enabled and trainer.cfg.precision != "bf16"
        teacher, _ = self.search.step(x, y, xv, yv, trainer.optimizer, step, share_forward=share)
        trainer.distiller.reuse_teacher_output(x, teacher)  # the real step reuses it
        self.seconds += time.perf_counter() - t0
        w = self.search.weighting
        if self.steps and self.steps[-1] == step:  # the last real step was skipped (non-finite loss)
            recorded = len(self.steps)
            for rows in (self.steps, self.alpha, self.alpha_tilde, self.kept, self.g_trace):
                if len(rows) == recorded:  # g_trace is empty unless g is learned
                    rows.pop()
        self.steps.append(step)
        self.alpha.append(w.alpha().detach().tolist())
        self.alpha_tilde.append(w.alpha_tilde.tolist())
        self.kept.append(float(w.kept_mask().float().mean()))
        if w.learn_g:
            self.g_trace.append(float(w.g_tilde))

    def process(self) -> Process:
        """The process recorded so far."""
        assert self.search is not None and self.infos is not None
        w = self.search.weighting
        meta = {**self.meta, "search_steps": len(self.steps), "hypergradient": self.mode,
                "alpha_optimizer": w.alpha_optimizer, "alpha_lr": w.alpha_lr, "undo_lr_decay": self.undo_lr_decay,
                "search_seconds": round(self.seconds, 2),
                "alpha_from_uniform": self.alpha_from_uniform()}
        return Process(self.infos, self.steps, torch.tensor(self.alpha), torch.tensor(self.alpha_tilde),
                       w.normalization, w.g, w.tau, self.kept, meta, list(self.g_trace) if w.learn_g else None)

    def _write(self, trainer: Trainer) -> None:
        if trainer.run_dir is None or not trainer.dist.is_main or not self.steps:
            return
        process = self.process()
        process.save(trainer.run_dir / "process.json")
        plot_process(process, trainer.run_dir / "process.png")

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._write(trainer)  # before the trainer's checkpoint: a resume finds both in step

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self._write(trainer)
        if self.export is not None and trainer.dist.is_main and self.steps:
            process = self.process()
            process.meta["run_dir"] = str(trainer.run_dir) if trainer.run_dir else None
            process.save(self.export)
        summary["search_seconds_in_alpha_updates"] = round(self.seconds, 2)
        if self.steps:
            summary["alpha_from_uniform"] = self.alpha_from_uniform()

    def alpha_from_uniform(self) -> dict[str, float]:
        """How far the last recorded α is from uniform (:func:`distance_from_uniform`), with the largest
        weight and the uniform one (Σα / L), e.g. ``largest 0.085 vs uniform 0.036``, and the total Σα
        (from L/(L+1) at the start with eq. 2's α̃ = g = 1)."""
        final = torch.tensor(self.alpha[-1])
        return {**distance_from_uniform(final), "largest_alpha": float(final.max()),
                "uniform_alpha": float(final.sum()) / len(final), "alpha_sum": float(final.sum())}


class ProcessReplay(Callback):
    """Tells a :class:`ProcessWeighting` the retrain length (epochs × batches per epoch), so the
    process is stretched onto it (Alg. 1 line 8) before the first step. The Trainer now does this
    itself for any weighting with ``set_total_steps``; this callback only adds the type check and
    stays for code that passes it explicitly."""

    def on_fit_start(self, trainer: Trainer) -> None:
        w = trainer.distiller.weighting
        if not isinstance(w, ProcessWeighting):
            raise TypeError(f"ProcessReplay needs weighting='process', got {type(w).__name__}")
        w.set_total_steps(trainer.cfg.epochs * len(trainer.train_loader))


# ---------------------------------------------------------------------------------- plot


def plot_process(process: Process, path: str | Path) -> Path:
    """α per pathway over steps, one panel per teacher stage (the paper's Fig. 6), as a PNG."""
    from kdtune.report import plt

    groups: dict[str, list[int]] = {}
    for k, p in enumerate(process.pathways):
        label = ("logits" if p.kind == "logit" else f"teacher stage {p.teacher_stage}" if p.teacher_stage is not None
                 else f"teacher {p.teacher}")
        groups.setdefault(label, []).append(k)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.8), squeeze=False, sharey=True)
    steps = process.steps
    for ax, (title, cols) in zip(axes[0], groups.items(), strict=True):
        for k in cols:
            p = process.pathways[k]
            label = (f"s{p.student_stage} {p.transform}" if p.student_stage is not None else p.name)
            ax.plot(steps, process.alpha[:, k].tolist(), label=label, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("α (normalised)")
    total = process.alpha.sum(dim=1)  # the pathways' total weight (moves only with a learned g, in practice)
    learned = "" if process.g_trace is None else f", g {process.g_trace[0]:.2f} → {process.g_trace[-1]:.2f}"
    fig.suptitle(f"DistPro process: {len(process.pathways)} pathways, {len(steps)} steps, "
                 f"Σα {float(total[0]):.3f} → {float(total[-1]):.3f}{learned}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- from a run config


def from_config(cfg: Any, splits: Any, input_shape: Sequence[int]) -> tuple[Distiller, list[Callback]]:
    """Distiller + callbacks of a DistPro run config (what ``kdtune run`` builds).

    * ``distpro:`` section -> the search: pathways of :func:`search_space`, weighting ``distpro``,
      a :class:`DistProCallback` on the held-out split (``data.val_fraction``).
    * ``distill.weighting.name: process`` -> the retrain: pathways from the process file (by stage
      index on this teacher/student: transfer) unless ``distill.pathways`` lists them (with the
      process's names), weighting ``process`` (kwargs ``file``, ``mode``: process | final | equal,
      ``tau``), and :class:`ProcessReplay`. ``mode: kd`` trains plain KD instead (no process, no
      pathways; the configured logit losses, else the catalogue's ``kd``), for a KD row in the same table.

    Args:
        cfg: a :class:`~kdtune.config.RunConfig`; splits: its :class:`~kdtune.build.Splits`.
    """
    if cfg.teacher is None:
        raise ValueError("DistPro needs a teacher: set teacher: {name: ..., checkpoint: ...}")
    n_in, n_cls = splits.train.in_channels, splits.train.num_classes
    student = build_model(cfg.student, n_in, n_cls)
    teacher = build_model(cfg.teacher, n_in, n_cls)
    dc = cfg.distill
    logit_losses = [LogitLoss(ll.name, ll.weight, dict(ll.kwargs)) for ll in dc.logit_losses]
    if cfg.distpro is not None:
        dp = cfg.distpro
        if dc.pathways:
            raise ValueError("a DistPro search builds its own pathways (distpro.connections x distpro.transforms); "
                             "remove distill.pathways, or give stage module paths in distpro.teacher_stages / "
                             "distpro.student_stages")
        if dc.weighting.name not in ("fixed", "distpro"):
            raise ValueError(f"a DistPro search learns the pathway weights itself; remove distill.weighting "
                             f"(got {dc.weighting.name!r})")
        if splits.val is None:
            raise ValueError("a DistPro search needs a held-out split for L_val: set data.val_fraction: 0.2 "
                             "(the paper's 80/20 split of the training set)")
        pathways, infos = search_space(teacher, student, input_shape, dp.connections, dp.transforms, dp.distance,
                                       dp.teacher_stages, dp.student_stages, dp.transform_kwargs, dp.tap)
        if dp.logit_pathway:
            given = [ll for ll in logit_losses if ll.name == "kd"]  # a configured kd becomes the pathway
            loss, info = logit_pathway("kd", given[0].kwargs if given else None)
            logit_losses = [ll for ll in logit_losses if ll.name != "kd"] + [loss]
            infos.append(info)
        kwargs = {"learned": [p.name for p in infos], "normalization": dp.normalization, "g": dp.g,
                  "init": dp.init, "tau": dp.tau, "alpha_optimizer": dp.alpha_optimizer, "alpha_lr": dp.alpha_lr,
                  "alpha_betas": dp.alpha_betas, "alpha_weight_decay": dp.alpha_weight_decay, "learn_g": dp.learn_g}
        distiller = Distiller(student, teacher, pathways, logit_losses, weighting="distpro", weighting_kwargs=kwargs,
                              task_weight=dc.task_weight, input_shape=input_shape,
                              teacher_output=cfg.teacher.output, student_output=cfg.student.output,
                              teacher_precision=cfg.teacher.precision)
        val = make_loader(splits.val, cfg.data.batch_size, shuffle=True, seed=cfg.seed + 1, workers=cfg.data.workers,
                          drop_last=cfg.data.drop_last)
        meta = {"teacher": cfg.teacher.name, "teacher_checkpoint": cfg.teacher.checkpoint, "student": cfg.student.name,
                "dataset": cfg.data.dataset, "train_per_class": cfg.data.train_per_class,
                "val_fraction": cfg.data.val_fraction, "seed": cfg.seed, "epochs": cfg.train.epochs}
        return distiller, [DistProCallback(val, infos, dp.hypergradient, dp.radius, meta, dp.export,
                                           dp.undo_lr_decay)]

    kwargs = dict(dc.weighting.kwargs)
    if kwargs.get("mode") == "kd":  # `baseline=kd`: plain KD in the same protocol, for the same table
        if dc.pathways:
            raise ValueError("baseline kd trains plain KD on the logits: remove distill.pathways")
        losses = logit_losses or [LogitLoss("kd")]  # the configured logit losses, else Hinton KD (tau 4)
        return Distiller(student, teacher, [], losses, weighting="fixed", task_weight=dc.task_weight,
                         input_shape=input_shape, teacher_output=cfg.teacher.output,
                         student_output=cfg.student.output), []
    file = kwargs.pop("file", None)
    if file is None:
        raise ValueError("weighting 'process' needs the process file of a DistPro search: "
                         "distill.weighting.kwargs.file, or `kdtune run <config> process=<run>/process.json`")
    process = Process.load(file)
    if dc.pathways:
        pathways = build_pathways(dc.pathways)
    else:
        pathways = pathways_from_process(process, teacher, student, input_shape)
    replayed = logit_losses_from_process(process)
    clash = sorted({ll.name for ll in replayed} & {ll.name for ll in logit_losses})
    if clash:
        raise ValueError(f"the process has logit pathways {clash}, weighted by the process: remove them from "
                         f"distill.logit_losses (e.g. `distill.logit_losses=[]`)")
    logit_losses += replayed
    distiller = Distiller(student, teacher, pathways, logit_losses, weighting="process",
                          weighting_kwargs={**kwargs, "file": str(file), "process": process},
                          task_weight=dc.task_weight, input_shape=input_shape,
                          teacher_output=cfg.teacher.output, student_output=cfg.student.output,
                          teacher_precision=cfg.teacher.precision)
    return distiller, []  # the Trainer stretches the process (set_total_steps)
