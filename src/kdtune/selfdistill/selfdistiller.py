"""SelfDistiller: a model, exits on its early stages, and (for MetaDistiller) a label generator.

Teacher-free self-boosting (MetaDistiller, Liu et al. 2020, §3.2–3.4). The model is divided into
K stages; an exit (:class:`~kdtune.selfdistill.heads.ExitHead`) on each early stage k < K gives an
intermediate output S_k, the model's own output is S_K, and the training loss is

    L_S = CE(y, S_K) + Σ_{k<K} L_k                                                   (eq. 3)
    L_k = a · CE(y, S_k) + (1 − a) · τ² · KL(T_k ‖ S_k)                              (eq. 4)

with soft targets T_k = softmax(t_k / τ) (eq. 2) chosen by the variant:

- ``dsn``  deeply-supervised net, hard labels only: L_k = CE(y, S_k) (eq. 4 with a = 1);
- ``sd``   self-distillation ("Be Your Own Teacher"): t_k = S_K, the final output, detached;
- ``md``   MetaDistiller: t_k = exit_head_k(F̂_k), exit k's own head applied to the top-down label
           generator's fused map F̂_k (eq. 5, §3.3), whose convolutions θ_g are learned by the
           meta-gradient of eq. 6–8 (:meth:`SelfDistiller.meta_gradient`); by default added to
           the final output as a correction of SD's target (:meth:`SelfDistiller.soft_target_logits`).

The stages are found by :func:`~kdtune.capture.find_stage_outputs` (or given as module paths) and
read with forward hooks, so the model is not edited and needs no knowledge of kdtune. The plain
model stays at ``self.student``: the exits and the generator are training-only (§3.5), and
``kdtune export`` writes exactly the ``student.*`` weights.

Example:
    >>> model = create_model("resnet8", in_channels=1)
    >>> sd = SelfDistiller(model, input_shape=(1, 28, 28), method="md")
    >>> out = sd(x, y)          # {"loss", "logits", "task", "exit1_ce", "exit1_kl", ...}
    >>> sd.meta_step(x_a, y_a, x_b, y_b, lr=0.1)   # one Adam step of the generator (Alg. 1, l. 10-19)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from kdtune.capture import FeatureCapture, find_stage_outputs, get_module, probe, split_tap
from kdtune.losses import kd
from kdtune.selfdistill.generator import TopDownLabelGenerator
from kdtune.selfdistill.heads import ExitHead

__all__ = ["METHODS", "SelfDistiller"]

Method = Literal["dsn", "sd", "md"]
#: The variants of Table 4: hard labels only, final output as teacher, meta-learned generator.
METHODS: tuple[str, ...] = ("dsn", "sd", "md")
#: What MetaDistiller's meta step minimises after the look-ahead (:meth:`SelfDistiller.meta_gradient`).
MetaObjective = Literal["exits", "final"]
META_OBJECTIVES: tuple[str, ...] = ("exits", "final")
#: Where MetaDistiller's soft targets start (:meth:`SelfDistiller.soft_target_logits`).
GeneratorAnchor = Literal["final", "exit"]
GENERATOR_ANCHORS: tuple[str, ...] = ("final", "exit")


class SelfDistiller(nn.Module):
    """A model trained with exits on its early stages (DSN / SD / MetaDistiller).

    Has the contract :class:`~kdtune.trainer.Trainer` runs: ``forward(x, y, step)`` returns a loss
    dict, ``student`` is the plain model, ``teacher`` is None, ``extra_parameters()`` lists exits
    and generator, ``trainable_parameters()`` what the main SGD optimiser steps (model and exits,
    not the generator: it has its own Adam, §4.1), and ``eval_logits(x)`` adds per-exit and
    ensemble accuracy to evaluation.

    Args:
        student: any ``nn.Module`` mapping (N, C, H, W) to logits (N, num_classes).
        input_shape: (C, H, W) of one input, to probe the stage shapes.
        method: ``"dsn"``, ``"sd"`` or ``"md"`` (see the module docstring).
        stages: module paths of the K stage outputs F_1..F_K, from the input side; the last one is
            the map the model's own classifier reads. None finds them automatically (e.g. resnet:
            ``["layer1", "layer2", "layer3"]``): exits go on all but the last.
        alpha: a of eq. 4, the weight of the hard-label term of an exit (0.5 in the paper).
        tau: τ of eq. 2 and 4 (1 in the paper).
        generator_lr: initial Adam learning rate of the label generator (0.1 in the paper, §4.1; 0.001
            here, Adam's default: see :class:`~kdtune.config.SelfDistillConfig`); ``md``
            only. :class:`~kdtune.selfdistill.meta.MetaStep` scales it with the main schedule.
        generator_residual: ``md`` only: the generator starts at F̂_k = F_k, i.e. T_k = the exit's own
            prediction (:class:`~kdtune.selfdistill.generator.TopDownLabelGenerator`); False: eq. 5 as
            written, random T_k at the start.
        meta_objective: ``md`` only: L_val of eq. 6 over every output after the look-ahead
            (``exits``) or the final output alone (``final``); see :meth:`meta_gradient`.
        generator_anchor: ``md`` only: what the generator's top-down correction is added to,
            ``final`` (default: T_k starts as SD's target, the final output) or ``exit`` (T_k =
            exit_head_k(F̂_k), the paper's; it starts as the exit's own prediction with the residual
            generator); see :meth:`soft_target_logits`.

    Raises:
        ValueError: unknown method, fewer than 2 stages, a stage that is not a 4-D map, or a
            model whose output is not (N, num_classes) logits.
    """

    def __init__(self, student: nn.Module, input_shape: Sequence[int], method: Method = "md",
                 stages: Sequence[str] | None = None, alpha: float = 0.5, tau: float = 1.0,
                 generator_lr: float = 0.001, generator_residual: bool = True,
                 meta_objective: MetaObjective = "exits", generator_anchor: GeneratorAnchor = "final") -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown self-distillation method {method!r}; choose one of {list(METHODS)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (a of eq. 4) must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if meta_objective not in META_OBJECTIVES:
            raise ValueError(f"unknown meta_objective {meta_objective!r}; choose one of {list(META_OBJECTIVES)}")
        if generator_lr <= 0:
            raise ValueError(f"generator_lr must be > 0, got {generator_lr}")
        if generator_anchor not in GENERATOR_ANCHORS:
            raise ValueError(f"unknown generator_anchor {generator_anchor!r}; choose one of {list(GENERATOR_ANCHORS)}")
        self.student = student
        self.teacher = None  # teacher-free; the Trainer checks this attribute
        self.method, self.alpha, self.tau, self.generator_lr = method, float(alpha), float(tau), float(generator_lr)
        self.meta_objective, self.generator_anchor = meta_objective, generator_anchor

        example = torch.zeros(2, *input_shape)
        self.stages = list(stages) if stages else find_stage_outputs(student, example)
        channels, sizes, num_classes = self._stage_shapes(example)
        self.exits = nn.ModuleList(ExitHead(channels[k], sizes[k], channels[-1], sizes[-1], num_classes)
                                   for k in range(len(self.stages) - 1))
        self.generator: TopDownLabelGenerator | None = None
        self.generator_optimizer: torch.optim.Optimizer | None = None
        if method == "md":
            self.generator = TopDownLabelGenerator(channels, residual=generator_residual)
            self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=generator_lr)
        self._eval_cache: tuple[Tensor, Tensor, list[Tensor]] | None = None
        self._attach_hooks()
        # What the meta step's forward-mode pass may skip (md only: dsn and sd have no meta step).
        self._exit_stop = self._exit_stop_point(example) if method == "md" else None
        self._exit_reach = self._exit_parameters(example) if method == "md" else frozenset()

    def _attach_hooks(self) -> None:
        # Feature names F1..FK; hooks fire under torch.func.functional_call too (the look-ahead).
        self._capture = FeatureCapture(self.student, {f"F{k + 1}": p for k, p in enumerate(self.stages)}).attach()
        self._eval_hook = self.student.register_forward_hook(self._remember_eval_forward)

    def __deepcopy__(self, memo: dict[int, Any]) -> SelfDistiller:
        """A copy whose hooks feed its own capture (copied hooks would write into this one's)."""
        self._capture.remove()
        self._capture.clear()  # features of the last forward are graph nodes, which cannot be deep-copied
        self._eval_hook.remove()
        self._eval_cache = None
        try:
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            for key, value in self.__dict__.items():
                new.__dict__[key] = copy.deepcopy(value, memo)
        finally:
            self._attach_hooks()
        new._attach_hooks()
        return new

    def _stage_shapes(self, example: Tensor) -> tuple[list[int], list[tuple[int, int]], int]:
        if len(self.stages) < 2:
            raise ValueError(f"self-distillation needs at least 2 stages (exits go on all but the last), got "
                             f"{self.stages}; pass stages=[...module paths...] (kdtune probe MODEL lists them)")
        info = probe(self.student, example)
        channels, sizes = [], []
        for path in self.stages:
            get_module(self.student, path)  # a wrong path fails here, listing the closest real ones
            shape = info[path].shape
            if shape is None or len(shape) != 4:
                raise ValueError(f"stage {path!r} must output a (N, C, H, W) feature map, got shape {shape}; "
                                 f"pick another module path (kdtune.capture.probe lists every output shape)")
            channels.append(shape[1])
            sizes.append((shape[2], shape[3]))
        out = info[""].shape
        if out is None or len(out) != 2:
            raise ValueError(f"the model must return logits (N, num_classes), got {out}")
        return channels, sizes, out[1]

    def _exit_stop_point(self, example: Tensor) -> str | None:
        """The module after which a forward has every exit's input F_1..F_{K-1}, if stopping there is safe.

        The meta step's forward-mode pass needs only the exits' outputs (:meth:`_look_ahead_outputs` with
        ``final=False``), so it may stop the model once the last exit's stage has run. That gives the same
        F_1..F_{K-1} only if that stage's module runs once, all early stages are captured by then, and the
        rest of the forward does not modify them in place; checked here on one probe forward (buffer
        copies, no graph). None: not safe (or a ``:input`` tap), the pass runs the whole model."""
        path, tap = split_tap(self.stages[-2])
        if tap:
            return None
        names = [f"F{k + 1}" for k in range(len(self.stages) - 1)]
        seen: list[list[tuple[Tensor, int] | None]] = []

        def record(module: nn.Module, args: Any, output: Any) -> None:
            feats = self._capture.features
            seen.append([(feats[n], feats[n]._version) if n in feats else None for n in names])

        handle = get_module(self.student, path).register_forward_hook(record)
        try:
            with torch.no_grad():
                functional_call(self.student, _buffer_copies(self.student), (example,))
        finally:
            handle.remove()
            feats = dict(self._capture.features)
            self._capture.clear()
            self._eval_cache = None  # the probe's no-grad forward is not an evaluation
        if len(seen) != 1 or any(entry is None for entry in seen[0]):
            return None
        same = all(feats.get(n) is t and t._version == v for n, (t, v) in zip(names, seen[0], strict=True))
        return path if same else None

    def _exit_parameters(self, example: Tensor) -> frozenset[str]:
        """Names of the parameters (model and exits, not the generator) that the exits' outputs S_1..S_{K-1}
        depend on: the meta step's forward-mode pass moves only these (the others' tangents change nothing
        it returns), and its L_val backward computes the direction only for them. Found from the graph of one
        probe forward (buffer copies)."""
        theta = {n: p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("generator.")}
        with torch.enable_grad():
            _, outs = self._look_ahead_outputs(theta, example, final=False)
            grads = torch.autograd.grad(sum(o.sum() for o in outs), list(theta.values()), allow_unused=True)
        self._capture.clear()
        self._eval_cache = None
        return frozenset(n for n, g in zip(theta, grads, strict=True) if g is not None)

    # ------------------------------------------------------------------ parameters

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the Trainer's SGD steps: the model and its exits. The generator is excluded — it is
        stepped by its own Adam on the meta-gradient (§3.4–3.5, §4.1)."""
        gen = {id(p) for p in self.generator.parameters()} if self.generator is not None else set()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in gen]

    def extra_parameters(self) -> list[nn.Parameter]:
        """Training-only parameters: exits and label generator (dropped by ``kdtune export``)."""
        student_ids = {id(p) for p in self.student.parameters()}
        return [p for p in self.parameters() if id(p) not in student_ids]

    # ------------------------------------------------------------------ forward

    def features(self) -> list[Tensor]:
        """F_1..F_K, (N, C_k, H_k, W_k) each, captured by the last forward of the student."""
        return [self._capture[f"F{k + 1}"] for k in range(len(self.stages))]

    def soft_target_logits(self, features: Sequence[Tensor], logits: Tensor, exit_logits: Sequence[Tensor],
                           generator_grad: bool = False) -> list[Tensor] | None:
        """t_k, k < K, such that T_k = softmax(t_k / τ); None for ``dsn`` (no soft targets).

        ``sd``: t_k = S_K. ``md``: the exit's own head applied to the generator's fused map F̂_k (§3.3,
        through :meth:`_constant_head`), and with ``generator_anchor="final"`` (the default) moved onto
        the final output::

            exit:   t_k = h_k(F̂_k)
            final:  t_k = S_K + h_k(F̂_k) − h_k(F_k)          (h_k(F_k) = S_k, the exit's output)

        With the residual generator F̂_k = F_k at the start, so ``final`` starts as SD's target (the final
        output, which the paper calls a special case of its framework, §3.2) and the meta-gradient learns
        the top-down correction h_k(F̂_k) − h_k(F_k); ``exit`` starts as the exit's own prediction, a target
        no better than the exit, which held exit 1 3.4 points under DSN's on FMNIST-5k (benchmarks/RESULTS.md,
        `tail5k`). Both are functions of the stages k..K (the paper's requirement on T_k) and differ only in
        where the generator starts; θ_g enters only through h_k(F̂_k).

        The targets never pass a gradient to the model (they are teachers): S_K and S_k are detached, the
        generator reads detached features, and the heads are constant functions, so the exits are neither
        trained nor their BatchNorm statistics moved by F̂_k. With ``generator_grad`` the graph is kept, so
        the loss is differentiable in θ_g (the meta step, eq. 7-8); otherwise it runs without a graph (the
        real step does not train the generator).

        Args:
            features: F_1..F_K of this forward.
            logits: (N, classes) S_K of this forward.
            exit_logits: S_1..S_{K-1} of this forward (the anchor's offset h_k(F_k)).
        """
        if self.method == "dsn":
            return None
        if self.method == "sd":
            return [logits.detach()] * len(self.exits)
        with torch.set_grad_enabled(generator_grad and torch.is_grad_enabled()):
            fused = self.generator([f.detach() for f in features])
            targets = [self._constant_head(head, f) for head, f in zip(self.exits, fused, strict=True)]
        if self.generator_anchor == "final":
            targets = [t + (logits - s).detach() for t, s in zip(targets, exit_logits, strict=True)]
        return targets

    @staticmethod
    def _constant_head(head: nn.Module, x: Tensor) -> Tensor:
        """``head(x)`` with detached copies of its parameters and buffers: no gradient reaches the head's
        parameters and its BatchNorm running statistics stay as they are (a gradient still flows to x)."""
        state = {n: p.detach() for n, p in head.named_parameters()}
        state.update(_buffer_copies(head))
        return functional_call(head, state, (x,))

    def forward(self, x: Tensor, y: Tensor, step: int = 0, generator_grad: bool = False) -> dict[str, Tensor]:
        """The loss of eq. 3–4 for a batch x (N, C, H, W), labels y (N,).

        Args:
            step: unused (the Trainer's signature).
            generator_grad: keep the generator's graph (the meta step), see :meth:`soft_target_logits`.

        Returns:
            ``loss`` (L_S, eq. 3), ``logits`` (N, K) = S_K, ``task`` = CE(y, S_K), and per exit k:
            ``exit<k>_ce`` = CE(y, S_k), ``exit<k>_acc`` (fraction of argmax S_k == y) and, for sd/md,
            ``exit<k>_kl`` = τ² KL(T_k ‖ S_k) and ``w/exit_labels`` (a of eq. 4 in this step); for md also
            ``gen/exit<k>_label_agree`` (fraction of argmax T_k == y) and ``gen/exit<k>_max_prob`` (mean
            max_c T_k), logged per epoch, so a generator that collapses onto one class is visible.
            With ``generator_grad`` (md) also ``gen/targets``: the T_k used, stacked (K-1, N, classes), still
            differentiable in θ_g (the Trainer logs only 0-dim values, so it never sees them).
        """
        logits = self.student(x)
        feats = self.features()
        task = F.cross_entropy(logits, y)
        out: dict[str, Tensor] = {"logits": logits, "task": task}
        loss = task
        exit_logits = [head(f) for head, f in zip(self.exits, feats, strict=False)]
        targets = self.soft_target_logits(feats, logits, exit_logits, generator_grad)
        if generator_grad and self.method == "md":
            # The meta step reads t_k(θ_g) of its look-ahead forward here rather than running the generator twice.
            out["gen/targets"] = torch.stack(list(targets))  # (K-1, N, classes), with the generator's graph
        if targets is not None:
            out["w/exit_labels"] = torch.tensor(self.alpha)  # a of eq. 4 now (it moves under selfdistill.alpha_warmup)
        for k, s_k in enumerate(exit_logits, start=1):
            ce = F.cross_entropy(s_k, y)
            out[f"exit{k}_ce"] = ce
            with torch.no_grad():  # beside gen/exit<k>_label_agree: are the targets better than the exit?
                out[f"exit{k}_acc"] = (s_k.argmax(1) == y).float().mean()
            if targets is None:
                loss = loss + ce  # DSN: eq. 4 with a = 1
                continue
            t_k = targets[k - 1]
            kl = kd(s_k, t_k, tau=self.tau)  # τ² KL(T_k ‖ S_k), batch mean
            out[f"exit{k}_kl"] = kl
            if self.method == "md":
                with torch.no_grad():
                    out[f"gen/exit{k}_label_agree"] = (t_k.argmax(1) == y).float().mean()
                    out[f"gen/exit{k}_max_prob"] = F.softmax(t_k / self.tau, dim=1).amax(1).mean()
            loss = loss + self.alpha * ce + (1.0 - self.alpha) * kl  # eq. 4
        out["loss"] = loss
        return out

    # ------------------------------------------------------------------ evaluation

    def _remember_eval_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        # Trainer.evaluate runs student(x) and then eval_logits(x) on the same batch: keep the
        # no-grad forward's output and features so that eval_logits need not run the model again.
        if torch.is_grad_enabled() or not args or not isinstance(output, Tensor):
            self._eval_cache = None
            return
        self._eval_cache = (args[0], output, self.features())

    @torch.no_grad()
    def eval_logits(self, x: Tensor) -> dict[str, Tensor]:
        """Logits of every exit and of the ensemble of all K outputs, in eval mode.

        The ensemble (§3.5, Tables 1 and 4) averages the softmax probabilities of S_1..S_K; it is
        returned as log-probabilities (their argmax is the ensemble's prediction).

        Returns:
            ``{"exit1": (N, classes), ..., "ensemble": (N, classes)}``.
        """
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            cache = self._eval_cache
            if cache is not None and cache[0] is x:
                logits, feats = cache[1], cache[2]
            else:
                logits = self.student(x)
                feats = self.features()
            outs = {f"exit{k}": head(f) for k, (head, f) in enumerate(zip(self.exits, feats, strict=False), 1)}
        finally:
            for m, training in modes:
                m.train(training)
        probs = torch.stack([F.softmax(s, dim=1) for s in (*outs.values(), logits)]).mean(0)
        outs["ensemble"] = probs.clamp_min(1e-12).log()
        return outs

    # ------------------------------------------------------------------ meta step (eq. 6-8, Alg. 1)

    def meta_gradient(self, x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor,
                      lr: float) -> tuple[Tensor, list[Tensor]]:
        """∇θ_g L_val(θ_s⁺(θ_g)) by a functional one-step look-ahead (eq. 7–8; Alg. 1, lines 12–17).

        ``θ_s⁺ = θ_s − ζ ∇θ_s L_S(x_train, y_train; θ_s, T(θ_g))`` (eq. 7), then L_val on the
        validation batch and its gradient in θ_g (eq. 8), which flows through the second-order term
        ``−ζ ∂²L_S / ∂θ_g ∂θ_s``. L_val is "the standard cross entropy" (eq. 6) of the model's outputs,
        read two ways (``meta_objective``):

        - ``exits`` (default): θ_s is the model *and its exits* (every output of eq. 3), and
          L_val = CE(y, S_K⁺) + Σ_k CE(y, S_k⁺), the hard-label loss of every output after the step;
        - ``final``: θ_s is the model, L_val = CE(y, S_K⁺) (the exits do not reach S_K).

        With ``final`` nothing asks T_k to help exit k: measured on FMNIST-5k (benchmarks/RESULTS.md,
        issue 13) the generator learned targets that agree with y on 2 % of images (below chance) and
        exit 1 ended 13 points below DSN's, while the final output gained; ``exits`` keeps the paper's
        point that the soft targets "facilitate the self-boosting" of the intermediate outputs.

        The second-order term is computed without differentiating through the backward pass (whose
        BatchNorm double backward made the meta step ~9 plain steps): with v = ∇θ⁺ L_val, eq. 8 is
        ``−ζ ∇θ_g ⟨∇θ_s L_S, v⟩``, and θ_g enters L_S only through the soft targets T_k of the exit
        logits S_k (the generator reads detached features), so
        ``⟨∇θ_s L_S, v⟩ = Σ_k ⟨∂L_S/∂S_k, J_k v⟩`` + terms free of θ_g, with J_k v the change of S_k
        along v — one forward-mode pass (``torch.func.jvp``). The same gradient, up to float rounding.

        The look-ahead runs on stand-ins (``torch.func.functional_call``): parameter leaves that
        share the real values, and *copies* of every BatchNorm buffer, so the real model's
        parameters, their ``.grad`` and running statistics are left exactly as they were. Batch
        statistics are used (training mode), as in the real step.

        Cost: the look-ahead's forward on x_train runs the generator with its graph and keeps t_k(θ_g) for
        the second-order term (the generator runs once per meta step), and the forward-mode pass stops
        after the last exit's stage (S_K is not needed there; :meth:`_exit_stop_point`), moving only the
        parameters the exits depend on (:meth:`_exit_parameters`; v is computed for those alone). Same values
        as running the generator again and the whole model, up to float rounding (tests compare the two).

        Args:
            x_train, y_train: (N, C, H, W), (N,) a batch of D_train.
            x_val, y_val: a batch of the disjoint half D_test (Alg. 1, line 15).
            lr: ζ, the inner learning rate (the main model's current learning rate, §4.1).

        Returns:
            L_val (0-dim, detached) and one gradient per generator parameter.
        """
        if self.generator is None:
            raise RuntimeError(f"method {self.method!r} has no label generator; the meta step is for method 'md'")
        stepped = self.student if self.meta_objective == "final" else self
        prefix = "student." if self.meta_objective == "final" else ""
        theta = {prefix + n: p.detach().requires_grad_(True) for n, p in stepped.named_parameters()
                 if p.requires_grad and not n.startswith("generator.")}
        buffers = _buffer_copies(self)  # running stats move on copies
        # L_S at θ_s; its soft targets keep the generator's graph: t_k(θ_g) (anchored on S_K and S_k at θ_s
        # on x_train, constants), used below. They do not depend on θ_s, so the gradient in θ_s is unchanged.
        out = functional_call(self, {**theta, **buffers}, (x_train, y_train), {"generator_grad": True})
        targets = out["gen/targets"].unbind(0)
        grads = torch.autograd.grad(out["loss"], list(theta.values()), allow_unused=True)
        theta_plus = {n: (t if g is None else t - lr * g).detach().requires_grad_(True)  # eq. 7
                      for (n, t), g in zip(theta.items(), grads, strict=True)}
        exits = self.meta_objective == "exits"
        final, exit_logits = self._look_ahead_outputs(theta_plus, x_val, exits)  # S_K⁺, S_k⁺ on x_val
        val_loss = F.cross_entropy(final, y_val)  # L_val: CE(y, S_K⁺) (+ Σ_k CE(y, S_k⁺) for `exits`)
        for s_k in exit_logits:
            val_loss = val_loss + F.cross_entropy(s_k, y_val)
        moving = [n for n in theta if n in self._exit_reach]  # what S_1..S_{K-1} depend on (J_k v needs no more)
        v = torch.autograd.grad(val_loss, [theta_plus[n] for n in moving], allow_unused=True)
        direction = {n: torch.zeros_like(theta[n]) if vi is None else vi for n, vi in zip(moving, v, strict=True)}
        fixed = {n: t.detach() for n, t in theta.items() if n not in self._exit_reach}
        logits, change = torch.func.jvp(lambda th: tuple(self._look_ahead_outputs({**fixed, **th}, x_train,
                                                                                   final=False)[1]),
                                        ({n: theta[n].detach() for n in moving},), (direction,))  # S_k, J_k v
        self._capture.clear()  # the look-ahead's features belong to the jvp
        exit_logits = [s.detach().requires_grad_(True) for s in logits]
        soft = sum((1.0 - self.alpha) * kd(s, t, tau=self.tau)  # the terms of eq. 4 that depend on θ_g
                   for s, t in zip(exit_logits, targets, strict=True))
        slopes = torch.autograd.grad(soft, exit_logits, create_graph=True)  # ∂L_S/∂S_k, functions of θ_g
        inner = sum((slope * c).sum() for slope, c in zip(slopes, change, strict=True))  # ⟨∇θ_s L_S, v⟩
        meta_grads = torch.autograd.grad(-lr * inner, list(self.generator.parameters()))  # eq. 8
        self._eval_cache = None
        return val_loss.detach(), list(meta_grads)

    def _look_ahead_outputs(self, theta: dict[str, Tensor], x: Tensor, exits: bool = True,
                            final: bool = True) -> tuple[Tensor | None, list[Tensor]]:
        """S_K and (with ``exits``) S_1..S_{K-1} on x, for the look-ahead's parameters θ by name (``student.*``,
        and ``exits.*`` when they are stepped; otherwise the exits' own, constant), BatchNorm buffers copied.

        ``final=False``: S_K is not needed (None); the model's forward stops after the last exit's stage when
        that is safe (:meth:`_exit_stop_point`), the exits' outputs are the same."""
        student = {n.removeprefix("student."): t for n, t in theta.items() if n.startswith("student.")}
        stop = None
        if not final and exits and self._exit_stop is not None:
            stop = get_module(self.student, self._exit_stop).register_forward_hook(_stop_forward)
        try:
            logits = functional_call(self.student, {**student, **_buffer_copies(self.student)}, (x,))
        except _StopForward:
            logits = None
        finally:
            if stop is not None:
                stop.remove()
        out = []
        heads = self.exits if exits else []
        for k, (head, f) in enumerate(zip(heads, [self._capture[f"F{k + 1}"] for k in range(len(heads))], strict=True)):
            own = {n.removeprefix(f"exits.{k}."): t for n, t in theta.items() if n.startswith(f"exits.{k}.")}
            state = {**{n: p.detach() for n, p in head.named_parameters()}, **own,
                     **_buffer_copies(head)}
            out.append(functional_call(head, state, (f,)))
        return logits, out

    def meta_step(self, x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, lr: float,
                  generator_lr_factor: float = 1.0) -> float:
        """One Adam step of the label generator on the meta-gradient (Alg. 1, lines 12–19).

        Args:
            x_train, y_train, x_val, y_val, lr: as for :meth:`meta_gradient` (``lr`` is ζ).
            generator_lr_factor: the Adam step uses ``generator_lr * generator_lr_factor`` (the
                main schedule's current factor, see :class:`~kdtune.selfdistill.meta.MetaStep`).

        Returns:
            L_val, the look-ahead model's cross-entropy on the validation batch (before the step).
        """
        val_loss, grads = self.meta_gradient(x_train, y_train, x_val, y_val, lr)
        for group in self.generator_optimizer.param_groups:
            group["lr"] = self.generator_lr * generator_lr_factor
        params = list(self.generator.parameters())
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self.generator_optimizer.step()
        for p in params:
            p.grad = None  # nothing else may step the generator on a stale gradient
        return float(val_loss)

    # ------------------------------------------------------------------ checkpoint

    def get_extra_state(self) -> dict[str, Any]:
        """The generator's Adam state, so a resumed run continues exactly (saved in ``state_dict``)."""
        return self.generator_optimizer.state_dict() if self.generator_optimizer is not None else {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.generator_optimizer is not None and state:
            self.generator_optimizer.load_state_dict(state)

    def extra_repr(self) -> str:
        anchor = f", generator_anchor={self.generator_anchor!r}" if self.method == "md" else ""
        return f"method={self.method!r}, stages={self.stages}, alpha={self.alpha}, tau={self.tau}{anchor}"


class _StopForward(Exception):
    """Raised by a forward hook to end a model's forward early (:meth:`SelfDistiller._look_ahead_outputs`)."""


def _stop_forward(module: nn.Module, args: Any, output: Any) -> None:
    raise _StopForward


def _buffer_copies(module: nn.Module) -> dict[str, Tensor]:
    """Copies of ``module``'s buffers by name: a functional call on them leaves its running statistics alone."""
    return {n: b.clone() for n, b in module.named_buffers()}
