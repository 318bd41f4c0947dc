"""DistPro's pathway weights: the learned ``α̃`` of a search, and the replayed process α(t).

DistPro (Deng et al. 2022, papers/distpro.txt §3.2–3.4, Alg. 1) gives every pathway k a weight
process ``A_k = {α_t^k}``. Two strategies live here:

* :class:`DistProWeighting` (``"distpro"``) — the *search* phase: raw weights ``α̃`` (a buffer,
  so the student's optimiser never sees them) normalised by eq. 2 into ``α``; the bi-level update
  of :mod:`kdtune.search.distpro` moves ``α̃`` with its own optimiser (:meth:`update_alpha`).
* :class:`ProcessWeighting` (``"process"``) — the *retrain* phase: replays a recorded
  :class:`Process`, linearly stretched to the retrain length (Alg. 1 line 8), or one of the
  baselines of Table 1: ``equal`` (1/L) and ``final`` (α_T held constant).

The replay drops the pathways with ``α̃ ≤ τ`` (τ = 0.5, §3.4): the distiller then skips their
transform and loss entirely, the KD-time saving of §3.4. The search never drops: every pathway is
computed at every search step, so the hypergradient of a pathway whose α̃ sank below τ still
measures that pathway (a dropped pathway's loss would be missing from L_train, and its α̃ would
move only through the normaliser). Terms outside the process keep their configured weight.

A :class:`Process` file is plain JSON — pathway descriptions, the step grid, α and α̃ per step::

    {"kdtune_process": 1, "normalization": "biased_softmax", "g": 1.0, "tau": 0.5,
     "pathways": [{"name": "t0-s0:conv1x1", "teacher_stage": 0, "student_stage": 0, ...}, ...],
     "steps": [0, 1, ...], "alpha": [[...], ...], "alpha_tilde": [[...], ...], "kept": [...]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from kdtune import jsonutil
from kdtune.errors import InputFileError, KdtuneError, MissingFileError
from kdtune.weighting.base import Weighting

Normalization = Literal["biased_softmax", "softmax", "l1_biased", "l1", "raw", "sigmoid"]
NORMALIZATIONS: tuple[str, ...] = ("biased_softmax", "softmax", "l1_biased", "l1", "raw", "sigmoid")
PROCESS_FORMAT = 1


def normalize(alpha_tilde: Tensor, method: str = "biased_softmax", g: float | Tensor = 1.0) -> Tensor:
    """Normalised pathway weights α from raw weights α̃ (DistPro eq. 2 and Table 7).

    * ``biased_softmax`` (eq. 2, the paper's choice): ``α_k = exp(α̃_k) / (Σ_j exp(α̃_j) + exp(g))``,
      i.e. softmax(concat(α̃, g)) without its last entry; g = 1 in the paper.
    * ``softmax``: ``exp(α̃_k) / Σ_j exp(α̃_j)``.
    * ``l1_biased``: ``|α̃_k| / (‖α̃‖₁ + 1)``; ``l1``: ``|α̃_k| / ‖α̃‖₁`` (Table 7 rows 3–4; we take
      the absolute value so that α ≥ 0 as eq. 2 requires).
    * ``raw``: ``max(α̃_k, 0)`` (the unnormalised row of Table 7, kept non-negative).
    * ``sigmoid``: ``σ(α̃_k)``.

    Args:
        alpha_tilde: (L,) or (T, L) raw weights; the last dimension is the pathways.
        method: one of :data:`NORMALIZATIONS`.
        g: the bias of ``biased_softmax``: a number, or a 0-d tensor (a learned g, differentiable).

    Returns:
        α, the same shape, differentiable in α̃ (and in ``g`` when it is a tensor).
    """
    a = alpha_tilde
    if method == "biased_softmax":
        bias = torch.as_tensor(g, dtype=a.dtype, device=a.device).reshape(1).expand(*a.shape[:-1], 1)
        return torch.softmax(torch.cat([a, bias], dim=-1), dim=-1)[..., :-1]
    if method == "softmax":
        return torch.softmax(a, dim=-1)
    if method in ("l1_biased", "l1"):
        total = a.abs().sum(-1, keepdim=True) + (1.0 if method == "l1_biased" else 0.0)
        return a.abs() / total.clamp_min(1e-12)
    if method == "raw":
        return a.clamp_min(0.0)
    if method == "sigmoid":
        return torch.sigmoid(a)
    raise ValueError(f"unknown normalization {method!r}; choose one of {', '.join(NORMALIZATIONS)}")


def distance_from_uniform(alpha: Tensor) -> dict[str, float]:
    """How far the weights α (L,) moved from uniform, on their shares p = α / Σα (eq. 2's biased
    softmax leaves Σα < 1, so α is compared as a distribution):

    * ``alpha_max_vs_uniform`` = max_k p_k · L — the largest weight over the uniform 1/L (1: uniform);
    * ``alpha_kl_from_uniform`` = KL(p ‖ 1/L) = Σ_k p_k log(p_k L) in nats (0: uniform, log L at most).
    """
    a = alpha.detach().double().clamp_min(0.0)
    n = a.numel()
    p = a / a.sum().clamp_min(1e-300)
    kl = torch.where(p > 0, p * (p * n).clamp_min(1e-300).log(), torch.zeros_like(p)).sum()
    return {"alpha_max_vs_uniform": float(p.max() * n), "alpha_kl_from_uniform": float(kl)}


def _check_names(learned: Sequence[str], names: Sequence[str], what: str) -> None:
    missing = [n for n in learned if n not in names]
    if missing:
        raise ValueError(f"{what}: pathways {missing} are not terms of this distiller; "
                         f"its terms: {list(names)}; the process has: {list(learned)}")


class DistProWeighting(Weighting):
    """Search-phase weights: α = normalize(α̃) (eq. 2) for the learned pathways, fixed otherwise.

    ``α̃`` (L,) is a *buffer* — saved in checkpoints with the distiller, invisible to the student's
    optimiser; it is moved only by :meth:`update_alpha` with the hypergradient of eq. 4–5, with
    its own optimiser (Adam by default, betas (0.5, 0.999) as in the released DistPro code; lr
    0.05 as in §4.1). The optimiser's moments are buffers too, so a resumed search continues
    exactly.

    With ``learn_g`` the bias g of eq. 2 is learned too (a buffer ``g_tilde``, the same
    hypergradient and optimiser as α̃; not in the paper, where g = 1). It sets the pathways' total
    weight ``Σα = S / (S + e^g)``, ``S = Σ_k e^α̃_k``, which α̃'s own updates barely move when L is
    large: the gradient of L along α̃'s common direction is ``∂L/∂α̃·1 = e^g/(S + e^g) · Σ_k α_k ∂L/∂α_k``,
    a factor ≈ 1/(L+1) of the per-pathway ones, so Σα stays near its start L/(L+1). g's own gradient,
    ``∂L/∂g = −e^g/(S + e^g) · Σ_k α_k ∂L/∂α_k``, carries the same factor, but Adam normalises it
    per coordinate, so g moves at Adam's step size: the search can learn how much the pathways count
    in total, not only how it is shared between them.

    Args:
        names, base_weights: all term names and their configured weights (see :class:`Weighting`).
        learned: the pathway names that get a learned weight (default: every term).
        normalization: see :func:`normalize`; ``biased_softmax`` with ``g = 1`` is eq. 2.
        g: the bias of the biased softmax.
        init: the initial α̃ ("we set an initial value α₀ = 1", §3.3).
        tau: the replay drops pathways with ``α̃ ≤ tau`` (§3.4; recorded in the process file); the
            search computes every pathway and only logs the fraction a replay would keep.
        alpha_optimizer: ``adam`` or ``sgd`` for α̃.
        alpha_lr: its learning rate γ (eq. 4; 0.05 in §4.1).
        alpha_betas, alpha_eps: Adam's betas and epsilon.
        alpha_weight_decay: L2 decay of α̃ (towards 0, i.e. towards dropping; 0 by default).
        learn_g: also learn g (biased softmax only); g is the initial value.
    """

    def __init__(self, names: Sequence[str], base_weights: Mapping[str, float],
                 learned: Sequence[str] | None = None, normalization: Normalization = "biased_softmax",
                 g: float = 1.0, init: float = 1.0, tau: float | None = 0.5,
                 alpha_optimizer: Literal["adam", "sgd"] = "adam", alpha_lr: float = 0.05,
                 alpha_betas: Sequence[float] = (0.5, 0.999), alpha_eps: float = 1e-8,
                 alpha_weight_decay: float = 0.0, learn_g: bool = False) -> None:
        super().__init__(names, base_weights)
        self.learned = list(names if learned is None else learned)
        _check_names(self.learned, self.names, "distpro weighting")
        if not self.learned:
            raise ValueError("distpro weighting: no pathway to learn a weight for")
        normalize(torch.zeros(1), normalization)  # fail now on an unknown name
        if learn_g and normalization != "biased_softmax":
            raise ValueError(f"learn_g learns the bias of the biased softmax (eq. 2); normalization "
                             f"{normalization!r} has none: use normalization='biased_softmax' or learn_g=False")
        if alpha_optimizer not in ("adam", "sgd"):
            raise ValueError(f"alpha_optimizer must be 'adam' or 'sgd', got {alpha_optimizer!r}")
        if alpha_lr <= 0:
            raise ValueError(f"alpha_lr must be > 0, got {alpha_lr}")
        self.normalization, self.g, self.tau = normalization, float(g), None if tau is None else float(tau)
        self.alpha_optimizer, self.alpha_lr = alpha_optimizer, float(alpha_lr)
        self.alpha_betas = (float(alpha_betas[0]), float(alpha_betas[1]))
        self.alpha_eps, self.alpha_weight_decay = float(alpha_eps), float(alpha_weight_decay)
        self.learn_g = bool(learn_g)
        n = len(self.learned)
        self.register_buffer("alpha_tilde", torch.full((n,), float(init)))
        if self.learn_g:  # registered only when learned: checkpoints of searches with a fixed g load as before
            self.register_buffer("g_tilde", torch.tensor(float(g)))
        # Adam's moments for the hyper-parameters in hyper_names order: α̃ (L,), then g when learned.
        self.register_buffer("alpha_exp_avg", torch.zeros(n + int(self.learn_g)))
        self.register_buffer("alpha_exp_avg_sq", torch.zeros(n + int(self.learn_g)))
        self.register_buffer("alpha_updates", torch.zeros((), dtype=torch.long))

    @property
    def hyper_names(self) -> list[str]:
        """The buffers the search learns, in the order of a hypergradient's entries: ``alpha_tilde``
        (L entries), then ``g_tilde`` (one) with ``learn_g``."""
        return ["alpha_tilde", "g_tilde"] if self.learn_g else ["alpha_tilde"]

    @property
    def bias(self) -> float | Tensor:
        """g of eq. 2: the learned buffer with ``learn_g``, else the configured number."""
        return self.g_tilde if self.learn_g else self.g

    def alpha(self) -> Tensor:
        """Normalised weights α (L,) of the learned pathways (eq. 2), differentiable in α̃ (and g)."""
        return normalize(self.alpha_tilde, self.normalization, self.bias)

    def kept_mask(self) -> Tensor:
        """(L,) bool: the learned pathways a replay of this step would compute (``α̃ > τ``)."""
        if self.tau is None:
            return torch.ones(len(self.learned), dtype=torch.bool)
        return self.alpha_tilde.detach() > self.tau

    def weights_for(self, step: int) -> dict[str, Tensor | float]:
        weights: dict[str, Tensor | float] = dict(self.base_weights)
        alpha = self.alpha()
        for k, name in enumerate(self.learned):
            weights[name] = alpha[k]
        return weights

    def active(self, step: int) -> set[str] | None:
        """Every term (None): the search never drops a pathway (dropping is a replay saving, §3.4)."""
        kept = self.kept_mask().tolist()
        # logged per step (and per epoch as train_*): what a replay would keep, how far α is from uniform
        alpha = self.alpha().detach()
        self.diagnostics = {"pathways_kept": sum(kept) / len(kept), "alpha_sum": float(alpha.sum()),
                            **distance_from_uniform(alpha)}
        if self.learn_g:
            self.diagnostics["g"] = float(self.g_tilde.detach())
        return None

    @torch.no_grad()
    def update_alpha(self, hypergradient: Tensor) -> None:
        """One step of α̃'s own optimiser: ``α̃ ← α̃ − γ · step(∇α̃ L_val)`` (eq. 4, first line); with
        ``learn_g`` the same step for g (its own Adam moments, no weight decay).

        Args:
            hypergradient: (L,) ``∇α̃ L_val(θ'(α̃))`` from eq. 4 (exact) or eq. 5 (finite difference);
                (L + 1,) with ``learn_g``, g's entry last.
        """
        n = len(self.learned)
        if hypergradient.numel() != n + int(self.learn_g):
            raise ValueError(f"hypergradient has {hypergradient.numel()} entries; this weighting learns "
                             f"{n + int(self.learn_g)} ({' + '.join(self.hyper_names)})")
        grad = hypergradient.detach().to(self.alpha_tilde).clone()
        grad[:n] += self.alpha_weight_decay * self.alpha_tilde
        if not torch.isfinite(grad).all():
            raise FloatingPointError(f"DistPro hypergradient is not finite: {grad.tolist()}")
        self.alpha_updates += 1
        if self.alpha_optimizer == "sgd":
            self._apply_step(self.alpha_lr * grad)
            return
        # Adam (Kingma & Ba 2015, Alg. 1) with coupled L2 decay, as torch.optim.Adam.
        b1, b2 = self.alpha_betas
        t = int(self.alpha_updates)
        self.alpha_exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
        self.alpha_exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.alpha_exp_avg_sq / (1 - b2 ** t)).sqrt() + self.alpha_eps
        self._apply_step(self.alpha_lr / (1 - b1 ** t) * self.alpha_exp_avg / denom)

    def _apply_step(self, delta: Tensor) -> None:
        """Subtract ``delta`` (L,) or (L + 1,) from α̃ (and g)."""
        n = len(self.learned)
        self.alpha_tilde -= delta[:n]
        if self.learn_g:
            self.g_tilde -= delta[n]

    def extra_repr(self) -> str:
        g = "learned from " if self.learn_g else ""
        return (f"{len(self.learned)} pathways, {self.normalization} (g={g}{self.g:g}), tau={self.tau}, "
                f"{self.alpha_optimizer} lr={self.alpha_lr:g}")


# ---------------------------------------------------------------------------------- process files


@dataclass
class PathwayInfo:
    """What a process knows of one pathway: enough to rebuild it on another teacher/student.

    ``teacher_stage`` / ``student_stage`` are stage indices (``kdtune.capture.find_stage_outputs``)
    when the pathway was built from stages, else ``None`` (then the module paths are used).
    ``tap`` says which value of those stages is read: ``post`` (the stage output) or ``pre`` (before
    its final activation, :func:`kdtune.capture.pre_activation_path`; DistPro's default for HCL).
    A ``kind="logit"`` entry is a logit loss (``distance`` = its catalogue name, e.g. ``kd``, with
    ``loss_kwargs``) weighted by its own α like the feature pathways: DistPro's optional logit pathway.
    """

    name: str
    teacher: str
    student: str
    teacher_stage: int | None = None
    student_stage: int | None = None
    transform: str | None = None
    distance: str | None = None
    transform_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the transform (e.g. ``{pool_first: true}``), rebuilt with it in retraining."""
    tap: Literal["post", "pre"] = "post"
    """Post- or pre-activation stage value (files written before taps existed: ``post``)."""
    kind: Literal["feature", "logit"] = "feature"
    """A feature pathway, or a logit loss with its own α (``distance`` names it)."""
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    """Arguments of a logit pathway's loss (e.g. ``{tau: 4}``)."""

    @property
    def key(self) -> tuple[Any, ...]:
        """Identity used to match pathways across pairs: stage indices + transform (and its
        arguments) + distance."""
        if self.kind == "logit":
            return ("logit", self.distance, json.dumps(self.loss_kwargs, sort_keys=True))
        transform = (self.transform, json.dumps(self.transform_kwargs, sort_keys=True))
        if self.teacher_stage is not None and self.student_stage is not None:
            return ("stage", self.teacher_stage, self.student_stage, self.tap, transform, self.distance)
        return ("path", self.teacher, self.student, transform, self.distance)


class ProcessMismatchError(KdtuneError, ValueError):
    """A process's pathways do not correspond to the distiller's (transfer needs a mapping)."""


@dataclass
class Process:
    """A recorded DistPro process A = {α_t} (§3.2) for L pathways over T search steps.

    Attributes:
        pathways: the L pathways, in column order.
        steps: (T,) search steps at which α was recorded (the α used by that step's real update).
        alpha: (T, L) normalised weights α_t (eq. 2); what retraining replays.
        alpha_tilde: (T, L) raw weights α̃_t; what dropping (α̃ ≤ τ) is decided on.
        normalization, g, tau: how α was made from α̃, and the dropping threshold of the search.
        kept: (T,) fraction of the L pathways computed at each step (``None`` if not recorded).
        meta: free-form provenance (teacher, student, dataset, run directory ...).
        g_trace: (T,) the learned g of eq. 2 at each step (a search with ``learn_g``; ``g`` is then its
            initial value), else ``None``. The replay reads α only; this says how α was made.
    """

    pathways: list[PathwayInfo]
    steps: list[int]
    alpha: Tensor
    alpha_tilde: Tensor
    normalization: str = "biased_softmax"
    g: float = 1.0
    tau: float | None = 0.5
    kept: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    g_trace: list[float] | None = None

    def __post_init__(self) -> None:
        self.alpha = torch.as_tensor(self.alpha, dtype=torch.float32).reshape(len(self.steps), -1)
        self.alpha_tilde = torch.as_tensor(self.alpha_tilde, dtype=torch.float32).reshape(len(self.steps), -1)
        n = len(self.pathways)
        if not self.steps:
            raise ValueError("a process needs at least one recorded step")
        if self.alpha.shape != (len(self.steps), n) or self.alpha_tilde.shape != self.alpha.shape:
            raise ValueError(f"process values must be (T={len(self.steps)}, L={n}); got alpha "
                             f"{tuple(self.alpha.shape)}, alpha_tilde {tuple(self.alpha_tilde.shape)}")
        if self.g_trace is not None and len(self.g_trace) != len(self.steps):
            raise ValueError(f"process g_trace has {len(self.g_trace)} entries for {len(self.steps)} steps")
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError("process steps must be strictly increasing")
        names = self.names
        if len(set(names)) != len(names):
            raise ValueError(f"process pathway names must be distinct: {names}")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.pathways]

    def __len__(self) -> int:
        return len(self.steps)

    # ------------------------------------------------------------------ interpolation

    def stretch(self, length: int) -> tuple[Tensor, Tensor]:
        """The process linearly interpolated onto ``length`` retrain steps (Alg. 1 line 8).

        Retrain step ``t'`` in ``0 .. length-1`` reads the search process at the fractional
        position ``p = s_0 + t' (s_{T-1} - s_0) / (length - 1)`` of the recorded step grid, linearly
        interpolated between its two neighbours, so the first and last retrain steps get the first
        and last recorded α exactly, whatever the two lengths.

        Returns:
            alpha (length, L), alpha_tilde (length, L).
        """
        if length < 1:
            raise ValueError(f"retrain length must be >= 1 step, got {length}")
        grid = torch.tensor(self.steps, dtype=torch.float64)
        pos = torch.linspace(float(grid[0]), float(grid[-1]), length, dtype=torch.float64)
        return _interp(pos, grid, self.alpha), _interp(pos, grid, self.alpha_tilde)

    def final(self) -> tuple[Tensor, Tensor]:
        """α_T and α̃_T (L,): the last recorded weights ("Use α_T" in Table 1)."""
        return self.alpha[-1].clone(), self.alpha_tilde[-1].clone()

    # ------------------------------------------------------------------ matching (transfer)

    def match(self, pathways: Sequence[PathwayInfo]) -> list[int]:
        """Column of this process for each of the given pathways (Table 3: transfer).

        Pathways match by name, else by stage indices + transform + distance (so a process
        searched on one teacher/student applies to another pair whose stages correspond).

        Raises:
            ProcessMismatchError: listing both pathway sets when they do not map one to one.
        """
        by_name = {p.name: k for k, p in enumerate(self.pathways)}
        by_key = {p.key: k for k, p in enumerate(self.pathways)}
        cols = [by_name.get(p.name, by_key.get(p.key)) for p in pathways]
        if None in cols or len(set(cols)) != len(self.pathways) or len(cols) != len(self.pathways):
            raise ProcessMismatchError(
                "the process's pathways do not map one to one onto the distiller's (by name, or by "
                "teacher stage, student stage, transform and distance).\n"
                f"  process ({len(self.pathways)}): {_describe_set(self.pathways)}\n"
                f"  distiller ({len(pathways)}): {_describe_set(pathways)}")
        return [int(c) for c in cols]  # type: ignore[arg-type]

    def reordered(self, cols: Sequence[int], pathways: Sequence[PathwayInfo]) -> Process:
        """This process with columns ``cols`` relabelled as ``pathways`` (after :meth:`match`)."""
        idx = torch.tensor(list(cols), dtype=torch.long)
        return Process(list(pathways), list(self.steps), self.alpha[:, idx], self.alpha_tilde[:, idx],
                       self.normalization, self.g, self.tau, self.kept, dict(self.meta), self.g_trace)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        learned_g = {} if self.g_trace is None else {"g_trace": [round(float(v), 6) for v in self.g_trace]}
        return {
            "kdtune_process": PROCESS_FORMAT,
            "normalization": self.normalization, "g": self.g, "tau": self.tau,
            "pathways": [asdict(p) for p in self.pathways],
            "meta": self.meta,
            "steps": list(map(int, self.steps)),
            "alpha": [[round(float(v), 7) for v in row] for row in self.alpha.tolist()],
            "alpha_tilde": [[round(float(v), 6) for v in row] for row in self.alpha_tilde.tolist()],
            "kept": None if self.kept is None else [round(float(v), 4) for v in self.kept],
            **learned_g,
        }

    def save(self, path: str | Path) -> Path:
        """Write the process as JSON (atomically: temporary file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(jsonutil.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "process") -> Process:
        if data.get("kdtune_process") != PROCESS_FORMAT:
            raise ValueError(f"{where} is not a kdtune process file (no \"kdtune_process\": {PROCESS_FORMAT})")
        try:
            pathways = [PathwayInfo(**_legacy_pathway(p)) for p in data["pathways"]]
            return cls(pathways, list(data["steps"]), torch.tensor(data["alpha"]), torch.tensor(data["alpha_tilde"]),
                       data.get("normalization", "biased_softmax"), float(data.get("g", 1.0)), data.get("tau"),
                       data.get("kept"), dict(data.get("meta") or {}), data.get("g_trace"))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: malformed process file ({type(err).__name__}: {err})") from None

    @classmethod
    def load(cls, path: str | Path) -> Process:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"no process file at {path} (a DistPro search writes <run>/process.json)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputFileError(f"{path}: not a process JSON file ({type(err).__name__}: {err}); "
                                 f"give the process.json a DistPro search wrote") from None
        return cls.from_dict(data, str(path))


def movement_by_quarter(process: Process) -> list[dict[str, float]]:
    """How a process moved over each quarter of its recorded steps: ``mean_step`` = mean over pathways and
    steps of |α̃_{t+1} − α̃_t|, ``alpha_sum`` = Σα at the quarter's last step, and ``g`` there when g was
    learned. α̃ whose steps shrink tenfold a quarter is frozen by a step-decay schedule (see
    :class:`kdtune.search.distpro.DistProSearch`'s ``undo_lr_decay``). Needs ≥ 5 recorded steps."""
    if len(process.steps) < 5:
        raise ValueError(f"a process of {len(process.steps)} steps has no four quarters to compare (needs >= 5)")
    steps = torch.diff(process.alpha_tilde, dim=0).abs().mean(dim=1)  # (T-1,): step t -> t+1
    n = len(steps)
    rows = []
    for q in range(4):
        lo, hi = q * n // 4, (q + 1) * n // 4
        row = {"mean_step": float(steps[lo:hi].mean()), "alpha_sum": float(process.alpha[hi].sum())}
        if process.g_trace is not None:
            row["g"] = float(process.g_trace[hi])
        rows.append(row)
    return rows


def _legacy_pathway(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A pathway entry of a file written before taps were recorded keeps its old behaviour: it read
    post-activation stage outputs, and its DistPro blocks gated the attention with a sigmoid."""
    entry = dict(entry)
    if "tap" not in entry and entry.get("transform") == "distpro":
        entry["transform_kwargs"] = {"attention_sigmoid": True, **(entry.get("transform_kwargs") or {})}
    return entry


def _interp(pos: Tensor, grid: Tensor, values: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``values`` (T, L) on ``grid`` (T,) at ``pos`` (M,)."""
    if len(grid) == 1:
        return values[:1].expand(len(pos), -1).clone()
    hi = torch.searchsorted(grid, pos, right=False).clamp(1, len(grid) - 1)
    lo = hi - 1
    w = ((pos - grid[lo]) / (grid[hi] - grid[lo])).clamp(0, 1).to(values.dtype)[:, None]
    return (1 - w) * values[lo] + w * values[hi]


def _describe_set(pathways: Sequence[PathwayInfo]) -> str:
    def one(p: PathwayInfo) -> str:
        where = (f"t{p.teacher_stage}-s{p.student_stage}" if p.teacher_stage is not None
                 and p.student_stage is not None else f"{p.teacher}->{p.student}")
        return f"{p.name} [{where}, {p.transform}, {p.distance}]"
    return ", ".join(one(p) for p in pathways) or "(none)"


# ---------------------------------------------------------------------------------- replay


class ProcessWeighting(Weighting):
    """Retrain-phase weights from a recorded process (Alg. 1 lines 8–13) or a Table 1 baseline.

    * ``mode="process"``: α(t) of the process stretched to the retrain length by linear
      interpolation (:meth:`Process.stretch`), replayed step by step.
    * ``mode="final"``: α_T, the last recorded weights, held constant ("Use α_T").
    * ``mode="equal"``: 1/L for each of the L process pathways ("Equally weighted").

    Pathways with ``α̃ ≤ tau`` at a step are dropped (not computed, §3.4); ``equal`` drops none.
    The retrain length must be known before the first step: :meth:`set_total_steps` (the
    :class:`~kdtune.search.distpro.ProcessReplay` callback and ``kdtune run`` call it).

    Args:
        names, base_weights: all term names and their configured weights.
        file: path of a process JSON file (or pass ``process=``).
        process: a :class:`Process` object.
        mode: ``process``, ``final`` or ``equal``.
        tau: dropping threshold on α̃; ``"process"`` takes the search's, ``None`` keeps every pathway.
        total_steps: the retrain length in optimiser steps, if already known.
    """

    def __init__(self, names: Sequence[str], base_weights: Mapping[str, float], file: str | None = None,
                 process: Process | None = None, mode: Literal["process", "final", "equal"] = "process",
                 tau: float | str | None = "process", total_steps: int | None = None) -> None:
        super().__init__(names, base_weights)
        if mode not in ("process", "final", "equal"):
            raise ValueError(f"process weighting mode must be 'process', 'final' or 'equal', got {mode!r}")
        if process is None:
            if file is None:
                raise ValueError("process weighting needs a process file: weighting kwargs file=<run>/process.json "
                                 "(`kdtune run ... process=<path>`)")
            process = Process.load(file)
        _check_names(process.names, self.names, f"process {file or ''}".strip())
        self.process, self.mode = process, mode
        self.tau = process.tau if tau == "process" else (None if tau is None else float(tau))
        if mode == "equal":
            self.tau = None  # the baseline computes every pathway
        self._alpha: Tensor | None = None  # (T', L) or (1, L) once the length is known
        self._alpha_tilde: Tensor | None = None
        if mode != "process":
            self._set_table(1)
        elif total_steps is not None:
            self.set_total_steps(total_steps)

    @property
    def learned(self) -> list[str]:
        return self.process.names

    def set_total_steps(self, total_steps: int) -> None:
        """Stretch the process to ``total_steps`` retrain steps (no-op for ``final``/``equal``)."""
        if self.mode == "process":
            self._set_table(total_steps)

    def _set_table(self, length: int) -> None:
        n = len(self.process.names)
        if self.mode == "equal":
            self._alpha, self._alpha_tilde = torch.full((1, n), 1.0 / n), torch.full((1, n), math.inf)
        elif self.mode == "final":
            a, at = self.process.final()
            self._alpha, self._alpha_tilde = a[None], at[None]
        else:
            self._alpha, self._alpha_tilde = self.process.stretch(length)

    def _row(self, step: int) -> int:
        if self._alpha is None:
            raise RuntimeError("process weighting: the retrain length is unknown; call "
                               "weighting.set_total_steps(epochs * batches_per_epoch) or add the "
                               "kdtune.search.distpro.ProcessReplay callback to the Trainer")
        return min(max(step, 0), len(self._alpha) - 1)

    def alpha_at(self, step: int) -> tuple[Tensor, Tensor]:
        """(α, α̃) of the process pathways (L,) at retrain ``step``."""
        r = self._row(step)
        assert self._alpha is not None and self._alpha_tilde is not None
        return self._alpha[r], self._alpha_tilde[r]

    def weights_for(self, step: int) -> dict[str, Tensor | float]:
        weights: dict[str, Tensor | float] = dict(self.base_weights)
        alpha, _ = self.alpha_at(step)
        for k, name in enumerate(self.process.names):
            weights[name] = float(alpha[k])
        return weights

    def active(self, step: int) -> set[str] | None:
        _, alpha_tilde = self.alpha_at(step)
        tau = -math.inf if self.tau is None else self.tau
        dropped = {n for n, a in zip(self.process.names, alpha_tilde.tolist(), strict=True) if a <= tau}
        self.diagnostics = {"pathways_kept": 1.0 - len(dropped) / len(self.process.names)}
        if self.tau is None:
            return None
        return {n for n in self.names if n not in dropped}

    def extra_repr(self) -> str:
        return f"{len(self.process.names)} pathways, mode={self.mode}, tau={self.tau}"
