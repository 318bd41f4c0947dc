"""Auto-KD's tree-structured distiller search space (papers/auto-kd.txt §2.1, eq. 1, Table 1).

A distiller is ``L_KD = W_f * D_f(T_f<f_S, f_T>) + W_p * D_p(p_S / tau, p_T / tau)`` (eq. 1). The
space has one tree level per decision, in SPEC's order:

    global transform    original | attention | mask
    intra-spatial       original | multi_scale | local
    inter-spatial       original | sample (N, CHW) | channel (C, NHW)
    feature distance    l2 | kl | gl2                     (D_f)
    feature weight      1 | 5 | 25 | 50                   (W_f)
    logit distance      kl | pearson                      (D_p)
    temperature         1 | 2 | 4 | 8                     (tau)
    logit weight        0.1 | 0.5 | 1 | 5                 (W_p)

3 * 3 * 3 * 3 * 4 * 2 * 4 * 4 = 10,368 leaves (Auto-KD); the first five levels alone
(324 leaves) are the feature-only Auto-KD_f of Table 3. A leaf is a :class:`DistillerSpec`, saved as
a small YAML file that ``kdtune run <config> spec=<file>`` trains with.

The §2.1 *extended* space (Rényi entropy, normalised logits, weight warm-up / early stop) is not
implemented here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdtune.config import LogitLossConfig, PathwayConfig, RunConfig, WeightingConfig
from kdtune.transforms import AUTOKD_GLOBAL, AUTOKD_INTER, AUTOKD_INTRA


@dataclass(frozen=True)
class Level:
    """One decision of the tree: a spec field and its candidate values (Table 1)."""

    name: str
    choices: tuple[Any, ...]


#: Table 1, in the tree's order. The last three levels are the logit distiller.
LEVELS: tuple[Level, ...] = (
    Level("global_op", AUTOKD_GLOBAL),
    Level("intra", AUTOKD_INTRA),
    Level("inter", AUTOKD_INTER),
    Level("feature_distance", ("l2", "kl", "gl2")),
    Level("feature_weight", (1.0, 5.0, 25.0, 50.0)),
    Level("logit_distance", ("kl", "pearson")),
    Level("temperature", (1.0, 2.0, 4.0, 8.0)),
    Level("logit_weight", (0.1, 0.5, 1.0, 5.0)),
)
NUM_FEATURE_LEVELS = 5

#: Feature distance option -> (registered distance, its kwargs). KL is over softmax-normalised rows
#: (log-probabilities, ``distances.kl``); G-L2 is Table 1's normalised-Gram form.
FEATURE_DISTANCES: dict[str, tuple[str, dict[str, Any]]] = {
    "l2": ("mse", {}),
    "kl": ("kl", {}),
    "gl2": ("gram_l2", {"normalize": True}),
}
#: Logit distance option -> catalogue logit loss: Hinton KD, or DIST's Pearson relations ([29]).
LOGIT_LOSSES = {"kl": "kd", "pearson": "dist"}


def levels(logits: bool = True) -> tuple[Level, ...]:
    """The tree's levels: all eight (Auto-KD), or the five feature levels (Auto-KD_f)."""
    return LEVELS if logits else LEVELS[:NUM_FEATURE_LEVELS]


def num_leaves(logits: bool = True) -> int:
    """Number of distinct distillers in the space (10,368 with logits, 324 without)."""
    out = 1
    for level in levels(logits):
        out *= len(level.choices)
    return out


@dataclass(frozen=True)
class DistillerSpec:
    """One leaf of the space: a complete distiller design (eq. 1).

    ``logit_distance = None`` is a feature-only distiller (Auto-KD_f); ``feature_tau`` is the
    temperature of the feature KL (the searched ``temperature`` is the logits').
    """

    global_op: str = "original"
    intra: str = "original"
    inter: str = "original"
    feature_distance: str = "l2"
    feature_weight: float = 1.0
    logit_distance: str | None = "kl"
    temperature: float = 4.0
    logit_weight: float = 1.0
    feature_tau: float = 1.0

    def __post_init__(self) -> None:
        for level in LEVELS:
            value = getattr(self, level.name)
            if level.name in ("logit_distance", "temperature", "logit_weight") and self.logit_distance is None:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                ok = float(value) > 0
            else:
                ok = value in level.choices
            if not ok:
                raise ValueError(f"distiller spec: {level.name}={value!r}; choose one of {list(level.choices)}")
        if self.feature_tau <= 0:
            raise ValueError(f"distiller spec: feature_tau must be > 0, got {self.feature_tau}")

    # ------------------------------------------------------------------ tree paths

    @classmethod
    def from_choices(cls, choices: Mapping[str, Any]) -> DistillerSpec:
        """A spec from level name -> value (an Optuna trial's params); missing logit levels = none."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(choices) - known)
        if unknown:
            raise ValueError(f"distiller spec: unknown fields {unknown}; fields are {sorted(known)}")
        values = dict(choices)
        if "logit_distance" not in values:
            values["logit_distance"] = None
        return cls(**values)

    @classmethod
    def from_path(cls, path: Sequence[int], logits: bool = True) -> DistillerSpec:
        """A spec from child indices, one per level (a root-to-leaf path of the tree)."""
        lv = levels(logits)
        if len(path) != len(lv):
            raise ValueError(f"a leaf path has {len(lv)} indices (one per level), got {list(path)}")
        return cls.from_choices({level.name: level.choices[i] for level, i in zip(lv, path, strict=True)})

    def choices(self, logits: bool = True) -> dict[str, Any]:
        """Level name -> value, for the levels of the space."""
        return {level.name: getattr(self, level.name) for level in levels(logits)}

    def path(self, logits: bool = True) -> tuple[int, ...]:
        """Child index per level (the spec must use the space's values)."""
        return tuple(level.choices.index(getattr(self, level.name)) for level in levels(logits))

    def key(self) -> str:
        """A short unique name, used as the trial directory name."""
        parts = [self.global_op, self.intra, self.inter, self.feature_distance, f"wf{self.feature_weight:g}"]
        if self.logit_distance is not None:
            parts += [self.logit_distance, f"t{self.temperature:g}", f"wp{self.logit_weight:g}"]
        return "-".join(parts)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the spec as YAML (a leaf a run can train with: ``spec=<path>``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Auto-KD distiller spec (papers/auto-kd.txt eq. 1, Table 1)\n"
                        + yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DistillerSpec:
        """Read a spec YAML (``best.yaml`` of a search, or hand-written)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"distiller spec not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a distiller spec is a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown spec fields {unknown}; fields are {sorted(known)}")
        return cls(**data)

    # ------------------------------------------------------------------ to a run config

    def pathways(self, teacher_layers: Sequence[str], student_layers: Sequence[str],
                 mu: Sequence[float] | None = None, adapter: str = "conv1x1") -> list[PathwayConfig]:
        """One pathway per layer pair: ``W_f * mu_q * D_f(T_f<f_S^q, f_T^q>)`` (eq. 1, eq. 5).

        Args:
            teacher_layers, student_layers: paired module paths (or ``stage:<i>``).
            mu: per-pair factors (eq. 6 train-free weights); None: 1 for every pair.
            adapter: channel/size adapter applied to the student before the transform levels.
        """
        if len(teacher_layers) != len(student_layers):
            raise ValueError(f"teacher_layers {list(teacher_layers)} and student_layers {list(student_layers)} "
                             f"must pair one-to-one")
        mu = [1.0] * len(teacher_layers) if mu is None else list(mu)
        distance, kwargs = FEATURE_DISTANCES[self.feature_distance]
        if self.feature_distance == "kl":
            kwargs = {"tau": self.feature_tau}
        return [PathwayConfig(teacher=t, student=s, transform="autokd", distance=distance,
                              weight=self.feature_weight * float(m), name=f"autokd:{t}->{s}",
                              transform_kwargs={"global_op": self.global_op, "intra": self.intra,
                                                "inter": self.inter, "adapter": adapter},
                              distance_kwargs=dict(kwargs))
                for t, s, m in zip(teacher_layers, student_layers, mu, strict=True)]

    def logit_losses(self) -> list[LogitLossConfig]:
        """``W_p * D_p(p_S / tau, p_T / tau)`` (eq. 1), or nothing for a feature-only spec."""
        if self.logit_distance is None:
            return []
        return [LogitLossConfig(name=LOGIT_LOSSES[self.logit_distance], weight=self.logit_weight,
                                kwargs={"tau": self.temperature})]

    def apply(self, cfg: RunConfig, teacher_layers: Sequence[str], student_layers: Sequence[str],
              mu: Sequence[float] | None = None) -> RunConfig:
        """A copy of ``cfg`` whose distillation is this spec: ``L = CE + L_Auto-KD`` (eq. 4).

        The config's own pathways and logit losses are replaced; weighting is ``fixed``.
        """
        out = dataclasses.replace(cfg)
        out.distill = dataclasses.replace(cfg.distill, pathways=self.pathways(teacher_layers, student_layers, mu),
                                          logit_losses=self.logit_losses(), weighting=WeightingConfig("fixed"))
        return out
