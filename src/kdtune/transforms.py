"""How to align: transforms that make a student feature comparable with a teacher feature.

Every transform is a :class:`FeatureTransform`: an ``nn.Module`` built from the *probed* shapes of
the two features (batch dimension included) and called as ``forward(s, t) -> (s', t')``.

* **Trainable adapters** (``conv1x1``, ``conv3x3``, ``distpro``, ``linear``, ``token_mlp``) map the
  *student* feature to the teacher's shape and return the teacher unchanged (SPEC: adapters align
  the student to the teacher's channel count and spatial size; they are trained with the student
  and dropped at export).
* **Parameter-free transforms** (``identity``, ``attention_map``, ``flatten_pool``) may transform
  both sides the same way.

A transform that cannot align the shapes it is given raises :class:`ShapeMismatchError` when it
is *constructed*, naming both shapes and what it needs, so a bad pathway fails before training.

Example:
    >>> tf = build_transform("conv1x1", (8, 16, 32, 32), (8, 64, 8, 8))
    >>> s_out, t_out = tf(torch.randn(8, 16, 32, 32), torch.randn(8, 64, 8, 8))
    >>> tuple(s_out.shape)
    (8, 64, 8, 8)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import KdtuneError
from kdtune.registry import Registry

__all__ = [
    "AUTOKD_GLOBAL",
    "AUTOKD_INTER",
    "AUTOKD_INTRA",
    "TRANSFORMS",
    "AttentionMap",
    "AutoKDTransform",
    "Conv1x1Adapter",
    "Conv3x3Adapter",
    "DistProBlock",
    "FeatureTransform",
    "FlattenPool",
    "Identity",
    "LinearProjector",
    "MapToTokens",
    "ShapeMismatchError",
    "SpatialSelfAttention",
    "TokenMLP",
    "TokensToMap",
    "autokd_attention",
    "autokd_inter",
    "autokd_local",
    "autokd_mask",
    "autokd_multi_scale",
    "build_transform",
    "check_transform_options",
    "patch_tokens",
    "resize_spatial",
    "token_grid",
    "transform_options",
]

Shape = tuple[int, ...]

#: All transforms by name; entries are :class:`FeatureTransform` subclasses.
TRANSFORMS: Registry[type[FeatureTransform]] = Registry("transform")


class ShapeMismatchError(KdtuneError, ValueError):
    """A transform or distance cannot align/compare the student and teacher shapes it was given."""


class FeatureTransform(nn.Module):
    """Base class: ``forward(s, t) -> (s', t')`` with ``s'`` and ``t'`` ready for a distance.

    Args:
        s_shape: probed student feature shape, batch included, e.g. ``(N, C, H, W)``.
        t_shape: probed teacher feature shape, batch included.
    """

    #: Registry name, set by :func:`_register` (used in error messages).
    name: str = "transform"

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__()
        self.s_shape: Shape = _as_shape(s_shape, "s_shape")
        self.t_shape: Shape = _as_shape(t_shape, "t_shape")

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def input_conv(self, s: Tensor, t: Tensor) -> tuple[nn.Conv2d, tuple[int, int] | None] | None:
        """The convolution this transform applies first to the student feature, and the H x W the
        feature is pooled to before it (None: not pooled); None when the transform does not start
        with a convolution. Pathways reading one student feature through convs of the same kind
        compute them as one convolution with concatenated weights (:func:`kdtune.pathways.
        fused_input_convs`) and hand each its slice ``h`` to :meth:`forward_after_input_conv`."""
        return None

    def forward_after_input_conv(self, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``forward(s, t)`` given ``h``, the output of :meth:`input_conv` on the (pooled) ``s``."""
        raise NotImplementedError(f"transform {self.name!r} has no input convolution")

    def extra_repr(self) -> str:
        return f"s_shape={self.s_shape}, t_shape={self.t_shape}"

    def _mismatch(self, need: str) -> ShapeMismatchError:
        """An error naming this transform, both shapes and what it needs."""
        return ShapeMismatchError(
            f"transform {self.name!r} cannot align student {self.s_shape} to teacher {self.t_shape}: "
            f"it needs {need}"
        )

    def _require_ndim(self, ndims: tuple[int, ...], what: str) -> None:
        """Fail fast unless both shapes have one of ``ndims`` dimensions (and the same number)."""
        s_nd, t_nd = len(self.s_shape), len(self.t_shape)
        if s_nd not in ndims or t_nd not in ndims or s_nd != t_nd:
            raise self._mismatch(what)


def conv1x1_bn(c_in: int, c_out: int) -> nn.Sequential:
    """The channel adapter of SPEC's "Adapters": a bias-free 1x1 conv + BN, (N, c_in, H, W) -> (N, c_out, H, W)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


def _as_shape(shape: Sequence[int], arg: str) -> Shape:
    if isinstance(shape, torch.Tensor):
        raise TypeError(f"{arg} must be a shape such as tensor.shape, got a tensor")
    try:
        out = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"{arg} must be a sequence of ints, got {shape!r}") from None
    if len(out) < 2 or any(d < 1 for d in out):
        raise ValueError(f"{arg} must be a full feature shape (N, ...) with positive sizes, got {out}")
    return out


def _register(name: str):
    """Register a transform class under ``name`` and record the name on the class."""

    def add(cls: type[FeatureTransform]) -> type[FeatureTransform]:
        cls.name = name
        return TRANSFORMS.register(name)(cls)

    return add


def resize_spatial(x: Tensor, size: Sequence[int]) -> Tensor:
    """Resize the last two dims of ``x`` (N, C, H, W) to ``size`` = (H', W').

    Adaptive average pooling when the map shrinks on both axes (averages, no aliasing, as
    CRD/ReviewKD do), bilinear interpolation otherwise (``align_corners=False``). Unchanged when
    the size already matches.
    """
    h, w = x.shape[-2:]
    th, tw = int(size[0]), int(size[1])
    if (h, w) == (th, tw):
        return x
    if h >= th and w >= tw:
        return F.adaptive_avg_pool2d(x, (th, tw))
    return F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)


def shrink_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Average-pool ``x`` (N, C, H, W) to ``size`` if it is at least as large on both axes; else unchanged."""
    h, w = x.shape[-2:]
    return resize_spatial(x, size) if h >= int(size[0]) and w >= int(size[1]) else x


def pooled_conv1x1_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, size: Sequence[int]) -> Tensor:
    """``resize_spatial(bn(conv(x)), size)`` for a 1x1 ``conv`` (stride 1, one group) on a map x at
    least as large as ``size`` on both axes, computed at ``size``.

    Average pooling commutes with a 1x1 conv and with BN's per-channel affine map, so only BN's
    batch statistics need the full map, and they follow from the input's moments: with μ and Σ
    the mean and (biased) covariance of x's channels over N, H, W, the conv output's are ``W μ``
    and ``diag(W Σ Wᵀ)``. So ``(conv(pool(x)) - W μ) / sqrt(diag(W Σ Wᵀ) + eps) * γ + β`` — equal up to
    float rounding in value, gradients and running statistics (updated as BatchNorm does), at
    (Hs Ws) / (Ht Wt) times fewer multiply-adds and no (N, Cout, Hs, Ws) map (16x from 28x28 to 7x7).

    Shapes: x (N, Cin, H, W) -> (N, Cout, *size).
    """
    h = conv(resize_spatial(x, size))
    if not bn.training and bn.track_running_stats:
        return bn(h)  # running statistics: BN is a per-channel affine map, it commutes with pooling
    weight = conv.weight.flatten(1)  # (Cout, Cin)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (N H W, Cin): a view of a channels-last map
    mean_in = pixels.mean(0)  # (Cin,)
    centred = pixels - mean_in
    count = len(pixels)
    cov = centred.T @ centred / count  # (Cin, Cin)
    mean, var = weight @ mean_in, ((weight @ cov) * weight).sum(1)  # of conv(x) per output channel
    if conv.bias is not None:
        mean = mean + conv.bias
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean, factor)
            bn.running_var.lerp_(var * count / max(count - 1, 1), factor)
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    out = (h - mean[:, None, None]) * scale[:, None, None]
    return out + bn.bias[:, None, None] if bn.affine else out


def _pooled_size(pool_first: bool, s: Tensor, t: Tensor) -> tuple[int, int] | None:
    """The H x W that ``pool_first`` shrinks ``s`` to before the first conv (None: not pooled)."""
    size = (int(t.shape[-2]), int(t.shape[-1]))
    if not pool_first or s.shape[-2:] == size or not (s.shape[-2] >= size[0] and s.shape[-1] >= size[1]):
        return None
    return size


# --------------------------------------------------------------------------- parameter-free


@_register("identity")
class Identity(FeatureTransform):
    """Pass both features through unchanged (relation-based distances accept different widths)."""

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return s, t


@_register("match_spatial")
class MatchSpatial(FeatureTransform):
    """Match spatial sizes only: the larger map is average-pooled to the smaller's H x W.

    Channels are untouched, so the student is compared as it is -- what a distance that accepts
    different widths wants when no adapter should stand between the two (NST: Huang & Wang 2017
    compare the distributions of the maps' channels, no regressor; their reference code and CRD
    pool the larger map down). Pooling the larger side never invents detail, unlike upsampling a
    small student map to the teacher's size. When neither map is at least as large as the other on
    both axes, the student is resized to the teacher's size (:func:`resize_spatial`).

    Shapes: (N, Cs, Hs, Ws), (N, Ct, Ht, Wt) -> (N, Cs, H, W), (N, Ct, H, W) with
    H x W = min(Hs, Ht) x min(Ws, Wt) when one map is the larger on both axes.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__(s_shape, t_shape)
        self._require_ndim((4,), "4-D (N, C, H, W) feature maps on both sides")

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        (hs, ws), (ht, wt) = s.shape[-2:], t.shape[-2:]
        if ht >= hs and wt >= ws:  # the teacher's map is the larger (or the sizes match)
            return s, shrink_to(t, (hs, ws))
        return resize_spatial(s, (ht, wt)), t


@_register("attention_map")
class AttentionMap(FeatureTransform):
    """Spatial attention maps of both sides (AT; Zagoruyko & Komodakis 2017, eq. 2 and §3.1).

    ``A(F) = normalize(vec(mean_c |F_c|^p))``: the channel mean of ``|F|^p`` (p = 2), flattened
    and L2-normalised per sample. The mean (not the paper's sum) is a constant factor that the
    normalisation removes. When the spatial sizes differ the *student* feature is first resized to
    the teacher's (:func:`resize_spatial`); channel counts may differ.

    Shapes: (N, Cs, Hs, Ws), (N, Ct, Ht, Wt) -> (N, Ht*Wt), (N, Ht*Wt).

    Args:
        p: exponent applied to ``|F|`` before the channel mean (paper: 2).
        eps: floor of the norm in the normalisation (an all-zero map stays zero).
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], p: float = 2.0,
                 eps: float = 1e-12) -> None:
        super().__init__(s_shape, t_shape)
        self._require_ndim((4,), "4-D (N, C, H, W) feature maps on both sides")
        if p <= 0:
            raise ValueError(f"attention_map: p must be > 0, got {p}")
        self.p = float(p)
        self.eps = float(eps)

    def attention(self, f: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, H*W) unit-norm attention vector."""
        a = f.abs().pow(self.p).mean(dim=1).flatten(1)
        return F.normalize(a, p=2.0, dim=1, eps=self.eps)

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s = resize_spatial(s, t.shape[-2:])
        return self.attention(s), self.attention(t)


@_register("flatten_pool")
class FlattenPool(FeatureTransform):
    """Global average pool to one embedding per sample, both sides (for CC/RKD/PKT on features).

    (N, C, H, W) -> (N, C) by the spatial mean; tokens (N, L, D) -> (N, D) by the token mean;
    vectors (N, D) pass through. Widths may differ between student and teacher.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__(s_shape, t_shape)
        for shape in (self.s_shape, self.t_shape):
            if len(shape) not in (2, 3, 4):
                raise self._mismatch("(N, D) vectors, (N, L, D) tokens or (N, C, H, W) maps")

    @staticmethod
    def pool(f: Tensor) -> Tensor:
        if f.dim() == 4:
            return f.mean(dim=(2, 3))
        if f.dim() == 3:
            return f.mean(dim=1)
        return f

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.pool(s), self.pool(t)


# --------------------------------------------------------------------------- conv adapters


@_register("conv1x1")
class Conv1x1Adapter(FeatureTransform):
    """FitNets-style regressor (Romero et al. 2015, §2.2): 1x1 conv + BN on the student, then resize.

    ``s' = resize(BN(W * s))`` with ``W`` a 1x1 conv Cs -> Ct (no bias; BN supplies it) and the
    resize of :func:`resize_spatial` to the teacher's spatial size (adaptive average pooling when
    the student map is larger, bilinear interpolation when smaller). The teacher passes unchanged.

    Shapes: (N, Cs, Hs, Ws), (N, Ct, Ht, Wt) -> (N, Ct, Ht, Wt), (N, Ct, Ht, Wt).
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__(s_shape, t_shape)
        self._require_ndim((4,), "4-D (N, C, H, W) feature maps on both sides")
        cs, ct = self.s_shape[1], self.t_shape[1]
        self.conv = nn.Conv2d(cs, ct, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(ct)

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if self._pools_first(s, t):
            return pooled_conv1x1_bn(self.conv, self.bn, s, t.shape[-2:]), t
        return self.forward_after_input_conv(self.conv(s), t)

    @staticmethod
    def _pools_first(s: Tensor, t: Tensor) -> bool:
        """A student map larger than the teacher's: conv, BN and pooling computed at the teacher's size
        (:func:`pooled_conv1x1_bn`, the same function)."""
        return _pooled_size(True, s, t) is not None

    def input_conv(self, s: Tensor, t: Tensor) -> tuple[nn.Conv2d, tuple[int, int] | None] | None:
        return None if self._pools_first(s, t) else (self.conv, None)

    def forward_after_input_conv(self, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return resize_spatial(self.bn(h), t.shape[-2:]), t


@_register("conv3x3")
class Conv3x3Adapter(FeatureTransform):
    """Two-conv adapter: conv3x3-BN-ReLU-conv3x3-BN on the student (Cs -> Ct -> Ct), then resize.

    A deeper regressor than FitNets' (Romero et al. 2015) for larger semantic gaps; the last layer
    has no ReLU so the output can match signed teacher features. Resize as in ``conv1x1``.

    Shapes: (N, Cs, Hs, Ws), (N, Ct, Ht, Wt) -> (N, Ct, Ht, Wt), (N, Ct, Ht, Wt).

    Args:
        pool_first: when the student map is larger than the teacher's, pool it to the teacher's
            H x W *before* the convs — (Hs Ws) / (Ht Wt) times fewer multiply-adds (16x from 28x28
            to 7x7) for a different function (convs on the pooled map). Default: convs first.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], pool_first: bool = False) -> None:
        super().__init__(s_shape, t_shape)
        self._require_ndim((4,), "4-D (N, C, H, W) feature maps on both sides")
        self.pool_first = bool(pool_first)
        cs, ct = self.s_shape[1], self.t_shape[1]
        self.block = nn.Sequential(
            nn.Conv2d(cs, ct, 3, padding=1, bias=False),
            nn.BatchNorm2d(ct),
            nn.ReLU(inplace=True),
            nn.Conv2d(ct, ct, 3, padding=1, bias=False),
            nn.BatchNorm2d(ct),
        )

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if self.pool_first:
            s = shrink_to(s, t.shape[-2:])
        return self.forward_after_input_conv(self.block[0](s), t)

    def input_conv(self, s: Tensor, t: Tensor) -> tuple[nn.Conv2d, tuple[int, int] | None]:
        return self.block[0], _pooled_size(self.pool_first, s, t)

    def forward_after_input_conv(self, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return resize_spatial(self.block[1:](h), t.shape[-2:]), t

    def extra_repr(self) -> str:
        return super().extra_repr() + (", pool_first=True" if self.pool_first else "")


class SpatialSelfAttention(nn.Module):
    """DistPro's self-attention (Deng et al. 2022, Fig. 4b): ``x * conv(x)``.

    A conv makes a 1-channel attention map (N, 1, H, W) that multiplies every channel of the input.
    Fig. 4b shows no squashing of the map; ``sigmoid=True`` gates with ``sigmoid(conv(x))`` instead
    (kdtune's behaviour before it followed the figure; process files of that time keep it).
    The figure does not give the kernel: we use 3x3 (padding 1) so the map sees a neighbourhood.
    """

    def __init__(self, channels: int, kernel_size: int = 3, sigmoid: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size, padding=kernel_size // 2)
        self.sigmoid = bool(sigmoid)

    def forward(self, x: Tensor) -> Tensor:
        attention = self.conv(x)
        return x * (torch.sigmoid(attention) if self.sigmoid else attention)


@_register("distpro")
class DistProBlock(FeatureTransform):
    """DistPro's transform block (Deng et al. 2022, §3.1 and Fig. 4a) on the student feature.

    ``conv1x1-BN -> self-attention -> conv3x3-BN -> resize to the teacher's H, W -> conv3x3-BN``.

    The paper fixes the order of the layers but not their kernels or activations; our choices:
    the first conv is 1x1 (it only changes the channel count Cs -> Ct, like the SPEC's adapter);
    the self-attention is :class:`SpatialSelfAttention`; the two later convs are 3x3 (padding 1,
    ``kernel_size``) so the last one can smooth interpolation artefacts at the teacher's
    resolution; no ReLU is added (the figure shows none, and the output must be able to match
    signed teacher features); "interpolate" is :func:`resize_spatial` (pooling when shrinking,
    bilinear when growing). The teacher passes unchanged.

    Shapes: (N, Cs, Hs, Ws), (N, Ct, Ht, Wt) -> (N, Ct, Ht, Wt), (N, Ct, Ht, Wt).

    Args:
        kernel_size: kernel of the second and third convs (odd).
        attention_kernel: kernel of the attention conv (odd).
        pool_first: when the student map is larger than the teacher's, pool it to the teacher's
            H x W before conv1 (every layer then runs at the teacher's size: (Hs Ws) / (Ht Wt)
            times cheaper). Not Fig. 4's order, so off by default.
        attention_sigmoid: squash the attention map with a sigmoid (not in Fig. 4b, so off).
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], kernel_size: int = 3,
                 attention_kernel: int = 3, pool_first: bool = False, attention_sigmoid: bool = False) -> None:
        super().__init__(s_shape, t_shape)
        self._require_ndim((4,), "4-D (N, C, H, W) feature maps on both sides")
        if kernel_size % 2 == 0 or attention_kernel % 2 == 0:
            raise ValueError("distpro: kernel sizes must be odd so the spatial size is kept")
        self.pool_first = bool(pool_first)
        cs, ct = self.s_shape[1], self.t_shape[1]
        pad = kernel_size // 2
        self.conv1 = conv1x1_bn(cs, ct)
        self.attention = SpatialSelfAttention(ct, attention_kernel, attention_sigmoid)
        self.conv2 = nn.Sequential(nn.Conv2d(ct, ct, kernel_size, padding=pad, bias=False),
                                   nn.BatchNorm2d(ct))
        self.conv3 = nn.Sequential(nn.Conv2d(ct, ct, kernel_size, padding=pad, bias=False),
                                   nn.BatchNorm2d(ct))

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if self.pool_first:
            s = shrink_to(s, t.shape[-2:])
        return self.forward_after_input_conv(self.conv1[0](s), t)

    def input_conv(self, s: Tensor, t: Tensor) -> tuple[nn.Conv2d, tuple[int, int] | None]:
        return self.conv1[0], _pooled_size(self.pool_first, s, t)

    def forward_after_input_conv(self, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv2(self.attention(self.conv1[1](h)))  # (N, Ct, Hs, Ws)
        x = resize_spatial(x, t.shape[-2:])  # (N, Ct, Ht, Wt)
        return self.conv3(x), t

    def extra_repr(self) -> str:
        return super().extra_repr() + (", pool_first=True" if self.pool_first else "")


# --------------------------------------------------------------------------- vector / token adapters


def _check_vectors_or_tokens(tf: FeatureTransform) -> None:
    """Both (N, D), or both (N, L, D) with the same L (token counts are not interpolated)."""
    tf._require_ndim((2, 3), "(N, D) vectors or (N, L, D) tokens on both sides (same rank)")
    if len(tf.s_shape) == 3 and tf.s_shape[1] != tf.t_shape[1]:
        # Interpolating token sequences is ill-defined with a class token and different patch
        # grids, so we refuse rather than guess.
        raise tf._mismatch(f"the same token count L on both sides (student L={tf.s_shape[1]}, "
                           f"teacher L={tf.t_shape[1]}); select or pool tokens first")


@_register("linear")
class LinearProjector(FeatureTransform):
    """Linear projector on the student's last dim: ``s' = s W^T + b``, Ds -> Dt (FitNets for vectors).

    Shapes: (N, Ds) -> (N, Dt), or tokens (N, L, Ds) -> (N, L, Dt). Token counts must match
    (no interpolation over L: raises :class:`ShapeMismatchError`). The teacher passes unchanged.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], bias: bool = True) -> None:
        super().__init__(s_shape, t_shape)
        _check_vectors_or_tokens(self)
        self.proj = nn.Linear(self.s_shape[-1], self.t_shape[-1], bias=bias)

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.proj(s), t


@_register("token_mlp")
class TokenMLP(FeatureTransform):
    """DistPro's ViT transform block (Deng et al. 2022, appendix A, Fig. 1): linear + GELU + dropout.

    ``s' = Linear(Dropout(GELU(Linear(s))))``, Ds -> hidden -> Dt. The appendix describes the
    "linear block" as a linear layer followed by GELU and dropout; we add a final linear layer
    because a GELU output is bounded below (>= -0.17) and could not match signed teacher tokens.
    The dropout rate is not given: default 0.0 (DeiT's setting), configurable.

    Shapes: (N, L, Ds) -> (N, L, Dt) (same L required) or (N, Ds) -> (N, Dt). Teacher unchanged.

    Args:
        hidden: hidden width (default: the teacher's width Dt).
        dropout: dropout probability after the GELU.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], hidden: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__(s_shape, t_shape)
        _check_vectors_or_tokens(self)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"token_mlp: dropout must be in [0, 1), got {dropout}")
        ds, dt = self.s_shape[-1], self.t_shape[-1]
        hidden = dt if hidden is None else int(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(ds, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dt)
        )

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.mlp(s), t


# --------------------------------------------------------------------------- CNN maps <-> tokens


def token_grid(tokens: int) -> tuple[int, int]:
    """(side, extra) of a square patch grid of ``tokens`` = side^2 + extra, extra in {0, 1} (a class
    token first); raises ValueError when ``tokens`` is no such count."""
    for extra in (0, 1):
        side = math.isqrt(tokens - extra)
        if side > 0 and side * side == tokens - extra:
            return side, extra
    raise ValueError(f"{tokens} tokens are not a square patch grid (with or without one class token)")


def _grid_of(tf: FeatureTransform, shape: Shape) -> tuple[int, int]:
    try:
        return token_grid(shape[1])
    except ValueError as err:
        raise tf._mismatch(f"tokens on a square patch grid: {err}") from None


def patch_tokens(t: Tensor, side: int) -> Tensor:
    """(N, L, D) -> (N, D, side, side): the last side^2 tokens (a leading class token is dropped),
    row by row, as a map."""
    return t[:, -side * side:].transpose(1, 2).reshape(len(t), t.shape[-1], side, side)


@_register("tokens_to_map")
class TokensToMap(FeatureTransform):
    """Student tokens onto a teacher's CNN map (ViT student, CNN teacher).

    (N, L, Ds) -> drop a class token, patch grid g x g -> (N, Ds, g, g) -> 1x1 conv + BN to the
    teacher's Ct channels -> resized to the teacher's (Ht, Wt) (:func:`resize_spatial`). Teacher
    unchanged, so distances on maps (MSE, AT, CKA ...) apply.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__(s_shape, t_shape)
        if len(self.s_shape) != 3 or len(self.t_shape) != 4:
            raise self._mismatch("(N, L, D) student tokens and an (N, C, H, W) teacher map")
        self.side, _ = _grid_of(self, self.s_shape)
        self.proj = conv1x1_bn(self.s_shape[2], self.t_shape[1])

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return resize_spatial(self.proj(patch_tokens(s, self.side)), t.shape[-2:]), t


@_register("map_to_tokens")
class MapToTokens(FeatureTransform):
    """A student's CNN map onto a teacher's tokens (CNN student, ViT teacher).

    Student (N, Cs, H, W) -> resized to the teacher's patch grid g x g -> 1x1 conv + BN to Dt ->
    (N, g^2, Dt) tokens, row by row; teacher (N, L, Dt) -> its g^2 patch tokens (a class token,
    which has no place on the grid, is dropped).
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__(s_shape, t_shape)
        if len(self.s_shape) != 4 or len(self.t_shape) != 3:
            raise self._mismatch("an (N, C, H, W) student map and (N, L, D) teacher tokens")
        self.side, _ = _grid_of(self, self.t_shape)
        self.proj = conv1x1_bn(self.s_shape[1], self.t_shape[2])

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s = self.proj(resize_spatial(s, (self.side, self.side)))
        return s.flatten(2).transpose(1, 2), t[:, -self.side * self.side:]


# --------------------------------------------------------------------------- factory


def transform_options(name: str) -> list[str]:
    """The keyword options a registered transform takes besides its shapes, e.g. ``["pool_first"]``."""
    params = inspect.signature(TRANSFORMS.get(name).__init__).parameters
    return [p for p in params if p not in ("self", "s_shape", "t_shape")
            and params[p].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


def check_transform_options(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the allowed options when ``kwargs`` has one ``name`` does not take."""
    params = inspect.signature(TRANSFORMS.get(name).__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return  # takes any option: the transform checks its own
    unknown = sorted(set(kwargs) - set(transform_options(name)))
    if unknown:
        raise ValueError(f"transform {name!r} has no options {unknown}; its options: {transform_options(name)}")


def build_transform(
    name_or_module: str | type[FeatureTransform] | FeatureTransform,
    s_shape: Sequence[int],
    t_shape: Sequence[int],
    **kwargs: Any,
) -> FeatureTransform:
    """Build a transform by registry name (or class) for the given probed shapes.

    Args:
        name_or_module: a name in :data:`TRANSFORMS` (e.g. ``"conv1x1"``), a
            :class:`FeatureTransform` subclass, or an already-built instance (returned as is after
            checking it was built for the same per-sample shapes).
        s_shape: student feature shape including the batch dim, e.g. ``(N, C, H, W)``.
        t_shape: teacher feature shape including the batch dim.
        **kwargs: options of the transform (e.g. ``p=2`` for ``attention_map``).

    Returns:
        The transform module.

    Raises:
        KeyError: unknown name (the message lists the closest names).
        ShapeMismatchError: the transform cannot align these shapes.
    """
    if isinstance(name_or_module, FeatureTransform):
        if kwargs:
            raise TypeError(f"options {sorted(kwargs)} only apply when building a transform by name")
        tf = name_or_module
        if tf.s_shape[1:] != tuple(s_shape)[1:] or tf.t_shape[1:] != tuple(t_shape)[1:]:
            raise ShapeMismatchError(
                f"transform {tf.name!r} was built for student {tf.s_shape} / teacher {tf.t_shape}, "
                f"not student {tuple(s_shape)} / teacher {tuple(t_shape)}"
            )
        return tf
    cls = TRANSFORMS.get(name_or_module)
    if not (isinstance(cls, type) and issubclass(cls, FeatureTransform)):
        raise TypeError(f"expected a FeatureTransform name, class or instance, got {name_or_module!r}")
    if isinstance(name_or_module, str):
        check_transform_options(name_or_module, kwargs)
    return cls(s_shape, t_shape, **kwargs)


# --------------------------------------------------------------------------- Auto-KD operations
# Auto-KD (Li et al. 2023, §2.1, Table 1) decomposes a feature distiller into three parameter-free
# transform levels applied to *both* sides after the channel adapter: global (original / attention /
# mask), intra-spatial (original / multi-scale / local) and inter-spatial (original / sample-wise /
# channel-wise). The ops are plain functions so they can be tested one by one; :class:`AutoKDTransform`
# chains adapter -> global -> intra -> inter.

#: The options of each Auto-KD transform level (Table 1), in the search tree's order.
AUTOKD_GLOBAL = ("original", "attention", "mask")
AUTOKD_INTRA = ("original", "multi_scale", "local")
AUTOKD_INTER = ("original", "sample", "channel")


def autokd_attention(f: Tensor, tau: float = 1.0) -> Tensor:
    """Auto-KD global "attention" (Table 1: ``alpha x f``, alpha from the feature itself; AT-style).

    ``alpha = H W * softmax_{hw}(mean_c |f| / tau)``: a spatial attention map of the feature's own
    channel-mean magnitude, scaled so it averages 1 over the H*W positions; ``f' = alpha * f``.
    The paper gives only ``alpha ~ (f_S, f_T)``: each side is weighted by its own attention.

    Shapes: (N, C, H, W) -> (N, C, H, W).
    """
    n, _, h, w = f.shape
    a = torch.softmax(f.abs().mean(dim=1).flatten(1) / tau, dim=1).view(n, 1, h, w)
    return f * (a * (h * w))


def autokd_mask(s: Tensor, t: Tensor, ratio: float = 0.5, generator: torch.Generator | None = None,
                dims: str = "spatial") -> tuple[Tensor, Tensor]:
    """Auto-KD global "mask" (Table 1: ``M x f_S, M x f_T``, M in {0, 1}; MGD-style random mask).

    One random binary mask M, shared by student and teacher, keeps each spatial position
    (``dims="spatial"``, M of shape (N, 1, H, W)) or each channel (``dims="channel"``, (N, C, 1, 1))
    with probability ``1 - ratio``; a new mask is drawn on every call (``generator`` for tests).

    Shapes: (N, C, H, W) both -> (N, C, H, W) both.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"autokd mask: ratio must be in [0, 1), got {ratio}")
    n, c, h, w = t.shape
    shape = (n, 1, h, w) if dims == "spatial" else (n, c, 1, 1)
    if dims not in ("spatial", "channel"):
        raise ValueError(f"autokd mask: dims must be 'spatial' or 'channel', got {dims!r}")
    m = (torch.rand(shape, generator=generator) >= ratio).to(t.dtype).to(t.device)
    return s * m, t * m


def autokd_multi_scale(f: Tensor, factors: Sequence[int] = (2, 4)) -> Tensor:
    """Auto-KD intra-spatial "multi-scale" (Table 1: ``f^{N,C,H/2,4,W/2,4}``; ReviewKD/LR pooling).

    Average-pools the map to ``(ceil(H/k), ceil(W/k))`` for every factor k (adaptive pooling, so
    odd sizes such as 7x7 work) and concatenates the flattened pyramids along the position axis.

    Shapes: (N, C, H, W) -> (N, C, sum_k ceil(H/k) * ceil(W/k)).
    """
    h, w = f.shape[-2:]
    levels = [F.adaptive_avg_pool2d(f, (-(-h // k), -(-w // k))).flatten(2) for k in factors]
    return torch.cat(levels, dim=2)


def autokd_local(f: Tensor, n: int = 2) -> Tensor:
    """Auto-KD intra-spatial "local" (Table 1: ``f^n`` of shape ``n^2 N, C, H/n, W/n``).

    Splits each map into an n x n grid of local windows and stacks them as samples, so a later
    distance compares windows, not whole maps. Maps whose H or W is not a multiple of n are
    zero-padded at the bottom/right (the same on both sides, so the padding adds no distance).

    Shapes: (N, C, H, W) -> (n^2 N, C, ceil(H/n), ceil(W/n)); window (i, j) of sample b is row
    ``(i * n + j) * N + b``.
    """
    b, c, h, w = f.shape
    ph, pw = (-h) % n, (-w) % n
    if ph or pw:
        f = F.pad(f, (0, pw, 0, ph))
    hh, ww = f.shape[2] // n, f.shape[3] // n
    x = f.view(b, c, n, hh, n, ww).permute(2, 4, 0, 1, 3, 5)  # (n, n, N, C, hh, ww)
    return x.reshape(n * n * b, c, hh, ww)


def autokd_inter(f: Tensor, mode: str) -> Tensor:
    """Auto-KD inter-spatial reshape (Table 1): ``sample`` -> (N, C*L), ``channel`` -> (C, N*L).

    ``original`` returns ``f`` unchanged. ``f`` is (N, C, H, W) or (N, C, L) (after multi-scale);
    L = H*W. A row of the result is what row-wise distances (KL, Gram) treat as one item:
    a sample (SP-style relations) or a channel over the batch (ICKD/CWD-style).
    """
    if mode == "original":
        return f
    if mode == "sample":
        return f.flatten(1)
    if mode == "channel":
        return f.transpose(0, 1).flatten(1)
    raise ValueError(f"autokd inter-spatial mode must be one of {AUTOKD_INTER}, got {mode!r}")


@_register("autokd")
class AutoKDTransform(FeatureTransform):
    """Auto-KD's feature transform T_f (Li et al. 2023, eq. 1, Table 1): adapter, then three levels.

    ``s' , t' = inter(intra(global(adapter(s), t)))``: the student is first aligned to the teacher's
    channels and size by ``adapter`` (§2.1: "a pooling layer to align feature scales and 1x1 conv to
    align filter numbers"; ``conv1x1`` default, ``identity`` when the shapes already match), then
    the parameter-free ops of :func:`autokd_attention` / :func:`autokd_mask` (global),
    :func:`autokd_multi_scale` / :func:`autokd_local` (intra-spatial) and :func:`autokd_inter`
    (inter-spatial) are applied to both sides.

    Shapes: (N, Cs, Hs, Ws), (N, Ct, Ht, Wt) -> two equal shapes: (N, Ct, Ht, Wt) for
    original/original/original, (N, Ct, L) after multi-scale, (n^2 N, Ct, ...) after local,
    (N, -1) after sample-wise, (Ct, -1) after channel-wise.

    Args:
        global_op: ``original`` | ``attention`` | ``mask``.
        intra: ``original`` | ``multi_scale`` | ``local``.
        inter: ``original`` | ``sample`` | ``channel``.
        adapter: registry name of the student adapter (``conv1x1``, ``conv3x3``, ``identity``).
        mask_ratio: share of positions masked by ``mask`` (0.5).
        scales: pooling factors of ``multi_scale`` ((2, 4), Table 1).
        local_n: grid size n of ``local`` (2).
        attention_tau: temperature of ``attention``'s spatial softmax (1).
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], global_op: str = "original",
                 intra: str = "original", inter: str = "original", adapter: str = "conv1x1",
                 mask_ratio: float = 0.5, scales: Sequence[int] = (2, 4), local_n: int = 2,
                 attention_tau: float = 1.0) -> None:
        super().__init__(s_shape, t_shape)
        self._require_ndim((4,), "4-D (N, C, H, W) feature maps on both sides")
        for value, options, what in ((global_op, AUTOKD_GLOBAL, "global_op"), (intra, AUTOKD_INTRA, "intra"),
                                     (inter, AUTOKD_INTER, "inter")):
            if value not in options:
                raise ValueError(f"autokd transform: {what}={value!r}; choose one of {options}")
        if local_n < 1 or not scales or any(int(k) < 1 for k in scales):
            raise ValueError(f"autokd transform: need local_n >= 1 and scales >= 1, got {local_n}, {scales}")
        self.adapter = build_transform(adapter, s_shape, t_shape)
        if adapter == "identity" and tuple(s_shape[1:]) != tuple(t_shape[1:]):
            raise self._mismatch("an adapter (conv1x1) because the shapes differ; "
                                 "adapter='identity' needs equal shapes")
        self.global_op, self.intra, self.inter = global_op, intra, inter
        self.mask_ratio, self.scales, self.local_n = float(mask_ratio), tuple(int(k) for k in scales), int(local_n)
        self.attention_tau = float(attention_tau)

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.adapter(s, t)  # (N, Ct, Ht, Wt) both
        if self.global_op == "attention":
            s, t = autokd_attention(s, self.attention_tau), autokd_attention(t, self.attention_tau)
        elif self.global_op == "mask" and self.training:  # a random mask is a training-time op
            s, t = autokd_mask(s, t, self.mask_ratio)
        if self.intra == "multi_scale":
            s, t = autokd_multi_scale(s, self.scales), autokd_multi_scale(t, self.scales)
        elif self.intra == "local":
            s, t = autokd_local(s, self.local_n), autokd_local(t, self.local_n)
        return autokd_inter(s, self.inter), autokd_inter(t, self.inter)

    def extra_repr(self) -> str:
        return f"global={self.global_op}, intra={self.intra}, inter={self.inter}"
