"""Per-path gradients: the one place where a weighting strategy differentiates its terms itself.

Most strategies only scale the terms and let the trainer's single ``loss.backward()`` do the rest.
A strategy that needs each path's own gradient (MGDA, Adaptive Distillation eq. 4; the gradient
cosine similarities of its Fig. 4c) calls :func:`path_gradients`, which keeps the graph alive so
the trainer's backward still works afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def path_gradients(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """Gradient of every loss w.r.t. the same parameters, flattened into one row per loss.

    g_i = vec(d f_i / d params), with zeros for the parameters a path does not reach (a hint on
    an early stage never touches the classifier): Adaptive Distillation §3.4, the vectors g_i of
    eq. 4.

    Args:
        losses: K scalar (0-dim) losses sharing one autograd graph.
        params: the D parameters to differentiate (e.g. every trainable student parameter).

    Returns:
        (K, D) float32 tensor, row i = g_i. The autograd graph is retained (``retain_graph``),
        so the caller's later ``backward()`` on a combination of the losses still works.
    """
    if not params:
        raise ValueError("path_gradients needs at least one parameter to differentiate")
    rows = []
    for i, loss in enumerate(losses):
        if loss.ndim != 0:
            raise ValueError(f"path_gradients: loss {i} must be a 0-dim tensor, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:  # a constant term: it moves no parameter
            rows.append(torch.zeros(sum(p.numel() for p in params), device=params[0].device))
            continue
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                               for g, p in zip(grads, params, strict=True)]))
    return torch.stack(rows)


def cosine_matrix(gram: Tensor, eps: float = 1e-30) -> Tensor:
    """Cosine similarities cos(g_i, g_j) = M_ij / sqrt(M_ii M_jj) from a Gram matrix M = G G^T.

    Shapes: (K, K) -> (K, K). A zero gradient has cosine 0 with everything (not NaN).
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    return gram / (norms[:, None] * norms[None, :]).clamp_min(eps)
