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

The §2.1 *extended* space (opt-in: ``autokd.space: extended``) is Table 1 plus the paper's own
additions ("Extended Search Space", items 1-3): a fourth feature distance and two appended levels,

    feature distance    l2 | kl | gl2 | renyi             (item 1: Rényi divergence, order renyi_alpha)
    ... Table 1's levels 5-8 ...
    logit norm          none | std | l2                   (item 2: logits normalised before softmax(z / tau))
    weight schedule     constant | warmup | early_stop    (item 3: on W_f and W_p, fraction of training)

4/3 * 3 * 3 = 12 times as many leaves: 124,416, or 1,296 feature-only (without the logit levels,
logit norm included). The appended levels sit at the bottom of the tree, so
Table 1's decisions keep their place; the paper gives no formulas or values for them, our choices
are documented where they are implemented (``distances.renyi``, ``losses.normalize_logits``,
``weighting.schedule``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdtune.config import LogitLossConfig, PathwayConfig, RunConfig, WeightingConfig, safe_load_unique
from kdtune.errors import InputFileError, MissingFileError
from kdtune.losses import LOGIT_NORMS
from kdtune.transforms import AUTOKD_GLOBAL, AUTOKD_INTER, AUTOKD_INTRA
from kdtune.weighting.schedule import SCHEDULES


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

#: The §2.1 extended space: Rényi as a fourth feature distance, then two levels appended.
EXTENDED_LEVELS: tuple[Level, ...] = (
    *LEVELS[:3],
    Level("feature_distance", ("l2", "kl", "gl2", "renyi")),
    *LEVELS[4:],
    Level("logit_norm", LOGIT_NORMS),
    Level("weight_schedule", SCHEDULES),
)
#: Search spaces by name (``autokd.space``).
SPACES = ("table1", "extended")

#: Feature distance option -> (registered distance, its kwargs). KL is over softmax-normalised rows
#: (log-probabilities, ``distances.kl``); G-L2 is Table 1's normalised-Gram form.
FEATURE_DISTANCES: dict[str, tuple[str, dict[str, Any]]] = {
    "l2": ("mse", {}),
    "kl": ("kl", {}),
    "gl2": ("gram_l2", {"normalize": True}),
    "renyi": ("renyi", {}),
}
#: Logit distance option -> catalogue logit loss: Hinton KD, or DIST's Pearson relations ([29]).
LOGIT_LOSSES = {"kl": "kd", "pearson": "dist"}
#: The same, as distances between captured logits (per-teacher logit pathways, several teachers).
LOGIT_DISTANCES = {"kl": "logit_kd", "pearson": "logit_dist"}


def levels(logits: bool = True, space: str = "table1") -> tuple[Level, ...]:
    """The tree's levels, root first.

    Args:
        logits: all levels (Auto-KD), or only the feature distiller's (Auto-KD_f: Table 1's first
            five, plus the weight schedule in the extended space).
        space: ``table1`` (Table 1) or ``extended`` (§2.1's extended space).
    """
    if space == "table1":
        return LEVELS if logits else LEVELS[:NUM_FEATURE_LEVELS]
    if space == "extended":
        return EXTENDED_LEVELS if logits else (*EXTENDED_LEVELS[:NUM_FEATURE_LEVELS], EXTENDED_LEVELS[-1])
    raise ValueError(f"unknown Auto-KD search space {space!r}; choose one of {list(SPACES)}")


def num_leaves(logits: bool = True, space: str = "table1") -> int:
    """Number of distinct distillers in the space (Table 1: 10,368 with logits, 324 without)."""
    out = 1
    for level in levels(logits, space):
        out *= len(level.choices)
    return out


#: Levels that belong to the logit distiller (absent from a feature-only spec).
LOGIT_FIELDS = ("logit_distance", "temperature", "logit_weight", "logit_norm")


@dataclass(frozen=True)
class DistillerSpec:
    """One leaf of the space: a complete distiller design (eq. 1).

    ``logit_distance = None`` is a feature-only distiller (Auto-KD_f); ``feature_tau`` is the
    temperature of the feature KL / Rényi (the searched ``temperature`` is the logits').
    The extended-space fields keep Table 1's behaviour at their defaults: ``logit_norm`` (none),
    ``weight_schedule`` (constant); ``renyi_alpha`` is the order of the ``renyi`` feature distance,
    ``warmup_fraction`` / ``stop_fraction`` the share of training the warm-up lasts / after which
    distillation stops (not searched: the paper gives no values).
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
    logit_norm: str = "none"
    weight_schedule: str = "constant"
    renyi_alpha: float = 2.0
    warmup_fraction: float = 0.2
    stop_fraction: float = 0.8

    def __post_init__(self) -> None:
        for level in EXTENDED_LEVELS:  # Table 1's choices and more: any value of either space
            value = getattr(self, level.name)
            if level.name in LOGIT_FIELDS and self.logit_distance is None:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                ok = float(value) > 0
            else:
                ok = value in level.choices
            if not ok:
                raise ValueError(f"distiller spec: {level.name}={value!r}; choose one of {list(level.choices)}")
        for name in ("feature_tau", "renyi_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"distiller spec: {name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_fraction", "stop_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"distiller spec: {name} must be in (0, 1], got {getattr(self, name)}")

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
    def from_path(cls, path: Sequence[int], logits: bool = True, space: str = "table1") -> DistillerSpec:
        """A spec from child indices, one per level (a root-to-leaf path of the tree)."""
        lv = levels(logits, space)
        if len(path) != len(lv):
            raise ValueError(f"a leaf path has {len(lv)} indices (one per level), got {list(path)}")
        return cls.from_choices({level.name: level.choices[i] for level, i in zip(lv, path, strict=True)})

    def choices(self, logits: bool = True, space: str = "table1") -> dict[str, Any]:
        """Level name -> value, for the levels of the space."""
        return {level.name: getattr(self, level.name) for level in levels(logits, space)}

    def path(self, logits: bool = True, space: str = "table1") -> tuple[int, ...]:
        """Child index per level (the spec must use the space's values)."""
        return tuple(level.choices.index(getattr(self, level.name)) for level in levels(logits, space))

    def key(self) -> str:
        """A short unique name, used as the trial directory name."""
        parts = [self.global_op, self.intra, self.inter, self.feature_distance, f"wf{self.feature_weight:g}"]
        if self.logit_distance is not None:
            parts += [self.logit_distance, f"t{self.temperature:g}", f"wp{self.logit_weight:g}"]
            if self.logit_norm != "none":  # extended-space values only (Table 1 keys unchanged)
                parts.append(f"norm_{self.logit_norm}")
        if self.weight_schedule != "constant":
            parts.append(self.weight_schedule)
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
            raise MissingFileError(f"distiller spec not found: {path} (a search writes <run>/best.yaml)")
        try:
            with open(path, encoding="utf-8") as f:
                data = safe_load_unique(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise InputFileError(f"{path}: not a distiller spec YAML file ({type(err).__name__}); "
                                 f"give the best.yaml a search wrote") from None
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
        elif self.feature_distance == "renyi":
            kwargs = {"alpha": self.renyi_alpha, "tau": self.feature_tau}
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
                                kwargs=self.logit_kwargs())]

    def logit_kwargs(self) -> dict[str, Any]:
        """Arguments of the logit loss: the temperature, and a normalisation unless ``none``."""
        if self.logit_norm == "none":
            return {"tau": self.temperature}
        return {"tau": self.temperature, "normalize": self.logit_norm}

    def weighting(self) -> WeightingConfig:
        """``fixed`` (W_f, W_p as they are), or the extended space's warm-up / early stop of both."""
        if self.weight_schedule == "constant":
            return WeightingConfig("fixed")
        fraction = self.warmup_fraction if self.weight_schedule == "warmup" else self.stop_fraction
        return WeightingConfig("schedule", {"schedule": self.weight_schedule, "fraction": fraction})

    def logit_pathways(self, teachers: Sequence[tuple[str, float, int | str | None]],
                       student_logits: str) -> list[PathwayConfig]:
        """Per-teacher logit terms ``W_p * mu_j * D_p(p_S / tau, p_Tj / tau)`` (eq. 1 summed over teachers, eq. 5).

        For a :class:`~kdtune.search.multiteacher.TeacherEnsemble`: teacher j's logits are the output
        of its member module (read through its output selector), so each term is a pathway from the
        student's classifier module.

        Args:
            teachers: (member name, mu_j, where its logits are in its output: its config's ``output``)
                per teacher.
            student_logits: module path of the student whose output is its logits (e.g. ``fc``).
        """
        if self.logit_distance is None:
            return []
        return [PathwayConfig(teacher=name, student=student_logits, transform="identity",
                              distance=LOGIT_DISTANCES[self.logit_distance], weight=self.logit_weight * float(m),
                              name=f"autokd:{name}:logits", distance_kwargs=self.logit_kwargs(),
                              teacher_selector=output)
                for name, m, output in teachers]

    def apply(self, cfg: RunConfig, teacher_layers: Sequence[str], student_layers: Sequence[str],
              mu: Sequence[float] | None = None,
              logit_teachers: Sequence[tuple[str, float, int | str | None]] | None = None,
              student_logits: str | None = None) -> RunConfig:
        """A copy of ``cfg`` whose distillation is this spec: ``L = CE + L_Auto-KD`` (eq. 4).

        The config's own pathways and logit losses are replaced; weighting is ``fixed`` (or the
        spec's weight schedule). With ``logit_teachers`` (several teachers) the logit distiller is
        one pathway per teacher (:meth:`logit_pathways`) instead of a logit loss.
        """
        pathways = self.pathways(teacher_layers, student_layers, mu)
        logit_losses = self.logit_losses()
        if logit_teachers is not None:
            if student_logits is None:
                raise ValueError("per-teacher logit terms need student_logits, the student's logit module path")
            pathways += self.logit_pathways(logit_teachers, student_logits)
            logit_losses = []
        out = dataclasses.replace(cfg)
        out.distill = dataclasses.replace(cfg.distill, pathways=pathways, logit_losses=logit_losses,
                                          weighting=self.weighting())
        return out
