"""Distiller: a student, a frozen teacher, pathways, logit losses and a weighting -> a loss dict.

    distiller = Distiller(student, teacher,
                          pathways=[Pathway(teacher="layer3", student="layer3", method="fitnets")],
                          logit_losses=["kd"], weighting="fixed", input_shape=(1, 28, 28))
    out = distiller(x, y)      # {"loss", "logits", "task", "kd", "fitnets:layer3->layer3", "w/kd", ...}

The objective is ``task_weight * CE(student(x), y) + weighting({term_i})`` with one term per logit
loss and per pathway. The teacher is frozen: always in eval mode (its BatchNorm statistics never
move), run under ``no_grad``, computed once per batch (:meth:`Distiller.teacher_forward`) and
reusable by callers that need several student forwards per batch (DistPro's look-ahead) or that
read teacher outputs from a cache (Auto-KD). It runs through :class:`kdtune.teacher.TeacherRunner`:
one traced graph with BatchNorm folded and fused inference kernels, checked against the teacher's
own forward (``teacher_precision="bf16"`` trades exactness for speed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.calibration import Calibration, calibrated_weights, gradient_norms
from kdtune.capture import (
    FeatureCapture,
    Selector,
    describe_output,
    feature_shape,
    find_stage_outputs,
    get_module,
    pre_activation_path,
    probe,
    split_tap,
)
from kdtune.capture import select_output as _pick
from kdtune.losses import LOSSES
from kdtune.pathways import Pathway, PathwayLoss, full_precision, fused_input_convs, resolve_stage, split_pre_activation
from kdtune.teacher import Precision, TeacherRunner
from kdtune.weighting import Weighting, build_weighting


@dataclass
class LogitLoss:
    """A loss on (student logits, teacher logits, labels) from the catalogue (``kd``, ``dkd`` ...)."""

    name: str
    weight: float | None = None  # None: the catalogue's usual weight for this loss
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherOutput:
    """What the teacher gives for one batch: logits (N, K) and features by module path."""

    logits: Tensor
    features: dict[str, Tensor]


def _autocast_enabled(x: Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def freeze(model: nn.Module) -> nn.Module:
    """Put a model in eval mode with no parameter requiring a gradient."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class OutputError(ValueError):
    """A model's output does not fit (not a logits tensor and no selector, a wrong key ...), or the
    model cannot take the data's input. The message names the model, the output and the fix."""


def pick_logits(output: Any, selector: Selector, model: str, setting: str) -> Tensor:
    """The logits in a model's ``output``, picked by its output selector: the one helper of the
    Distiller and of every method that runs a model itself (Auto-KD's probes, a teacher ensemble).

    Args:
        output: what the model's forward returned.
        selector: where the logits are (:func:`~kdtune.capture.select_output`); None: ``output`` is them.
        model: names the model in an error, e.g. ``"student MyNet"``.
        setting: what sets ``selector``, ``{}`` standing for its value: ``"Distiller(..., student_output={})"``,
            ``"student.output={}"``.

    Raises:
        OutputError: one line naming the model, the output's structure (a dict's keys) and ``setting``.
    """
    if selector is None and isinstance(output, Tensor):
        return output  # the usual case, kept free of any checking cost
    if selector is None:
        keys = list(output) if isinstance(output, Mapping) else None
        example = repr(keys[0]) if keys else "0"
        raise OutputError(f"{model} returns {describe_output(output)}, not a logits tensor; say where the logits "
                          f"are: {setting.format(example)} (a key or an index)")
    try:
        return _pick(output, selector)
    except (TypeError, IndexError, KeyError) as err:
        msg = err.args[0] if err.args else str(err)
        raise OutputError(f"{model}: {msg.rstrip('.')}. Fix: {setting.format('<key or index of the logits>')}") \
            from None


def _feature_name(path: str, selector: Selector) -> str:
    """The capture name of a module's (selected) output: two pathways may read one module's
    output through different selectors."""
    return path if selector is None else f"{path}[{selector!r}]"


class Distiller(nn.Module):
    """Student + frozen teacher + pathways + logit losses + weighting.

    Args:
        student: any ``nn.Module`` mapping a batch x (as the loader yields it, e.g. (N, C, H, W))
            to logits (N, K) — or to a tuple / list / dict holding them (``student_output``).
        teacher: any frozen-able ``nn.Module`` with the same output; ``None`` trains the student
            alone (cross-entropy only) through the same code path.
        pathways: feature pathways (module paths or ``stage:<i>``).
        logit_losses: names or :class:`LogitLoss` (``"kd"`` = Hinton soft targets, tau=4).
        weighting: strategy name (``fixed``, ``equal`` ...) or a :class:`Weighting` instance.
        weighting_kwargs: arguments of the strategy (e.g. ``alpha``).
        task_weight: weight of the cross-entropy with the labels.
        input_shape: (C, H, W) of one input; needed to build pathways (probes feature shapes).
            When given, student and teacher are run once on it here, so a model that cannot take
            the input or whose output does not fit fails now, not at step 1.
        teacher_output, student_output: where the logits are in a model output that is not one
            tensor: an int index (tuple/list), a str key (dict, or attribute of e.g. a HF
            ``ModelOutput``) or a callable ``output -> Tensor``. ``None``: the output is the logits.
        teacher_precision: ``"fp32"`` (exact up to float rounding) or ``"bf16"`` teacher forward.
        fast_teacher: False runs the teacher's own forward with hooks (the reference path; also
            taken when the teacher's logits or features need selectors).

    Only the student, the pathway transforms and the weighting are parameters of this module
    (and of its ``state_dict``); the teacher is held aside so checkpoints stay small and no
    optimiser or DDP ever sees it.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 pathways: Sequence[Pathway] = (), logit_losses: Sequence[str | LogitLoss] = (),
                 weighting: str | Weighting = "fixed", weighting_kwargs: Mapping[str, Any] | None = None,
                 task_weight: float = 1.0, input_shape: Sequence[int] | None = None,
                 teacher_output: Selector = None, student_output: Selector = None,
                 teacher_precision: Precision = "fp32", fast_teacher: bool = True) -> None:
        super().__init__()
        if teacher is None and (pathways or logit_losses):
            raise ValueError("pathways and logit losses need a teacher; pass teacher= or remove them")
        self.student = student
        self.__dict__["teacher"] = freeze(teacher) if teacher is not None else None  # not a submodule
        self.output_selectors: dict[str, Selector] = {"student": student_output, "teacher": teacher_output}
        if input_shape is not None:
            self.check_input(torch.zeros(2, *input_shape))
        self._pending_teacher: tuple[Tensor, TeacherOutput] | None = None  # see reuse_teacher_output
        self._pending_forward: tuple[Tensor, dict[str, Tensor], bool] | None = None  # see reuse_forward
        # Pathways on one student feature as one conv (pathways.fused_input_convs): numerically the same,
        # but measured no faster on CPU (RESULTS.md, distpro_cost_pool_first), so off by default.
        self.fuse_input_convs = False
        self.task_weight = float(task_weight)
        self.logit_losses = [self._resolve_logit_loss(x) for x in logit_losses]
        self.pathways = nn.ModuleList(self._build_pathways(list(pathways), input_shape))
        names = [ll.name for ll in self.logit_losses] + [p.name for p in self.pathways]
        if len(set(names)) != len(names):
            raise ValueError(f"two distillation terms share a name: {names}; give pathways distinct name=")
        base = {ll.name: ll.weight for ll in self.logit_losses}
        base.update({p.name: w for p, w in zip(self.pathways, self._pathway_weights, strict=True)})
        self.weighting = build_weighting(weighting, names, base, **dict(weighting_kwargs or {}))
        self.weight_sources = dict(zip(names, self._weight_sources(logit_losses, pathways), strict=True))
        self.calibration: Calibration | None = None  # set by calibrate() / set_calibration()
        self.weighting.bind(self)  # strategies needing the student's parameters (MGDA) keep them
        # Several pathways may read one module (DistPro: every stage x N transforms): capture it once.
        self._student_capture = (FeatureCapture(student, self._student_features, self._student_selectors).attach()
                                 if self.pathways else None)
        # The fast path traces plain module outputs; selected outputs keep the teacher's own forward.
        fast_teacher = fast_teacher and teacher_output is None
        self._teacher_runner = (TeacherRunner(self.teacher, self._teacher_features, teacher_precision, fast_teacher,
                                              self._teacher_selectors) if self.teacher is not None else None)

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _resolve_logit_loss(item: str | LogitLoss) -> LogitLoss:
        ll = LogitLoss(item) if isinstance(item, str) else item
        spec = LOSSES.get(ll.name)
        if spec.kind != "logit":
            raise ValueError(f"{ll.name!r} is a feature method; use it in a Pathway(method={ll.name!r}, ...)")
        weight = spec.weight if ll.weight is None else float(ll.weight)
        return LogitLoss(ll.name, weight, {**spec.kwargs, **ll.kwargs})

    @staticmethod
    def _weight_sources(logit_losses: Sequence[str | LogitLoss], pathways: Sequence[Pathway]) -> list[str]:
        """Where each term's weight comes from: ``user`` (given), ``catalogue`` (the method's usual
        weight) or ``default`` (1: no method, no weight), in term order."""
        given = [None if isinstance(x, str) else x.weight for x in logit_losses]
        sources = ["catalogue" if w is None else "user" for w in given]
        return sources + ["user" if p.weight is not None else "catalogue" if p.method else "default"
                          for p in pathways]

    def _build_pathways(self, pathways: list[Pathway], input_shape: Sequence[int] | None) -> list[PathwayLoss]:
        self._student_paths: list[str] = []  # capture names: module path, [selector] appended if any
        self._teacher_paths: list[str] = []
        self._student_features: dict[str, str] = {}  # capture name -> module path
        self._teacher_features: dict[str, str] = {}
        self._student_selectors: dict[str, Selector] = {}
        self._teacher_selectors: dict[str, Selector] = {}
        self._pathway_weights: list[float] = []
        if not pathways:
            return []
        if input_shape is None:
            raise ValueError("pathways need input_shape=(C, H, W) to probe the feature shapes")
        example = torch.zeros(2, *input_shape)
        s_info, t_info = probe(self.student, example), probe(self.teacher, example)
        needs_stages = any(p.student.startswith("stage:") or p.teacher.startswith("stage:") for p in pathways)
        s_stages = find_stage_outputs(self.student, example) if needs_stages else []
        t_stages = find_stage_outputs(self.teacher, example) if needs_stages else []
        built = []
        for p in pathways:
            s_path = self._resolve_path(self.student, p.student, s_stages, "student", example)
            t_path = self._resolve_path(self.teacher, p.teacher, t_stages, "teacher", example)
            p = Pathway(**{**p.__dict__, "student": s_path, "teacher": t_path}).resolved()
            t_sel, s_sel = p.selectors()
            s_shape = self._shape(self.student, s_info, s_path, s_sel, example, "student")
            t_shape = self._shape(self.teacher, t_info, t_path, t_sel, example, "teacher")
            built.append(p.build(s_shape, t_shape))
            for role, path, sel in (("student", s_path, s_sel), ("teacher", t_path, t_sel)):
                name = _feature_name(path, sel)
                getattr(self, f"_{role}_paths").append(name)
                getattr(self, f"_{role}_features")[name] = path
                if sel is not None:
                    getattr(self, f"_{role}_selectors")[name] = sel
            self._pathway_weights.append(float(p.weight))
        return built

    @staticmethod
    def _resolve_path(model: nn.Module, path: str, stages: Sequence[str], role: str, example: Tensor) -> str:
        """``stage:<i>`` -> its module path; a ``:pre`` suffix -> the pre-activation capture path."""
        base, pre = split_pre_activation(path)
        base = resolve_stage(base, stages, role)
        return pre_activation_path(model, base, example) if pre else base

    @staticmethod
    def _shape(model: nn.Module, info: Mapping[str, Any], path: str, selector: Selector, example: Tensor,
               role: str) -> tuple[int, ...]:
        """Shape of the feature a capture of ``path`` (through ``selector``) gives in a probe forward."""
        module_path, input_tap = split_tap(path)
        get_module(model, module_path)  # a wrong path fails here, listing the closest real ones
        if selector is None:
            if input_tap:
                return feature_shape(model, path, example)
            if path not in info or info[path].shape is None:
                raise ValueError(f"{role} module {path!r} produced no tensor output in a probe forward (unused by "
                                 f"forward, or returns a tuple/dict: pick a tensor with Pathway(..., {role}_selector="
                                 f"<key or index>))")
            return tuple(info[path].shape)
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad(), FeatureCapture(model, {path: path}, {path: selector}, detach=True) as capture:
                model(example)
                return tuple(capture[path].shape)
        except (TypeError, IndexError, KeyError) as err:
            msg = err.args[0] if err.args else str(err)
            raise OutputError(f"{role} {type(model).__name__}, module {path!r}: {msg.rstrip('.')}. Fix: "
                              f"Pathway(..., {role}_selector=<key or index>) (or selector= for both sides)") from None
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ modes and devices

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's BN statistics never move
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> Distiller:  # .to(), .cuda(), .half() ...
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn)
            self._teacher_runner.reset()  # its prepared graph holds the old device/dtype weights
        return self

    # ------------------------------------------------------------------ outputs and inputs

    def logits_of(self, role: str, output: Any) -> Tensor:
        """The logits in a student's / teacher's output (``role``), picked by its output selector."""
        selector = self.output_selectors[role]
        if selector is None and isinstance(output, Tensor):
            return output  # the usual case, kept free of any checking cost
        model = self.student if role == "student" else self.teacher
        return pick_logits(output, selector, f"{role} {type(model).__name__}", f"Distiller(..., {role}_output={{}})")

    def student_logits(self, x: Tensor) -> Tensor:
        """Student logits (N, K) for a batch."""
        return self.logits_of("student", self.student(x))

    @torch.no_grad()
    def check_input(self, x: Tensor, roles: Sequence[str] = ("student", "teacher")) -> None:
        """Run the models named in ``roles`` once on ``x`` (e.g. two samples of a real batch), in eval
        mode: a model that cannot take the input, or whose logits cannot be found or do not agree in
        class count, fails here with a message naming the model and the fix."""
        logits = {}
        for role in roles:
            model = self.student if role == "student" else self.teacher
            if model is None:
                continue
            was_training = model.training
            model.eval()
            try:
                out = model(x)
            except Exception as err:  # torch's own message (a matmul / conv shape error) says why
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise OutputError(f"{role} {type(model).__name__} cannot take the data's input, a batch of shape "
                                  f"{tuple(x.shape)} ({first}); make its first layer take "
                                  f"{tuple(x.shape[1:])} inputs, or resize the data (data.image_size)") from None
            finally:
                model.train(was_training)
            logits[role] = self.logits_of(role, out)
            if logits[role].ndim != 2 or len(logits[role]) != len(x):
                raise OutputError(f"{role} {type(model).__name__} gives logits of shape {tuple(logits[role].shape)} "
                                  f"for {len(x)} inputs; expected ({len(x)}, num_classes)")
        if len(logits) == 2 and logits["student"].shape[1] != logits["teacher"].shape[1]:
            raise OutputError(f"student gives {logits['student'].shape[1]} classes but teacher "
                              f"{logits['teacher'].shape[1]}; both must predict the same classes")

    # ------------------------------------------------------------------ forward

    def teacher_forward(self, x: Tensor) -> TeacherOutput:
        """Teacher logits (N, K) and captured features (no graph); computed once per batch."""
        if self._teacher_runner is None:
            raise RuntimeError("this Distiller has no teacher")
        logits, feats = self._teacher_runner(x)
        return TeacherOutput(self.logits_of("teacher", logits), feats)

    def reuse_teacher_output(self, x: Tensor, output: TeacherOutput) -> None:
        """Let the next :meth:`forward` on this very tensor ``x`` use ``output`` instead of running
        the teacher again. A callback that already ran :meth:`teacher_forward` on the batch (DistPro's
        look-ahead, in ``on_batch_start``) hands it to the real step: the teacher runs once per step."""
        self._pending_teacher = (x, output)

    def reuse_forward(self, x: Tensor, output: Mapping[str, Tensor]) -> None:
        """Let the next :meth:`forward` on this very tensor ``x`` reuse ``output``, this distiller's
        output for ``x`` at the current parameters, instead of running the student, the teacher and
        the pathways again: only the weighting is applied anew (DistPro's search computes the real
        step's forward before its α update). The student's BatchNorm statistics moved once, in
        that forward, as in any step."""
        self._pending_forward = (x, dict(output), _autocast_enabled(x))

    def _reused(self, x: Tensor, step: int) -> dict[str, Tensor] | None:
        """The output handed to :meth:`reuse_forward` for ``x``, if it holds every term wanted at ``step``."""
        pending, self._pending_forward = self._pending_forward, None
        if pending is None or pending[0] is not x:
            return None
        _, output, autocast = pending
        if autocast != _autocast_enabled(x):
            raise RuntimeError("reuse_forward: the reused forward and this one differ in autocast; run both in "
                               "the same precision context")
        active = self.weighting.active(step)
        wanted = [name for name in self.weighting.names if active is None or name in active]
        return output if "teacher_logits" in output and all(name in output for name in wanted) else None

    def distill_terms(self, logits: Tensor, labels: Tensor, teacher: TeacherOutput,
                      step: int = 0, computed: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """One 0-dim tensor per logit loss and per pathway, for the last student forward.

        Terms the weighting marks inactive at ``step`` are not computed at all. With
        ``fuse_input_convs`` the input convolutions of the active pathways reading one student
        feature run as one convolution. ``computed``: the terms of an earlier forward on this
        batch (:meth:`reuse_forward`), taken as they are.
        """
        active = self.weighting.active(step)
        if computed is not None:
            return {name: computed[name] for name in self.weighting.names if active is None or name in active}
        terms: dict[str, Tensor] = {}
        for ll in self.logit_losses:
            if active is None or ll.name in active:
                terms[ll.name] = LOSSES.get(ll.name).fn(logits, teacher.logits, labels, **ll.kwargs)
        items = [(s_path, p, self._student_capture[s_path], teacher.features[t_path])
                 for p, s_path, t_path in zip(self.pathways, self._student_paths, self._teacher_paths, strict=True)
                 if active is None or p.name in active]
        fused = fused_input_convs(items) if self.fuse_input_convs else {}
        for i, (_, p, s, t) in enumerate(items):
            terms[p.name] = p.after_input_conv(fused[i], t) if i in fused else p(s, t)
        return terms

    def forward(self, x: Tensor, y: Tensor, step: int = 0,
                teacher_output: TeacherOutput | None = None) -> dict[str, Tensor]:
        """Loss dict for a batch x (N, C, H, W), labels y (N,).

        Returns:
            ``loss`` (the total to minimise), ``logits`` (N, K), ``task`` (CE), one entry per
            distillation term, ``w/<term>`` the weight it got this step, and the weighting's
            ``diagnostics`` (0-dim tensors).
        """
        pending, self._pending_teacher = self._pending_teacher, None
        reused = self._reused(x, step) if teacher_output is None else None
        if reused is not None:
            with torch.autocast(x.device.type, enabled=False):
                teacher = TeacherOutput(reused["teacher_logits"], {})
                return self._losses(reused["logits"], y, step, teacher, computed=reused)
        # A teacher without terms (student alone, kept for agreement metrics) is never run.
        if teacher_output is None and self.has_terms:
            teacher_output = pending[1] if pending is not None and pending[0] is x else self.teacher_forward(x)
        logits = self.student_logits(x)
        with torch.autocast(logits.device.type, enabled=False):  # losses in fp32 whatever the forward's precision
            return self._losses(logits, y, step, teacher_output)

    def _losses(self, logits: Tensor, y: Tensor, step: int, teacher_output: TeacherOutput | None,
                computed: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        logits = full_precision(logits)
        task = F.cross_entropy(logits, y)
        out: dict[str, Tensor] = {"logits": logits, "task": task}
        loss = self.task_weight * task
        if teacher_output is not None:
            out["teacher_logits"] = teacher_output.logits
            teacher_output = TeacherOutput(full_precision(teacher_output.logits), teacher_output.features)
            terms = self.distill_terms(logits, y, teacher_output, step, computed)
            if terms:
                distill, weights = self.weighting(terms, step)
                loss = loss + distill
                out.update(terms)
                out.update({f"w/{k}": torch.tensor(w) for k, w in weights.items()})
                # Strategy scalars (e.g. MGDA's gradient cosines, "cos/<a>|<b>") are logged too.
                out.update({k: torch.tensor(v) for k, v in self.weighting.diagnostics.items()})
        out["loss"] = loss
        return out

    # ------------------------------------------------------------------ calibrated weights

    def calibrate(self, batches: Iterable[tuple[Tensor, Tensor]], ratio: float = 1.0) -> Calibration:
        """Set every term's weight so that its gradient norm on the student is ``ratio`` times the
        task gradient's, measured on ``batches`` (:mod:`kdtune.calibration`); returns what was measured."""
        norms, n = gradient_norms(self, batches)
        weights = calibrated_weights(norms, ratio)
        return self.set_calibration(weights, Calibration(float(ratio), n, norms, weights))

    def set_calibration(self, weights: Mapping[str, float], record: Calibration | None = None) -> Calibration:
        """Use calibrated weights c_i (e.g. recorded by an earlier run): the weighting scales term i by
        c_i; a catalogue / default weight becomes 1 (c_i replaces it), a user-given one multiplies c_i."""
        self.weighting.set_scales(weights)
        for name in weights:
            if self.weight_sources[name] != "user":
                self.weighting.base_weights[name] = 1.0
        self.calibration = record or Calibration(float("nan"), 0, {}, dict(weights))
        return self.calibration

    def weight_lines(self) -> list[str]:
        """One line per term: its weight and where it comes from (printed at the start of a run)."""
        w = self.weighting
        learned = set(getattr(w, "learned", ()))  # DistPro's search / replayed process set these terms' weights
        cal = self.calibration.weights if self.calibration is not None else {}
        lines = []
        for name in w.names:
            set_by_strategy = not w.uses_base_weights or name in learned
            by = f"; x the weight {type(w).__name__} sets" if set_by_strategy else ""
            value = (1.0 if set_by_strategy else w.base_weights[name]) * w.scales[name]
            source = self.weight_sources[name]
            if name in cal:
                user = f" x user weight {w.base_weights[name]:g}" if source == "user" else ""
                ratio = self.calibration.ratio if self.calibration is not None else float("nan")
                source = f"calibrated: grad ratio {ratio:g}{user}"
            lines.append(f"term {name}: weight {value:.4g} ({source}{by})")
        return lines

    @property
    def has_terms(self) -> bool:
        """True when some loss term needs the teacher."""
        return self.teacher is not None and bool(self.logit_losses or len(self.pathways))

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters besides the student's: pathway transforms and learned weights."""
        student_ids = {id(p) for p in self.student.parameters()}
        return [p for p in self.parameters() if id(p) not in student_ids and p.requires_grad]
