"""The method catalogue: named distillation methods with their paper defaults.

Each entry of :data:`LOSSES` is a :class:`LossSpec`:

* **logit** methods carry a function ``fn(s_logits, t_logits, targets, **kwargs) -> Tensor``
  (``kd``, ``l2_logit``, ``dkd``, ``dist``); a logit spec is callable and applies its defaults;
* **feature** methods name a default transform (:mod:`kdtune.transforms`) and distance
  (:mod:`kdtune.distances`) that a pathway combines (``fitnets``, ``at``, ``sp``, ``rkd``, ``pkt``,
  ``nst``, ``cc``, ``cwd``, ``reviewkd``/``hcl``, ``cka``).

``weight`` is the weight the method is usually run with (its paper or the CRD benchmark scripts,
Tian et al. 2020, which most later work copies), stated so that a config can start from it.

Example:
    >>> spec = get_loss("kd")
    >>> loss = spec(s_logits, t_logits, targets)          # tau = 4 from spec.kwargs
    >>> spec.weight
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.distances import DISTANCES, pearson, register_distance
from kdtune.registry import Registry
from kdtune.transforms import TRANSFORMS, ShapeMismatchError

__all__ = ["KD_FORMS", "LOGIT_NORMS", "LOSSES", "LossSpec", "dist", "dkd", "get_loss", "kd", "l2_logit",
           "normalize_logits"]


# --------------------------------------------------------------------------- logit losses


def _check_logits(name: str, s_logits: Tensor, t_logits: Tensor) -> None:
    if s_logits.dim() != 2 or s_logits.shape != t_logits.shape:
        raise ShapeMismatchError(
            f"logit loss {name!r} needs student and teacher logits of the same shape (N, K), got "
            f"student {tuple(s_logits.shape)} and teacher {tuple(t_logits.shape)}"
        )


#: Logit normalisations before the temperature softmax (Auto-KD §2.1 extended space, item 2).
LOGIT_NORMS = ("none", "std", "l2")


def normalize_logits(z: Tensor, mode: str = "none", eps: float = 1e-7) -> Tensor:
    """Per-sample logit normalisation, applied before ``softmax(z / tau)`` (Auto-KD §2.1, extended space).

    Auto-KD adds "logits normalization with a scaling factor for KL divergence"; the paper gives
    no formula. ``std``: ``(z - mean_k z) / std_k z`` (logit standardisation, Sun et al. 2024);
    ``l2``: ``sqrt(K) * z / ||z||_2``. Both leave every row with unit root-mean-square, so the
    temperature that follows is the scaling factor and the searched tau in {1, 2, 4, 8} means the
    same for both; teacher and student logits of different magnitude then compare by shape only.
    ``none``: z unchanged.

    Shapes: (N, K) -> (N, K).
    """
    if mode == "none":
        return z
    if mode == "std":
        return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, unbiased=False, keepdim=True) + eps)
    if mode == "l2":
        return z * (z.shape[1] ** 0.5) / (z.norm(dim=1, keepdim=True) + eps)
    raise ValueError(f"unknown logit normalisation {mode!r}; choose one of {list(LOGIT_NORMS)}")


#: Forms of the soft-target loss :func:`kd`: KL divergence (Hinton) or cross-entropy (Adaptive Distillation eq. 6).
KD_FORMS = ("kl", "ce")


def kd(s_logits: Tensor, t_logits: Tensor, targets: Tensor | None = None, tau: float = 4.0,
       normalize: str = "none", form: str = "kl") -> Tensor:
    """Soft-target KD (Hinton et al. 2015, §2): ``tau^2 * KL(softmax(t/tau) || softmax(s/tau))``.

    ``L = tau^2 / N * sum_n sum_k p^t_nk log(p^t_nk / p^s_nk)`` -- reduction ``batchmean``
    (sum over classes, mean over samples), *not* ``mean``, which would also divide by the class
    count K. The ``tau^2`` keeps gradient magnitudes comparable across temperatures.
    ``normalize`` (:func:`normalize_logits`) rescales both logits first (Auto-KD's extended space).

    ``form="ce"`` gives ``tau^2 * CE(p^t, p^s) = -tau^2 / N sum_n sum_k p^t_nk log p^s_nk``, the
    soft-target path of Adaptive Distillation (App. A.1, eq. 6): KL plus ``tau^2`` times the
    teacher's entropy H(p^t). Same gradient in the student logits, but a larger value, which
    matters wherever the weight depends on the loss value: eq. 6's learned weight tends to 1/loss,
    and with the entropy in the loss it switches KD off (:mod:`kdtune.weighting.uncertainty`).

    Shapes: (N, K), (N, K) -> 0-dim. ``targets`` is unused (uniform signature).
    """
    _check_logits("kd", s_logits, t_logits)
    if form not in KD_FORMS:
        raise ValueError(f"unknown kd form {form!r}; choose one of {list(KD_FORMS)}")
    s_logits, t_logits = normalize_logits(s_logits, normalize), normalize_logits(t_logits, normalize)
    log_ps = F.log_softmax(s_logits / tau, dim=1)
    log_pt = F.log_softmax(t_logits / tau, dim=1)
    if form == "ce":
        return -(log_pt.exp() * log_ps).sum(dim=1).mean() * tau**2
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * tau**2


def l2_logit(s_logits: Tensor, t_logits: Tensor, targets: Tensor | None = None,
             squared: bool = True) -> Tensor:
    """Logit regression (Ba & Caruana 2014, eq. 1): ``mean_n ||z^s_n - z^t_n||_2^2``.

    The squared L2 distance is summed over the K classes and averaged over the batch. Ba & Caruana
    also divide by 2 -- a constant the weight absorbs. ``squared=False`` gives ``mean_n ||.||_2``,
    the form written in Adaptive Distillation (App. A, "l2-Logit").

    Shapes: (N, K), (N, K) -> 0-dim. ``targets`` is unused.
    """
    _check_logits("l2_logit", s_logits, t_logits)
    sq = (s_logits - t_logits).pow(2).sum(dim=1)
    return sq.mean() if squared else sq.clamp_min(1e-12).sqrt().mean()


def dkd(s_logits: Tensor, t_logits: Tensor, targets: Tensor, alpha: float = 1.0, beta: float = 8.0,
        tau: float = 4.0) -> Tensor:
    """Decoupled KD (Zhao et al. 2022, eq. 7): ``alpha * TCKD + beta * NCKD``.

    With temperature-softened probabilities, the target-class binary distributions
    ``b = [p_gt, 1 - p_gt]`` and the distribution over the K - 1 non-target classes
    ``p_hat_k = p_k / (1 - p_gt)``:
    ``TCKD = tau^2 mean_n KL(b^t_n || b^s_n)``, ``NCKD = tau^2 mean_n KL(p_hat^t_n || p_hat^s_n)``.
    Computed in log space (log-sum-exp), so no masking constants are needed.
    Defaults alpha = 1, beta = 8, tau = 4 (the paper's CIFAR-100 setting). The paper also warms
    the DKD weight up linearly over the first 20 epochs; that schedule belongs to the weighting,
    not to this function.

    Shapes: (N, K), (N, K), targets (N,) int64 in [0, K) -> 0-dim.
    """
    _check_logits("dkd", s_logits, t_logits)
    n, k = s_logits.shape
    if k < 2:
        raise ValueError("dkd needs at least 2 classes")
    if targets is None or targets.shape != (n,):
        raise ValueError(f"dkd needs targets of shape ({n},), got "
                         f"{None if targets is None else tuple(targets.shape)}")
    gt_mask = F.one_hot(targets.long(), k).bool()  # (N, K); one_hot fails fast on bad labels
    zs, zt = s_logits / tau, t_logits / tau

    def binary_log_probs(z: Tensor) -> Tensor:
        """log [p_gt, 1 - p_gt], (N, 2)."""
        log_norm = torch.logsumexp(z, dim=1)
        log_gt = z[gt_mask] - log_norm
        log_other = torch.logsumexp(z.masked_fill(gt_mask, float("-inf")), dim=1) - log_norm
        return torch.stack([log_gt, log_other], dim=1)

    def non_target_log_probs(z: Tensor) -> Tensor:
        """log softmax over the K - 1 non-target classes, (N, K - 1)."""
        return F.log_softmax(z[~gt_mask].view(n, k - 1), dim=1)

    def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
        return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()

    tckd = kl_rows(binary_log_probs(zt), binary_log_probs(zs)) * tau**2
    nckd = kl_rows(non_target_log_probs(zt), non_target_log_probs(zs)) * tau**2
    return alpha * tckd + beta * nckd


def dist(s_logits: Tensor, t_logits: Tensor, targets: Tensor | None = None, beta: float = 1.0,
         gamma: float = 1.0, tau: float = 1.0, normalize: str = "none") -> Tensor:
    """DIST on logits (Huang et al. 2022, eq. 10): Pearson relations of softmax(z / tau).

    ``tau^2 [beta (1 - mean_n rho(y^s_n, y^t_n)) + gamma (1 - mean_k rho(y^s_:k, y^t_:k))]`` with
    ``y = softmax(z / tau)``: inter-class (per sample) plus intra-class (per class) correlation.
    Defaults beta = gamma = tau = 1 (DIST's ImageNet setting). See ``distances.pearson``.
    ``normalize`` (:func:`normalize_logits`) rescales both logits first (Auto-KD's extended space).

    Shapes: (N, K), (N, K) -> 0-dim. ``targets`` is unused.
    """
    _check_logits("dist", s_logits, t_logits)
    s_logits, t_logits = normalize_logits(s_logits, normalize), normalize_logits(t_logits, normalize)
    return pearson(s_logits, t_logits, softmax=True, tau=tau, beta=beta, gamma=gamma)


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class LossSpec:
    """A named distillation method: a logit loss, or a default transform + distance for features.

    Attributes:
        name: registry name.
        kind: ``"logit"`` (``fn`` applies to logits) or ``"feature"`` (``transform`` + ``distance``).
        fn: the logit loss ``fn(s_logits, t_logits, targets, **kwargs)``; None for features.
        transform: default transform name (feature methods), a key of ``TRANSFORMS``.
        distance: default distance name (feature methods), a key of ``DISTANCES``.
        kwargs: default keyword arguments of ``fn`` / the distance.
        weight: the weight the method is usually run with.
        doc: formula and paper; its first line is what ``kdtune list losses`` shows.
    """

    name: str
    kind: Literal["logit", "feature"]
    fn: Callable[..., Tensor] | None = None
    transform: str | None = None
    distance: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind == "logit":
            if not callable(self.fn) or self.transform is not None or self.distance is not None:
                raise ValueError(f"logit loss {self.name!r} needs fn and no transform/distance")
        elif self.kind == "feature":
            if self.fn is not None or self.transform is None or self.distance is None:
                raise ValueError(f"feature method {self.name!r} needs transform and distance, not fn")
            # Fail at import time on a typo, with the registries' "did you mean" message.
            TRANSFORMS.get(self.transform)
            DISTANCES.get(self.distance)
        else:
            raise ValueError(f"LossSpec.kind must be 'logit' or 'feature', got {self.kind!r}")
        # A private copy, so that mutating the caller's dict cannot change the catalogue.
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        # Registry.describe() reads getattr(entry, "__doc__"): an instance attribute shadows the
        # class docstring, so each spec describes itself while LossSpec keeps its own docstring.
        object.__setattr__(self, "__doc__", self.doc)

    def __call__(self, s_logits: Tensor, t_logits: Tensor, targets: Tensor | None = None,
                 **overrides: Any) -> Tensor:
        """Apply a logit loss with ``kwargs`` updated by ``overrides``."""
        if self.fn is None:
            raise TypeError(
                f"{self.name!r} is a feature method: apply it through a pathway, i.e. "
                f"build_transform({self.transform!r}, s_shape, t_shape) then "
                f"DISTANCES.get({self.distance!r})"
            )
        return self.fn(s_logits, t_logits, targets, **{**self.kwargs, **overrides})


#: All methods by name; entries are :class:`LossSpec`.
LOSSES: Registry[LossSpec] = Registry("loss")


def _add(spec: LossSpec) -> LossSpec:
    return LOSSES.register(spec.name)(spec)


def get_loss(name: str | LossSpec) -> LossSpec:
    """The :class:`LossSpec` called ``name`` (a spec is returned unchanged).

    Raises:
        KeyError: unknown name; the message lists the closest names and all available ones.
    """
    return LOSSES.get(name)


_add(LossSpec(
    "kd", "logit", fn=kd, kwargs={"tau": 4.0}, weight=1.0,
    doc="Soft-target KD (Hinton et al. 2015): tau^2 KL(p_t || p_s), batchmean, tau=4.\n"
        "Weight 1 beside cross-entropy weight 1 (Hinton's sum; the tau^2 factor keeps the gradient\n"
        "scales comparable). CRD / mdistiller use 0.9 KD with 0.1 CE: set both weights for that.",
))
_add(LossSpec(
    "l2_logit", "logit", fn=l2_logit, kwargs={"squared": True}, weight=1.0,
    doc="Logit regression (Ba & Caruana 2014): mean_n ||z_s - z_t||^2.\n"
        "Adaptive Distillation's hand-tuned weight 0.1 is for the unsquared norm (squared=False).",
))
_add(LossSpec(
    "dkd", "logit", fn=dkd, kwargs={"alpha": 1.0, "beta": 8.0, "tau": 4.0}, weight=1.0,
    doc="Decoupled KD (Zhao et al. 2022): alpha TCKD + beta NCKD, alpha=1, beta=8, tau=4.\n"
        "The paper's 20-epoch linear warm-up of this term is a weighting schedule, not part of fn.",
))
_add(LossSpec(
    "dist", "logit", fn=dist, kwargs={"beta": 1.0, "gamma": 1.0, "tau": 1.0}, weight=1.0,
    doc="DIST (Huang et al. 2022): inter- + intra-class 1 - Pearson on softmax(z / tau), tau=1.",
))
_add(LossSpec(
    "fitnets", "feature", transform="conv1x1", distance="mse", weight=100.0,
    doc="FitNets hints (Romero et al. 2015): MSE after a 1x1 conv + BN regressor.\n"
        "Weight 100 as in the CRD benchmark scripts (Tian et al. 2020).",
))
_add(LossSpec(
    "at", "feature", transform="attention_map", distance="at", weight=500.0,
    doc="Attention transfer (Zagoruyko & Komodakis 2017): mean (A_s - A_t)^2 of unit-norm maps.\n"
        "Weight 500 is the paper's beta/2 with beta=1000 (eq. 2; its reference code), per layer. "
        "CRD / mdistiller use 1000, which under-fit ResNet-8 on FMNIST-5k (benchmarks/RESULTS.md).",
))
_add(LossSpec(
    "sp", "feature", transform="identity", distance="sp", weight=3000.0,
    doc="Similarity-preserving KD (Tung & Mori 2019): ||G_s - G_t||_F^2 / N^2, weight 3000 (CRD).",
))
_add(LossSpec(
    "rkd", "feature", transform="flatten_pool", distance="rkd",
    kwargs={"distance_weight": 25.0, "angle_weight": 50.0}, weight=1.0,
    doc="Relational KD (Park et al. 2019): 25 distance + 50 angle smooth-L1 on pooled embeddings.\n"
        "The 25/50 live in kwargs; the outer weight 1 follows CRD.",
))
_add(LossSpec(
    "pkt", "feature", transform="flatten_pool", distance="pkt", weight=30000.0,
    doc="Probabilistic KT (Passalis & Tefas 2018): KL of cosine-kernel conditionals, weight 3e4.\n"
        "The weight is CRD's, tuned for the mean-over-N^2 reduction used by distances.pkt.",
))
_add(LossSpec(
    "nst", "feature", transform="match_spatial", distance="nst", kwargs={"degree": 2, "c": 0.0}, weight=50.0,
    doc="Neuron selectivity transfer (Huang & Wang 2017): poly-kernel MMD^2, no adapter, weight 50.\n"
        "As the paper, its reference code (weight 50) and CRD: channels compared as they are, the larger map\n"
        "pooled to the smaller. Through a 1x1 adapter (transform: conv1x1, the default until 2026-12-06) it\n"
        "fell under the student alone on four of four pairs; without, it is above it on three\n"
        "(benchmarks/RESULTS.md, 'NST without its adapter').",
))
_add(LossSpec(
    "cc", "feature", transform="flatten_pool", distance="cc", kwargs={"gamma": 0.4, "order": 2},
    weight=0.02,
    doc="Correlation congruence (Peng et al. 2019): MSE of Taylor-RBF batch correlation matrices.\n"
        "Weight 0.02 is CRD's, whose CC variant has a different scale: treat it as a starting point.",
))
_add(LossSpec(
    "cwd", "feature", transform="conv1x1", distance="cwd", kwargs={"tau": 4.0}, weight=1.0,
    doc="Channel-wise distillation (Shu et al. 2021): tau^2 KL of per-channel spatial softmaxes.\n"
        "No classification weight is published (segmentation configs use 3-10 with tau=1); tune it.",
))
_add(LossSpec(
    "reviewkd", "feature", transform="conv1x1", distance="hcl", weight=1.0,
    doc="ReviewKD's HCL (Chen et al. 2021) on 1x1-adapted features, weight 1 as in ReviewKD.\n"
        "Only the loss: ReviewKD's attention-based fusion (ABF) of stages is out of scope.",
))
_add(LossSpec(
    "hcl", "feature", transform="conv1x1", distance="hcl", weight=1.0,
    doc="Hierarchical context loss (Chen et al. 2021), alias of reviewkd; DistPro's distance.",
))
_add(LossSpec(
    "cka", "feature", transform="identity", distance="cka", weight=1.0,
    doc="1 - linear CKA (Kornblith et al. 2019) between flattened features; no usual weight.",
))


# --------------------------------------------------------------------------- logit losses as distances
# A pathway whose two ends are logit modules (a student's classifier, one member of a teacher
# ensemble) compares logits with these: Auto-KD's per-teacher logit terms (eq. 5 over teachers).


@register_distance("logit_kd", same_shape=True)
def logit_kd(s: Tensor, t: Tensor, tau: float = 4.0, normalize: str = "none") -> Tensor:
    """:func:`kd` between captured logits (N, K) -- for pathways; see :func:`kd`."""
    return kd(s, t, None, tau=tau, normalize=normalize)


@register_distance("logit_dist", same_shape=True)
def logit_dist(s: Tensor, t: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0,
               normalize: str = "none") -> Tensor:
    """:func:`dist` between captured logits (N, K) -- for pathways; see :func:`dist`."""
    return dist(s, t, None, beta=beta, gamma=gamma, tau=tau, normalize=normalize)
