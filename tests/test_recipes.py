"""kdtune.recipes: a config runs the one recipe its sections ask for (plain distillation when none);
asking for two, or for none with no default, is a one-line error naming the sections."""

import subprocess
import sys

import pytest
import yaml

from kdtune.build import plain_distiller
from kdtune.cli import main
from kdtune.config import ConfigError, RunConfig, from_dict
from kdtune.recipe import prepare, run
from kdtune.recipes import base
from kdtune.recipes.base import Recipe, register_recipe, select_recipe

TEACHER = {"teacher": {"name": "resnet8"}}
AUTOKD = {"teacher_layers": ["layer2"], "student_layers": ["layer2"]}
TINY = {"seed": 0, "data": {"dataset": "fashion_mnist", "train_per_class": 2, "test_limit": 20, "batch_size": 10},
        "student": {"name": "resnet8"}, "train": {"epochs": 1, "progress": False}}


def config(**sections):
    return from_dict(RunConfig, {"student": {"name": "resnet8"}, **sections})


@pytest.mark.parametrize("sections,recipe", [
    ({}, "distill"),
    ({**TEACHER, "distill": {"logit_losses": [{"name": "kd"}], "weighting": {"name": "equal"}}}, "distill"),
    ({"selfdistill": {"method": "dsn"}}, "selfdistill"),
    ({**TEACHER, "distpro": {}}, "distpro"),
    ({**TEACHER, "distill": {"weighting": {"name": "process"}}}, "distpro"),
    ({**TEACHER, "search": {"space": {"kd": [0.1, 1.0]}}}, "weight_search"),
    ({**TEACHER, "autokd": AUTOKD}, "autokd"),
    ({**TEACHER, "autokd": {**AUTOKD, "spec": "best.yaml"}}, "autokd"),
])
def test_each_method_section_selects_its_recipe(sections, recipe):
    assert select_recipe(config(**sections)).name == recipe


def test_a_config_asking_for_two_methods_names_their_sections():
    cfg = config(**TEACHER, search={"space": {"kd": [0.1, 1.0]}}, distpro={})
    with pytest.raises(ConfigError) as err:
        select_recipe(cfg)
    assert str(err.value) == ("the config asks for 2 methods at once (distpro by distpro; weight_search by search); "
                              "a run carries out one: remove all but one of distpro, search")
    cfg = config(**TEACHER, distpro={}, distill={"weighting": {"name": "process"}})  # one recipe, by two sections
    assert select_recipe(cfg).name == "distpro"


def test_kdtune_run_of_two_methods_is_one_line_exit_2_before_any_run_directory(tmp_path, capsys):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({**TINY, **TEACHER, "output_dir": str(tmp_path / "runs"),
                                    "selfdistill": {"method": "dsn"}, "autokd": AUTOKD}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["kdtune run: error: the config asks for 2 methods at once (autokd by autokd; "
                                "selfdistill by selfdistill); a run carries out one: remove all but one of "
                                "autokd, selfdistill"]
    assert not (tmp_path / "runs").exists()


def test_without_a_default_recipe_a_config_asking_for_none_names_the_sections(monkeypatch):
    monkeypatch.setattr(base, "RECIPES", {k: r for k, r in base.RECIPES.items() if r.sections})
    with pytest.raises(ConfigError, match=r"^the config asks for no method and no default recipe is registered: set "
                                          r"one of autokd, distpro, distill.weighting.name=process, selfdistill, "
                                          r"search$"):
        select_recipe(config())


def test_prepare_builds_one_training_run_not_a_search():
    with pytest.raises(ConfigError, match=r"asks for weight_search \(search\), which drives its own runs"):
        prepare(config(**TEACHER, search={"space": {"kd": [0.1, 1.0]}}), None)


def test_a_registered_recipe_runs_the_configs_that_ask_for_it(monkeypatch, tmp_path):
    monkeypatch.setattr(base, "RECIPES", dict(base.RECIPES))
    built = []

    def counted(cfg, splits, input_shape):
        built.append((cfg.distill.weighting.name, len(splits.train), input_shape))
        return plain_distiller(cfg, splits, input_shape)

    register_recipe(Recipe("mine", ("distill.weighting.name=mgda",), build=counted))
    cfg = from_dict(RunConfig, {**TINY, **TEACHER, "distill": {"logit_losses": [{"name": "kd"}],
                                                               "weighting": {"name": "mgda"}}})
    run_dir, summary = run(cfg, tmp_path / "run")
    assert built == [("mgda", 20, (1, 28, 28))] and summary["epochs"] == 1
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "last.pt").exists()
    cfg.distill.weighting.name = "equal"
    assert select_recipe(cfg).name == "distill"


def test_register_recipe_rejects_clashes(monkeypatch):
    monkeypatch.setattr(base, "RECIPES", dict(base.RECIPES))
    with pytest.raises(ValueError, match="exactly one of build="):
        Recipe("both", ("search",), build=plain_distiller, search=lambda *a: a)
    with pytest.raises(ValueError, match="exactly one of build="):
        Recipe("neither", ("search",))
    with pytest.raises(ValueError, match="'distpro' is already registered"):
        register_recipe(Recipe("distpro", ("distpro",), build=plain_distiller))
    with pytest.raises(ValueError, match="a default recipe is already registered"):
        register_recipe(Recipe("another_default", build=plain_distiller))


def test_a_recipe_may_ask_for_a_setting_inside_an_optional_section(monkeypatch):
    monkeypatch.setattr(base, "RECIPES", {k: r for k, r in base.RECIPES.items() if k != "autokd"})
    register_recipe(Recipe("spec_only", ("autokd.spec",), build=plain_distiller))
    assert select_recipe(config()).name == "distill"  # no autokd section: its spec is not set either
    assert select_recipe(config(**TEACHER, autokd=AUTOKD)).name == "distill"
    assert select_recipe(config(**TEACHER, autokd={**AUTOKD, "spec": "best.yaml"})).name == "spec_only"


def test_the_searches_libraries_are_imported_only_by_a_search():
    """optuna and sqlalchemy (~0.4 s) load when a weight search or Auto-KD runs, not for every run."""
    code = "import sys, kdtune.recipe; print(sorted({'optuna', 'sqlalchemy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
