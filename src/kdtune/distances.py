"""How to compare: distances between an (aligned) student feature and a teacher feature.

Every distance is a pure function ``fn(s, t, **kwargs) -> Tensor`` returning a 0-dim tensor,
registered in :data:`DISTANCES` with :func:`register_distance`, which records ``fn.same_shape``:

* ``same_shape=True``: ``s`` and ``t`` must have identical shapes (point-wise distances such as
  MSE, CWD, HCL); a mismatch raises :class:`~kdtune.transforms.ShapeMismatchError` before any
  arithmetic, pointing at the adapters.
* ``same_shape=False``: relation-based distances that compare batch-wise similarity structures
  (SP, RKD, PKT, CC, CKA) or channel distributions (NST); the widths may differ.

Distances never detach the teacher: the teacher runs under ``torch.no_grad()`` already, and a
distance that detached would break the exact hypergradients of the search.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.registry import Registry
from kdtune.transforms import ShapeMismatchError

__all__ = ["DISTANCES", "DistanceFn", "register_distance"]


class DistanceFn(Protocol):
    """A registered distance: ``fn(s, t, **kwargs) -> 0-dim Tensor`` with a ``same_shape`` flag."""

    same_shape: bool

    def __call__(self, s: Tensor, t: Tensor, **kwargs: Any) -> Tensor: ...


#: All distances by name.
DISTANCES: Registry[DistanceFn] = Registry("distance")

_RELATION_HINT = "sp, rkd, pkt, cc, cka, nst"


def register_distance(name: str, *, same_shape: bool) -> Callable[[Callable[..., Tensor]], DistanceFn]:
    """Register ``fn`` as distance ``name`` and set ``fn.same_shape``.

    With ``same_shape=True`` the registered function first checks that ``s.shape == t.shape`` and
    raises :class:`ShapeMismatchError` naming both shapes otherwise.
    """

    def add(fn: Callable[..., Tensor]) -> DistanceFn:
        if same_shape:

            @functools.wraps(fn)
            def checked(s: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
                if s.shape != t.shape:
                    raise ShapeMismatchError(
                        f"distance {name!r} needs student and teacher of the same shape, got student "
                        f"{tuple(s.shape)} and teacher {tuple(t.shape)}: align them with an adapter "
                        f"transform (conv1x1, linear, ...) or use a relation-based distance "
                        f"({_RELATION_HINT})"
                    )
                return fn(s, t, **kwargs)

            out: Any = checked
        else:
            out = fn
        out.same_shape = same_shape
        return DISTANCES.register(name)(out)

    return add


# --------------------------------------------------------------------------- helpers


def _require_dims(name: str, s: Tensor, t: Tensor, ndims: Sequence[int], what: str) -> None:
    if s.dim() not in ndims or t.dim() not in ndims:
        raise ShapeMismatchError(
            f"distance {name!r} needs {what}, got student {tuple(s.shape)} and teacher {tuple(t.shape)}"
        )


def _require_batch(name: str, s: Tensor, t: Tensor) -> None:
    if s.shape[0] != t.shape[0]:
        raise ShapeMismatchError(
            f"distance {name!r} compares the same samples on both sides: batch sizes differ, "
            f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}"
        )


def _pearson_rows(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Pearson correlation of matching rows of a, b (R, K) -> (R,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    # clamp (not + eps) so that rho(a, a) is exactly 1 even for low-variance rows
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)


# --------------------------------------------------------------------------- point-wise


@register_distance("mse", same_shape=True)
def mse(s: Tensor, t: Tensor) -> Tensor:
    """Mean squared error ``mean((s - t)^2)`` over all elements (FitNets; Romero et al. 2015, eq. 3)."""
    return F.mse_loss(s, t)


@register_distance("l1", same_shape=True)
def l1(s: Tensor, t: Tensor) -> Tensor:
    """Mean absolute error ``mean(|s - t|)`` over all elements (DistPro's L1 option)."""
    return F.l1_loss(s, t)


@register_distance("smooth_l1", same_shape=True)
def smooth_l1(s: Tensor, t: Tensor, beta: float = 1.0) -> Tensor:
    """Huber / smooth-L1 ``mean(0.5 d^2/beta if |d| < beta else |d| - 0.5 beta)``, d = s - t."""
    return F.smooth_l1_loss(s, t, beta=beta)


@register_distance("cosine", same_shape=True)
def cosine(s: Tensor, t: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine distance ``mean_n (1 - cos(vec s_n, vec t_n))`` over samples of flattened features.

    Shapes: (N, ...) both -> 0-dim.
    """
    return (1.0 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1, eps=eps)).mean()


@register_distance("kl", same_shape=True)
def kl(s: Tensor, t: Tensor, tau: float = 1.0) -> Tensor:
    """Softmax-KL over flattened features (Auto-KD's L_KL; Li et al. 2023, Table 1).

    ``tau^2 / N * sum_n KL(softmax(t_n / tau) || softmax(s_n / tau))`` with rows ``(N, -1)``
    (batchmean; the inter-spatial transform decides what a row is). Hinton's KD on features.
    """
    log_ps = F.log_softmax(s.flatten(1) / tau, dim=1)
    log_pt = F.log_softmax(t.flatten(1) / tau, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * tau**2


@register_distance("renyi", same_shape=True)
def renyi(s: Tensor, t: Tensor, alpha: float = 2.0, tau: float = 1.0) -> Tensor:
    """Rényi divergence of order alpha between softmax-normalised features (Auto-KD §2.1, extended space).

    Auto-KD's extended space adds "Renyi entropy for embedding feature distillation" without a
    formula; we use the relative Rényi entropy (Rényi 1961), the order-alpha generalisation of the
    ``kl`` distance: with rows ``p_n = softmax(vec t_n / tau)``, ``q_n = softmax(vec s_n / tau)``,
    ``D_alpha(p_n || q_n) = 1 / (alpha - 1) * log sum_i p_ni^alpha q_ni^(1 - alpha)``,
    averaged over the rows and times ``tau^2`` (as ``kl``). alpha -> 1 is the KL divergence (used
    exactly at alpha = 1); alpha = 2 weighs the classes/positions the teacher is sure of more.
    Computed in log space (logsumexp), so it stays finite for peaked distributions.

    Shapes: (N, ...) both, identical -> 0-dim.
    """
    if alpha <= 0:
        raise ValueError(f"renyi: alpha must be > 0, got {alpha}")
    log_ps = F.log_softmax(s.flatten(1) / tau, dim=1)
    log_pt = F.log_softmax(t.flatten(1) / tau, dim=1)
    if alpha == 1:
        return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean() * tau**2
    d = torch.logsumexp(alpha * log_pt + (1.0 - alpha) * log_ps, dim=1) / (alpha - 1.0)
    return d.mean() * tau**2


@register_distance("cwd", same_shape=True)
def cwd(s: Tensor, t: Tensor, tau: float = 4.0) -> Tensor:
    """Channel-wise distillation (Shu et al. 2021, eq. 2-4).

    Each channel becomes a distribution over spatial positions, ``phi(y_c) = softmax(y_c / tau)``
    over the H*W positions, and
    ``L = tau^2 / (N C) * sum_{n,c} sum_i phi(t_{n,c,i}) log(phi(t_{n,c,i}) / phi(s_{n,c,i}))``.

    Shapes: (N, C, H, W) or (N, C, L) both, identical -> 0-dim.

    Args:
        tau: softmax temperature (default 4).
    """
    _require_dims("cwd", s, t, (3, 4), "(N, C, H, W) maps or (N, C, L) sequences")
    n, c = s.shape[:2]
    log_ps = F.log_softmax(s.reshape(n, c, -1) / tau, dim=2)
    log_pt = F.log_softmax(t.reshape(n, c, -1) / tau, dim=2)
    kl_per_channel = (log_pt.exp() * (log_pt - log_ps)).sum(dim=2)  # (N, C)
    return kl_per_channel.mean() * tau**2


@register_distance("pearson", same_shape=True)
def pearson(s: Tensor, t: Tensor, softmax: bool = False, tau: float = 1.0, beta: float = 1.0,
            gamma: float = 1.0, eps: float = 1e-8) -> Tensor:
    """DIST's relation loss (Huang et al. 2022, eq. 6-9): inter- plus intra-class 1 - Pearson.

    With ``Y = softmax(Z / tau)`` when ``softmax`` (DIST on logits) and ``Y = Z`` otherwise, on
    features flattened to (N, K):
    ``L = beta * (1 - mean_n rho(Ys_n, Yt_n)) + gamma * (1 - mean_k rho(Ys_:k, Yt_:k))``, times
    ``tau^2`` when ``softmax`` (as DIST's code does), where rho is the Pearson correlation. The
    inter-class term correlates rows (samples), the intra-class term columns (classes).
    The intra-class term needs N >= 2 (a single row has no variance: rho is taken as 0).

    Shapes: (N, ...) both, identical -> 0-dim.
    """
    ys, yt = s.flatten(1), t.flatten(1)
    if softmax:
        ys, yt = F.softmax(ys / tau, dim=1), F.softmax(yt / tau, dim=1)
    inter = 1.0 - _pearson_rows(ys, yt, eps).mean()
    intra = 1.0 - _pearson_rows(ys.t(), yt.t(), eps).mean()
    loss = beta * inter + gamma * intra
    return loss * tau**2 if softmax else loss


@register_distance("gram_l2", same_shape=True)
def gram_l2(s: Tensor, t: Tensor, normalize: bool = False, eps: float = 1e-12) -> Tensor:
    """Auto-KD's G-L2 (Li et al. 2023, Table 1): mean squared difference of Gram matrices.

    Maps (N, C, H, W) or (N, C, L): per sample ``G = F F^T / (H W)`` with F the (C, H*W) matrix,
    so G is (N, C, C); matrices (R, D) (e.g. after Auto-KD's sample-wise (N, CHW) or channel-wise
    (C, NHW) reshape): ``G = X X^T / D``, (R, R). ``L = mean((G_s - G_t)^2)``.

    ``normalize=True`` is Table 1's written form ``|| G_t / ||G_t|| - G_s / ||G_s|| ||^2``: each Gram
    matrix divided by its Frobenius norm, the squared Frobenius distance (in [0, 4]) averaged over
    the batch of per-sample Grams; scale-free, so the searched weights 1..50 act on a bounded term.
    """
    _require_dims("gram_l2", s, t, (2, 3, 4), "(R, D) matrices, (N, C, L) or (N, C, H, W) features")

    def gram(f: Tensor) -> Tensor:
        if f.dim() == 2:
            return f @ f.t() / f.shape[1]
        f = f.flatten(2)  # (N, C, L)
        return f @ f.transpose(1, 2) / f.shape[2]

    gs, gt = gram(s), gram(t)
    if not normalize:
        return F.mse_loss(gs, gt)
    gs, gt = gs.reshape(-1, *gs.shape[-2:]), gt.reshape(-1, *gt.shape[-2:])  # (B, R, R), B = 1 for matrices
    gs = gs / gs.flatten(1).norm(dim=1).clamp_min(eps)[:, None, None]
    gt = gt / gt.flatten(1).norm(dim=1).clamp_min(eps)[:, None, None]
    return (gs - gt).pow(2).sum(dim=(1, 2)).mean()


@register_distance("hcl", same_shape=True)
def hcl(s: Tensor, t: Tensor, levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    """ReviewKD's hierarchical context loss (Chen et al. 2021, §3.3), as in its released code.

    ``L = (MSE(s, t) + sum_k w_k MSE(P_k(s), P_k(t))) / (1 + sum_k w_k)``, where ``P_k`` is
    adaptive average pooling to ``l_k x l_k`` for the levels ``4, 2, 1`` and ``w_k = 2^-k`` over
    the levels actually used (1/2, 1/4, 1/8). As in ReviewKD, a level with ``l >= H`` is skipped
    (pooling would not summarise anything) and does not consume a halving; for non-square maps
    we skip when ``l >= min(H, W)``. E.g. 8x8: levels 4, 2, 1 with weights 1, 1/2, 1/4, 1/8;
    4x4: levels 2, 1 with weights 1, 1/2, 1/4; 1x1: plain MSE.

    Computed cheaply, equal up to float rounding (:class:`_HierarchicalContext`): pooling is
    linear, so ``MSE(P_k(s), P_k(t))`` is the mean square of ``P_k(s - t)`` — the teacher is never
    pooled on its own — and the gradient ``2 (d / n + sum_k w_k P_k^T P_k d / n_k) / total`` (d = s - t)
    is one pass over the map instead of autograd's chain of pooling and loss backwards.

    Shapes: (N, C, H, W) both, identical -> 0-dim.
    """
    _require_dims("hcl", s, t, (4,), "(N, C, H, W) maps")
    h, w = s.shape[-2:]
    levels = tuple(int(level) for level in levels if level < min(h, w))
    return _HierarchicalContext.apply(s, t, levels)


class _HierarchicalContext(torch.autograd.Function):
    """HCL of :func:`hcl` for its used ``levels``, with the gradient of its docstring written out.

    The backward is made of differentiable operations: under ``create_graph`` (a double backward)
    it recomputes the difference and its pooling from ``s`` and ``t``, so higher derivatives are
    exact too.
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, t: Tensor, levels: tuple[int, ...]) -> Tensor:
        diff = s - t
        pooling = _LevelPooling(diff, levels)
        pooled = pooling.pool(diff)
        weights = [0.5 ** (k + 1) for k in range(len(levels))]
        loss = torch.linalg.vector_norm(diff).square() / diff.numel()
        for wk, p in zip(weights, pooled, strict=True):
            loss = loss + wk * p.square().mean()
        ctx.save_for_backward(s, t, diff, *pooled)
        ctx.pooling, ctx.weights = pooling, weights
        return loss / (1.0 + sum(weights))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        s, t, diff, *pooled = ctx.saved_tensors
        pooling, weights = ctx.pooling, ctx.weights
        if torch.is_grad_enabled():  # create_graph: every factor from the graph of s and t
            diff = s - t
            pooled = pooling.pool(diff)
        scale = grad * (2.0 / (1.0 + sum(weights)))
        coefficients = [p * (scale * (wk / p.numel())) for wk, p in zip(weights, pooled, strict=True)]
        grad_s = pooling.add_transposed(diff, scale / diff.numel(), coefficients)
        return (grad_s if ctx.needs_input_grad[0] else None, -grad_s if ctx.needs_input_grad[1] else None, None)


class _LevelPooling:
    """``adaptive_avg_pool2d`` of (N, C, H, W) maps to several levels, and its transpose.

    When the levels tile each other exactly (28 -> 4 -> 2 -> 1) each is average-pooled from the
    previous one; otherwise (7x7 -> 4, 2) all levels are one product with the pooling's
    (sum l^2, H W) matrix, far cheaper than the adaptive pooling kernels. Both give its averages.
    A channels-last map is pooled in its own memory layout, without a copy.
    """

    def __init__(self, x: Tensor, levels: tuple[int, ...]) -> None:
        n, c, h, w = x.shape
        self.levels = levels
        self.nested = bool(levels) and all(a % b == 0 for a, b in zip((h, *levels), levels, strict=False)) \
            and w % levels[0] == 0
        self.channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        self.matrix = None if self.nested or not levels else _pooling_matrix(h, w, levels, x.dtype, x.device)

    def _rows(self, x: Tensor) -> Tensor:
        """x as (N, H W, C) (channels-last memory) or (N, C, H W): a view when x is laid out so."""
        n, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(n, h * w, c) if self.channels_last else x.reshape(n, c, h * w)

    def pool(self, x: Tensor) -> list[Tensor]:
        """P_k x for every level (in a layout of this class's own; only the values matter)."""
        if self.nested:
            out, coarser = [], x
            for level in self.levels:
                coarser = F.avg_pool2d(coarser, (coarser.shape[-2] // level, coarser.shape[-1] // level))
                out.append(coarser)
            return out
        if self.matrix is None:
            return []
        rows = self._rows(x)
        pooled = self.matrix @ rows if self.channels_last else rows @ self.matrix.T  # (N, L, C) / (N, C, L)
        return list(pooled.split([level * level for level in self.levels], dim=1 if self.channels_last else 2))

    def add_transposed(self, x: Tensor, alpha: Tensor, coefficients: Sequence[Tensor]) -> Tensor:
        """``alpha x + sum_k P_k^T c_k``, the c_k shaped as :meth:`pool` gives; x's shape and layout."""
        n, c, h, w = x.shape
        if not coefficients:
            return x * alpha
        if not self.nested:
            q = torch.cat(list(coefficients), dim=1 if self.channels_last else 2)
            spread = self.matrix.T @ q if self.channels_last else q @ self.matrix  # (N, H W, C) / (N, C, H W)
            out = torch.addcmul(spread, self._rows(x), alpha)
            return out.view(n, h, w, c).permute(0, 3, 1, 2) if self.channels_last else out.view(n, c, h, w)
        acc = coefficients[-1]  # P_k^T = P_0^T R_1^T ... R_k^T, each R the average of r x r blocks
        for k in range(len(self.levels) - 2, -1, -1):
            r = self.levels[k] // self.levels[k + 1]
            acc = coefficients[k] + acc.repeat_interleave(r, -2).repeat_interleave(r, -1) / (r * r)
        level = self.levels[0]
        bh, bw = h // level, w // level
        acc = acc / (bh * bw)
        if self.channels_last:  # (N, l, bh, l, bw, C) views: each block gets its pooled coefficient
            blocks = x.permute(0, 2, 3, 1).reshape(n, level, bh, level, bw, c)
            out = torch.addcmul(acc.permute(0, 2, 3, 1).reshape(n, level, 1, level, 1, c), blocks, alpha)
            return out.view(n, h, w, c).permute(0, 3, 1, 2)
        blocks = x.reshape(n, c, level, bh, level, bw)
        return torch.addcmul(acc.reshape(n, c, level, 1, level, 1), blocks, alpha).view(n, c, h, w)


@functools.lru_cache(maxsize=32)
def _pooling_matrix(h: int, w: int, levels: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Rows: the weights adaptive average pooling of an H x W map to each level gives each pixel."""
    unit_maps = torch.eye(h * w, dtype=dtype, device=device).view(h * w, 1, h, w)
    return torch.cat([F.adaptive_avg_pool2d(unit_maps, level).flatten(1).T for level in levels])


@register_distance("at", same_shape=True)
def at(s: Tensor, t: Tensor) -> Tensor:
    """Attention-transfer distance ``mean((A_s - A_t)^2)`` (Zagoruyko & Komodakis 2017, eq. 2).

    Use after the ``attention_map`` transform (unit-norm maps, (N, H*W)). The mean over N*H*W
    of the squared difference is the convention of the AT/CRD/mdistiller code; the paper's
    ``||.||_2`` (not squared, summed over samples) differs by a monotone map and a constant.
    """
    return (s - t).pow(2).mean()


# --------------------------------------------------------------------------- relation-based


@register_distance("cka", same_shape=False)
def cka(s: Tensor, t: Tensor, eps: float = 1e-12) -> Tensor:
    """1 - linear CKA (Kornblith et al. 2019, eq. 2 with linear kernels) of (N, -1) features.

    With K = X X^T, L = Y Y^T (N x N Gram matrices of the flattened features) and the centring
    H = I - 11^T / N: ``CKA = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)``, which equals
    ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` for column-centred X_c, Y_c.
    Invariant to orthogonal transforms and isotropic scaling; widths may differ.

    Shapes: (N, ...), (N, ...) -> 0-dim, in [0, 1].
    """
    _require_batch("cka", s, t)
    x = s.flatten(1)
    y = t.flatten(1)
    x = x - x.mean(dim=0, keepdim=True)  # centring the columns == H K H for the Gram matrix
    y = y - y.mean(dim=0, keepdim=True)
    k, l_ = x @ x.t(), y @ y.t()  # (N, N); cheaper than D x D when D > N
    hsic = (k * l_).sum()
    return 1.0 - hsic / (k.norm() * l_.norm()).clamp_min(eps)


@register_distance("sp", same_shape=False)
def sp(s: Tensor, t: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019, eq. 2-4).

    ``G = normalize_rows(F F^T)`` with F the (N, -1) flattened features, so G is (N, N) and each
    row has unit L2 norm; ``L = ||G_s - G_t||_F^2 / N^2``. Widths may differ.
    """
    _require_batch("sp", s, t)
    n = s.shape[0]
    fs, ft = s.flatten(1), t.flatten(1)
    gs = F.normalize(fs @ fs.t(), p=2.0, dim=1)
    gt = F.normalize(ft @ ft.t(), p=2.0, dim=1)
    return (gs - gt).pow(2).sum() / (n * n)


def _pairwise_distances(e: Tensor, eps: float) -> Tensor:
    """Euclidean distances between rows of e (N, D) -> (N, N), zero diagonal, finite gradient."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * e @ e.t()).clamp(min=eps)  # clamp: sqrt'(0) is inf
    d = d2.sqrt()
    return d * (1.0 - torch.eye(len(e), dtype=e.dtype, device=e.device))


@register_distance("rkd", same_shape=False)
def rkd(s: Tensor, t: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0,
        eps: float = 1e-12) -> Tensor:
    """Relational KD (Park et al. 2019, eq. 4-7): distance-wise + angle-wise potentials.

    On (N, -1) flattened features e_i:
    distance ``psi_D(i, j) = ||e_i - e_j|| / mu`` with mu the mean distance over pairs i != j,
    ``L_D = smoothL1(psi_D^s, psi_D^t)`` (mean over the N x N matrix);
    angle ``psi_A(i, j, k) = <(e_i - e_j)/||.||, (e_k - e_j)/||.||>`` for all triplets,
    ``L_A = smoothL1(psi_A^s, psi_A^t)`` (mean over N^3); ``L = 25 L_D + 50 L_A`` (paper's
    lambda_D = 25, lambda_A = 50). Degenerate triplets (i == j or k == j) have cosine 0 on both
    sides, as in the reference code. Needs N >= 2.
    """
    _require_batch("rkd", s, t)
    if s.shape[0] < 2:
        raise ValueError("rkd needs a batch of at least 2 samples (it compares pairs)")
    es, et = s.flatten(1), t.flatten(1)
    n = es.shape[0]
    off_diag = 1.0 - torch.eye(n, dtype=es.dtype, device=es.device)

    def distance_potential(e: Tensor) -> Tensor:
        d = _pairwise_distances(e, eps)
        return d / (d.sum() / off_diag.sum())

    def angle_potential(e: Tensor) -> Tensor:
        diff = F.normalize(e[None, :, :] - e[:, None, :], p=2.0, dim=2)  # diff[j, i] = e_i - e_j
        return diff @ diff.transpose(1, 2)  # (N, N, N): [j, i, k] = cos angle i-j-k

    loss_d = F.smooth_l1_loss(distance_potential(es), distance_potential(et))
    loss_a = F.smooth_l1_loss(angle_potential(es), angle_potential(et))
    return distance_weight * loss_d + angle_weight * loss_a


@register_distance("pkt", same_shape=False)
def pkt(s: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018, eq. 9-12), cosine kernel.

    Rows of the (N, -1) features are L2-normalised; ``K = (F F^T + 1) / 2`` maps cosine
    similarity to [0, 1]; conditional probabilities ``P = K / rowsum(K)``;
    ``L = mean_{i,j} P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))``. The mean over all N^2
    entries (not a per-row sum) follows the authors'/CRD's code, which the usual weight (3e4)
    was tuned for. Widths may differ.
    """
    _require_batch("pkt", s, t)

    def conditional(f: Tensor) -> Tensor:
        f = F.normalize(f.flatten(1), p=2.0, dim=1)
        k = (f @ f.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    ps, pt = conditional(s), conditional(t)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


@register_distance("nst", same_shape=False)
def nst(s: Tensor, t: Tensor, degree: int = 2, c: float = 0.0) -> Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017, eq. 4 and 7): squared MMD, polynomial kernel.

    Each channel of a sample is one draw: its (H*W) activation vector, L2-normalised. With
    ``k(x, y) = (x^T y + c)^d`` (d = 2, c = 0), per sample
    ``MMD^2 = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j)``
    over student channels i and teacher channels j, averaged over the batch. For d = 2, c = 0 it
    equals ``||S^T S / Cs - T^T T / Ct||_F^2``, the spatial (HW x HW) Gram-matrix form quoted by
    Adaptive Distillation (their App. A). Channel counts may differ; spatial sizes must match.

    Shapes: (N, Cs, H, W), (N, Ct, H, W) (or (N, C, L)) -> 0-dim.
    """
    _require_dims("nst", s, t, (3, 4), "(N, C, H, W) maps or (N, C, L) sequences")
    _require_batch("nst", s, t)
    if s.shape[2:] != t.shape[2:]:
        raise ShapeMismatchError(
            f"distance 'nst' needs equal spatial sizes, got student {tuple(s.shape)} and teacher "
            f"{tuple(t.shape)}: resize with an adapter (conv1x1) first"
        )
    fs = F.normalize(s.flatten(2), p=2.0, dim=2)  # (N, Cs, HW)
    ft = F.normalize(t.flatten(2), p=2.0, dim=2)  # (N, Ct, HW)
    hw = fs.shape[2]
    if degree == 2 and c == 0.0 and hw * hw < fs.shape[1] * ft.shape[1]:
        # The spatial-Gram form above: O(HW^2) per sample instead of O(C^2) -- a 1280-channel student
        # map of 4x4 would otherwise build (N, 1280, 1280) kernels.
        gs = fs.transpose(1, 2) @ fs / fs.shape[1]  # (N, HW, HW)
        gt = ft.transpose(1, 2) @ ft / ft.shape[1]
        return (gs - gt).pow(2).sum(dim=(1, 2)).mean()

    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.transpose(1, 2) + c).pow(degree).mean()

    return kernel_mean(ft, ft) + kernel_mean(fs, fs) - 2.0 * kernel_mean(fs, ft)


@register_distance("cc", same_shape=False)
def cc(s: Tensor, t: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """Correlation congruence (Peng et al. 2019, eq. 5-8): MSE of batch correlation matrices.

    Embeddings (N, -1) are L2-normalised, so ``||f_i - f_j||^2 = 2 - 2 f_i^T f_j`` and the
    Gaussian RBF kernel ``exp(-gamma ||f_i - f_j||^2) = exp(-2 gamma) exp(2 gamma f_i^T f_j)``
    is approximated by its P-th order Taylor expansion
    ``C_ij = sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! (f_i^T f_j)^p`` (P = 2, gamma = 0.4);
    ``L = ||C_s - C_t||_F^2 / N^2`` (the paper's eq. 6 normalisation = mean over entries).
    Widths may differ.
    """
    _require_batch("cc", s, t)

    def correlation(f: Tensor) -> Tensor:
        f = F.normalize(f.flatten(1), p=2.0, dim=1)
        sim = f @ f.t()  # (N, N) cosine similarities
        out = torch.zeros_like(sim)
        for p in range(order + 1):
            out = out + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * sim.pow(p)
        return out

    return F.mse_loss(correlation(s), correlation(t))
