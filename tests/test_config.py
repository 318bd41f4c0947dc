"""Tests for kdtune.config: schema, validation messages, overrides, base files, YAML round trip."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from kdtune.config import (
    ALIASES,
    ConfigError,
    DistillConfig,
    LogitLossConfig,
    ModelConfig,
    PathwayConfig,
    RunConfig,
    apply_overrides,
    from_dict,
    load_config,
    register_alias,
    save_config,
    to_dict,
)

MINIMAL: dict[str, Any] = {"student": {"name": "resnet8"}}


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def build(**sections: Any) -> RunConfig:
    return from_dict(RunConfig, {**MINIMAL, **sections})


def full_config() -> RunConfig:
    """A config with every kind of field set away from its default."""
    return RunConfig(
        name="kd-demo",
        seed=3,
        student=ModelConfig("resnet8", kwargs={"num_classes": 10}),
        teacher=ModelConfig("resnet56", checkpoint="zoo:resnet56_fmnist"),
        distill=DistillConfig(
            task_weight=0.5,
            logit_losses=[LogitLossConfig("kd", 0.9, {"temperature": 4.0})],
            pathways=[
                PathwayConfig("layer2", "stage:1", method="fitnet", weight=2.0, transform_kwargs={"k": 1})
            ],
        ),
    )


# --- round trip ----------------------------------------------------------------------------


def test_defaults_fill_in() -> None:
    cfg = build()
    assert cfg.student == ModelConfig("resnet8")
    assert cfg.teacher is None
    assert cfg.train.epochs == 30 and cfg.train.optimizer.betas == (0.9, 0.999)
    assert cfg.distill.pathways == [] and cfg.distill.weighting.name == "fixed"


def test_round_trip(tmp_path: Path) -> None:
    cfg = full_config()
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    path = tmp_path / "sub" / "run.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["train"]["optimizer"]["betas"] == [0.9, 0.999]
    assert [p.name for p in path.parent.iterdir()] == ["run.yaml"]  # no temporary file left


def test_empty_section_means_defaults() -> None:
    assert build(train=None).train == build().train


def test_to_dict_rejects_non_plain_values() -> None:
    cfg = build()
    cfg.student.kwargs["act"] = object()
    with pytest.raises(ConfigError, match=r"student\.kwargs\.act"):
        to_dict(cfg)


def test_float_accepts_int_and_yaml_scientific_string() -> None:
    cfg = build(train={"optimizer": {"lr": 1, "weight_decay": "1e-4"}})
    assert cfg.train.optimizer.lr == 1.0 and isinstance(cfg.train.optimizer.lr, float)
    assert cfg.train.optimizer.weight_decay == pytest.approx(1e-4)


# --- unknown keys ----------------------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError) as e:
        build(trian={"epochs": 3})
    msg = str(e.value)
    assert "'trian'" in msg and "Did you mean 'train'" in msg
    assert "student" in msg and "distill" in msg  # allowed keys listed


def test_unknown_nested_key_has_path_suggestion_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as e:
        build(train={"optimizer": {"lrr": 0.1}})
    msg = str(e.value)
    assert "train.optimizer.lrr" in msg
    assert "Did you mean 'lr'" in msg
    assert "momentum" in msg and "weight_decay" in msg


def test_unknown_key_inside_list_item() -> None:
    with pytest.raises(ConfigError, match=r"distill\.pathways\.0\.wieght.*Did you mean 'weight'"):
        build(distill={"pathways": [{"teacher": "a", "student": "b", "wieght": 1}]})


# --- types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "path", "expected", "got"),
    [
        ({"train": {"epochs": "ten"}}, "train.epochs", "int", "'ten'"),
        ({"data": {"flip": 3}}, "data.flip", "bool", "3"),
        ({"seed": True}, "seed", "int", "bool True"),
        ({"data": {"train_per_class": 1.5}}, "data.train_per_class", "int | null", "1.5"),
        ({"distill": {"pathways": {"teacher": "a"}}}, "distill.pathways", "list", "dict"),
        ({"student": {"name": "r", "kwargs": [1]}}, "student.kwargs", "dict", "[1]"),
        ({"train": {"schedule": {"milestones": [10, "x"]}}}, "train.schedule.milestones.1", "int", "'x'"),
        ({"train": {"optimizer": {"betas": [0.9]}}}, "train.optimizer.betas", "tuple[float, float]", "[0.9]"),
        ({"teacher": "resnet56"}, "teacher", "ModelConfig", "'resnet56'"),
    ],
)
def test_wrong_type_names_path_expected_and_value(
    sections: dict[str, Any], path: str, expected: str, got: str
) -> None:
    with pytest.raises(ConfigError) as e:
        build(**sections)
    msg = str(e.value)
    assert msg.startswith(f"{path}: expected"), msg
    assert expected in msg and got in msg


def test_literal_error_lists_choices() -> None:
    with pytest.raises(ConfigError) as e:
        build(train={"optimizer": {"name": "adam"}})
    msg = str(e.value)
    assert "train.optimizer.name" in msg and "'sgd'" in msg and "'adamw'" in msg


def test_missing_required_fields() -> None:
    with pytest.raises(ConfigError, match=r"missing required key\(s\): student\.name"):
        from_dict(RunConfig, {"student": {}})
    with pytest.raises(ConfigError, match=r"missing required key\(s\): student$"):
        from_dict(RunConfig, {})
    with pytest.raises(ConfigError, match=r"distill\.pathways\.0\.student"):
        build(distill={"pathways": [{"teacher": "layer1"}]})


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"epochs": 0}}, "train.epochs: must be >= 1"),
        ({"data": {"batch_size": 0}}, "data.batch_size: must be >= 1"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction: must be in [0, 1)"),
        ({"train": {"optimizer": {"lr": 0}}}, "train.optimizer.lr: must be > 0"),
    ],
)
def test_value_checks_name_the_field(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build(**sections)
    assert message in str(e.value)


# Module level: postponed annotations are resolved in the module's globals.
@dataclasses.dataclass
class Inner:
    kind: Literal["a", "b"] = "a"
    extra: Any = None


@dataclasses.dataclass
class Outer:
    inner: Inner | None = None
    items: list[Inner] = dataclasses.field(default_factory=list)
    sizes: tuple[int, ...] = ()


def test_generic_machinery_on_a_new_schema() -> None:
    """Adding a section is only a field: Optional sections, list[dataclass], Literal, Any."""
    out = from_dict(Outer, {"inner": {"kind": "b", "extra": [1]}, "items": [{}], "sizes": [1, 2, 3]})
    assert out == Outer(Inner("b", [1]), [Inner()], (1, 2, 3))
    assert from_dict(Outer, {"inner": None}).inner is None
    with pytest.raises(ConfigError, match=r"items\.0\.kind: expected one of 'a', 'b'"):
        from_dict(Outer, {"items": [{"kind": "c"}]})


# --- overrides -------------------------------------------------------------------------------


def test_overrides_scalar_nested_and_yaml_values() -> None:
    raw = {"student": {"name": "resnet8"}, "train": {"epochs": 10}}
    out = apply_overrides(
        raw,
        [
            "seed=7",
            "train.epochs=12",
            "train.optimizer.lr=0.05",
            "train.optimizer.nesterov=false",
            "teacher={name: resnet56, checkpoint: 'zoo:resnet56'}",
            "data.train_per_class=null",
            "train.schedule.milestones=[5, 8]",
        ],
    )
    assert raw["train"]["epochs"] == 10  # input untouched
    cfg = from_dict(RunConfig, out)
    assert cfg.seed == 7 and cfg.train.epochs == 12 and cfg.train.optimizer.lr == 0.05
    assert cfg.train.optimizer.nesterov is False
    assert cfg.teacher == ModelConfig("resnet56", checkpoint="zoo:resnet56")
    assert cfg.data.train_per_class is None
    assert cfg.train.schedule.milestones == [5, 8]


def test_override_list_index_and_append() -> None:
    raw = {**MINIMAL, "distill": {"pathways": [{"teacher": "a", "student": "b"}]}}
    cfg = from_dict(RunConfig, apply_overrides(raw, ["distill.pathways.0.weight=2"]))
    assert cfg.distill.pathways[0].weight == 2.0
    # Index len(list) appends, and a missing list is created.
    out = apply_overrides(MINIMAL, ["distill.pathways.0.teacher=layer1", "distill.pathways.0.student=layer2"])
    assert from_dict(RunConfig, out).distill.pathways == [PathwayConfig("layer1", "layer2")]
    with pytest.raises(ConfigError, match="out of range"):
        apply_overrides(raw, ["distill.pathways.3.weight=2"])
    with pytest.raises(ConfigError, match="list index"):
        apply_overrides(raw, ["distill.pathways.first.weight=2"])


def test_override_aliases() -> None:
    cfg = from_dict(RunConfig, apply_overrides(MINIMAL, ["epochs=3", "lr=1e-3", "weighting=equal"]))
    assert cfg.train.epochs == 3
    assert cfg.train.optimizer.lr == pytest.approx(1e-3)
    assert cfg.distill.weighting.name == "equal"


def test_search_overrides_reach_the_autokd_section_of_an_autokd_config() -> None:
    autokd = apply_overrides({**MINIMAL, "autokd": {"trials": 40}}, ["search.trials=12", "search.algorithm=random"])
    assert autokd["autokd"] == {"trials": 12, "algorithm": "random"} and "search" not in autokd
    # A weight-search config (or one without either section) keeps search.* as written.
    weights = apply_overrides({**MINIMAL, "search": {"sampler": "grid"}}, ["search.n_trials=3"])
    assert weights["search"] == {"sampler": "grid", "n_trials": 3}
    assert apply_overrides(MINIMAL, ["search.n_trials=3"])["search"] == {"n_trials": 3}


def test_register_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kdtune.config.ALIASES", dict(ALIASES))
    register_alias("temp", "distill.logit_losses.0.kwargs.temperature")
    out = apply_overrides({**MINIMAL, "distill": {"logit_losses": [{}]}}, ["temp=4"])
    assert from_dict(RunConfig, out).distill.logit_losses[0].kwargs == {"temperature": 4}
    with pytest.raises(ValueError):
        register_alias("a.b", "x")


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train..epochs=3", "train.epochs 3"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"malformed override.*dotted\.key=value"):
        apply_overrides(MINIMAL, [bad])


def test_override_of_unknown_key_fails_validation() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(RunConfig, apply_overrides(MINIMAL, ["train.epochz=3"]))
    assert "train.epochz" in str(e.value) and "Did you mean 'epochs'" in str(e.value)


def test_override_through_a_scalar() -> None:
    with pytest.raises(ConfigError, match="'train.epochs' is int"):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])


# --- files -----------------------------------------------------------------------------------


def test_load_config_name_defaults_to_stem_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "kd_resnet8.yaml", {**MINIMAL, "train": {"epochs": 5}})
    cfg = load_config(path, ["epochs=2"])
    assert cfg.name == "kd_resnet8" and cfg.train.epochs == 2
    assert load_config(path, ["name=custom"]).name == "custom"


def test_load_config_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", {**MINIMAL, "train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.epochs: expected int"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_base_is_deep_merged_under_the_file(tmp_path: Path) -> None:
    (tmp_path / "protocols").mkdir()
    write(
        tmp_path / "protocols" / "common.yaml",
        {"seed": 1, "data": {"train_per_class": 500, "batch_size": 64}, "student": {"name": "resnet8"},
         "train": {"epochs": 40, "optimizer": {"lr": 0.05}}},
    )  # fmt: skip
    path = write(
        tmp_path / "kd.yaml",
        {"base": "protocols/common.yaml", "data": {"batch_size": 32}, "train": {"epochs": 20}},
    )
    cfg = load_config(path)
    assert cfg.name == "kd"  # the file's stem, not the base's
    assert cfg.seed == 1 and cfg.student.name == "resnet8"
    assert cfg.data.train_per_class == 500 and cfg.data.batch_size == 32  # merged, file wins
    assert cfg.train.epochs == 20 and cfg.train.optimizer.lr == 0.05


def test_base_chain_and_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {"student": {"name": "resnet8"}, "seed": 1})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "seed": 2})
    write(tmp_path / "c.yaml", {"base": "b.yaml", "output_dir": "out"})
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.seed, cfg.output_dir, cfg.student.name) == (2, "out", "resnet8")
    write(tmp_path / "x.yaml", {"base": "y.yaml"})
    write(tmp_path / "y.yaml", {"base": "x.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")


def test_save_config_is_atomic_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    save_config(build(), path)
    before = path.read_text()
    cfg = build()
    cfg.student.kwargs["bad"] = {1, 2}  # not YAML-safe: fails before anything is written
    with pytest.raises(ConfigError):
        save_config(cfg, path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["cfg.yaml"]


# --- study settings shared by the weight search and Auto-KD ---------------------------------


@pytest.mark.parametrize("section,extra", [("search", {"space": {"at": [1.0, 10.0]}}), ("autokd", {})])
def test_study_settings_are_validated_the_same_in_both_searches(section: str, extra: dict[str, Any],
                                                                tmp_path: Path) -> None:
    for key, bad in (("heartbeat", 0), ("max_retry", -1)):
        with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
            build(**{section: {**extra, key: bad}})
    cfg = build(**{section: extra})
    study = getattr(cfg, section)
    assert study.storage_url(tmp_path) == f"sqlite:///{(tmp_path / 'study.db').resolve()}"
    study.storage = "postgresql://host/kdtune"  # a shared RDB study is used as given
    assert study.storage_url(tmp_path) == "postgresql://host/kdtune"


def test_distpro_transform_kwargs_must_name_candidate_transforms() -> None:
    cfg = build(distpro={"transforms": ["conv1x1", "distpro"], "transform_kwargs": {"distpro": {"pool_first": True}}})
    assert cfg.distpro is not None and cfg.distpro.transform_kwargs == {"distpro": {"pool_first": True}}
    with pytest.raises(ConfigError, match=r"distpro\.transform_kwargs.*conv3x3"):
        build(distpro={"transforms": ["conv1x1"], "transform_kwargs": {"conv3x3": {"pool_first": True}}})
    # A misspelt option fails when the config loads, not when the search builds its adapters.
    with pytest.raises(ConfigError, match=r"distpro\.transform_kwargs.*'pool_frist'.*its options: \['pool_first'\]"):
        build(distpro={"transforms": ["conv3x3"], "transform_kwargs": {"conv3x3": {"pool_frist": True}}})


def test_distpro_undoes_the_lr_decay_by_default() -> None:
    assert build(distpro={}).distpro.undo_lr_decay is True
    assert build(distpro={"undo_lr_decay": False}).distpro.undo_lr_decay is False


def test_distpro_learn_g_needs_the_biased_softmax() -> None:
    assert build(distpro={"learn_g": True}).distpro.learn_g
    with pytest.raises(ConfigError, match=r"distpro\.learn_g.*normalization 'softmax' has none"):
        build(distpro={"learn_g": True, "normalization": "softmax"})


def test_teacher_precision_is_fp32_or_bf16() -> None:
    base = {"student": {"name": "resnet8"}, "teacher": {"name": "resnet56"}}
    assert from_dict(RunConfig, base).teacher.precision == "fp32"
    cfg = from_dict(RunConfig, {**base, "teacher": {"name": "resnet56", "precision": "bf16"}})
    assert cfg.teacher.precision == "bf16"
    with pytest.raises(ConfigError, match=r"teacher\.precision.*fp32"):
        from_dict(RunConfig, {**base, "teacher": {"name": "resnet56", "precision": "fp16"}})


def test_output_selectors_are_a_key_or_an_index() -> None:
    pathway = {"teacher": "blocks.1", "student": "blocks.1"}
    raw = {"student": {"name": "resnet8"}, "teacher": {"name": "resnet56"}, "distill": {"pathways": [pathway]}}
    cfg = from_dict(RunConfig, apply_overrides(raw, ["teacher.output=logits", "student.output=1",
                                                     "distill.pathways.0.selector=0",
                                                     "distill.pathways.0.student_selector=hidden"]))
    assert cfg.teacher is not None and cfg.teacher.output == "logits" and cfg.student.output == 1
    p = cfg.distill.pathways[0]
    assert (p.selector, p.teacher_selector, p.student_selector) == (0, None, "hidden")
    assert from_dict(RunConfig, raw).student.output is None  # default: the output is the logits
    with pytest.raises(ConfigError, match=r"^student\.output: expected int \| str \| null, got float 1\.5$"):
        from_dict(RunConfig, apply_overrides(raw, ["student.output=1.5"]))
    with pytest.raises(ConfigError, match=r"^distill\.pathways\.0\.selector: expected int \| str \| null, got bool"):
        from_dict(RunConfig, apply_overrides(raw, ["distill.pathways.0.selector=true"]))
    with pytest.raises(ConfigError, match=r"unknown key 'outputs' in 'teacher'.*Did you mean 'output'"):
        from_dict(RunConfig, {**raw, "teacher": {"name": "resnet56", "outputs": "logits"}})
