"""MetaDistiller's top-down label generator (Liu et al. 2020, §3.3, eq. 5).

The generator fuses the stage feature maps F_1 .. F_K of the main model from the deepest one
upwards, like a feature pyramid, and reads a soft target T_k for every early stage off the fused
map::

    F̂_K = conv1x1(F_K)
    F̂_k = conv3x3( Up(F̂_{k+1}) + conv1x1(F_k) )          k = K-1, ..., 1      (eq. 5)
    T_k = exit_head_k(F̂_k)                                (the exit's own head, §3.3)

``Up`` is bilinear interpolation to F_k's spatial size (the paper's "UpSampling x2", which is
exactly x2 when each stage halves the resolution).

``residual=True`` (the default) adds F_k to eq. 5's output and starts the refine convolutions at
zero::

    F̂_k = F_k + conv3x3( Up(F̂_{k+1}) + conv1x1(F_k) ),     conv3x3 = 0 at initialisation

so at the start T_k = exit_head_k(F_k), the exit's own prediction, and the meta-gradient learns
what the top-down path should change. With eq. 5 as written (``residual=False``) F̂_k starts as a
random projection, and T_k are random labels that the exits are distilled towards from the first
step (measured on FMNIST-2k-x: labels agreeing with y on 10-20 % of images). The skip alone does
not keep the targets sound — with the paper's Adam rate 0.1 the generator left it within one meta
epoch; together with Adam 0.001 and the every-output meta objective it does on FMNIST-5k
(benchmarks/RESULTS.md, `auto5k` notes). It is the zero-initialised residual of Goyal et al. 2017 /
ReZero: it changes where the generator starts, not what it can express. The paper discusses supervising F_k with F̂_k
by an L2 distance (and rejects it), so F̂_k has F_k's shape: the lateral 1x1 convolution maps
C_k to C_{k+1} channels, so that it can be added to the up-sampled F̂_{k+1}, and the 3x3
convolution maps C_{k+1} back to C_k, so that F̂_k can go through exit k's own head: §3.3 reads
T_k off F̂_k with "an additional bottleneck module, which is also employed to produce the
intermediate outputs". The generator therefore owns only the lateral and refine convolutions
θ_g, trained only by the meta-gradient (eq. 8), never by the main model's loss; the heads belong
to the exits and are applied to F̂_k as constant functions by
:meth:`~kdtune.selfdistill.selfdistiller.SelfDistiller.soft_target_logits`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TopDownLabelGenerator"]


class TopDownLabelGenerator(nn.Module):
    """Fused maps F̂_1..F̂_{K-1} from the stage features F_1..F_K (eq. 5).

    Args:
        channels: (C_1, ..., C_K), channels of the stage maps, from the input side.
        residual: F̂_k = F_k + eq. 5's map, refine convolutions zero at initialisation (see the module
            docstring); False: eq. 5 as written.

    Shapes:
        forward(features): K maps (N, C_k, H_k, W_k) -> K-1 fused maps (N, C_k, H_k, W_k), one per
        early stage, shallowest first. The caller applies exit k's head to F̂_k to get the target
        logits t_k, and T_k = softmax(t_k / tau) (eq. 2).
    """

    def __init__(self, channels: Sequence[int], residual: bool = True) -> None:
        super().__init__()
        k = len(channels)
        if k < 2:
            raise ValueError(f"the label generator needs K >= 2 stages, got channels {channels}")
        self.channels = [int(c) for c in channels]
        # lateral[k]: conv1x1 on F_k; to C_{k+1} channels (to add it to Up(F̂_{k+1})), C_K for the last.
        out = [*self.channels[1:], self.channels[-1]]
        self.lateral = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip(self.channels, out, strict=True))
        # refine[k]: conv3x3 C_{k+1} -> C_k, so F̂_k has F_k's shape (k < K).
        self.refine = nn.ModuleList(nn.Conv2d(self.channels[i + 1], self.channels[i], 3, padding=1)
                                    for i in range(k - 1))
        self.residual = bool(residual)
        if self.residual:  # F̂_k = F_k at the start: T_k = the exit's own prediction
            for conv in self.refine:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        if any(key.startswith(prefix + "heads.") for key in state_dict):
            raise ValueError(f"this state has label-generator heads ({prefix}heads.*): it was saved before T_k came "
                             f"from the exits' own heads (MetaDistiller §3.3) and cannot be loaded; retrain the run")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """K stage maps, shallowest first -> K-1 fused maps F̂_k (N, C_k, H_k, W_k), shallowest first."""
        if len(features) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} stage features, got {len(features)}")
        fused = self.lateral[-1](features[-1])  # F̂_K = conv1x1(F_K)
        maps: list[Tensor] = []
        for i in reversed(range(len(features) - 1)):
            f = features[i]
            up = F.interpolate(fused, size=f.shape[-2:], mode="bilinear", align_corners=False)
            fused = self.refine[i](up + self.lateral[i](f))  # eq. 5
            if self.residual:
                fused = f + fused
            maps.append(fused)
        return maps[::-1]
