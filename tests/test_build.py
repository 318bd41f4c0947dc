"""kdtune.build from a run config: models whose outputs are dicts and tuples, read through
``teacher.output`` / ``student.output`` and ``distill.pathways[i].selector`` (real Fashion-MNIST,
a few images, 1 epoch). ``dict_net`` is :class:`helpers.DictNet`, registered by the conftest fixture."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdtune.cli import main
from kdtune.config import ConfigError, RunConfig, from_dict
from kdtune.losses import kd
from kdtune.recipe import prepare


def run_config(tmp_path, student_output="logits", selector=0):
    return {"seed": 0, "output_dir": str(tmp_path / "runs"),
            "data": {"dataset": "fashion_mnist", "train_per_class": 2, "test_limit": 20, "batch_size": 10},
            "student": {"name": "dict_net", "output": student_output},
            "teacher": {"name": "dict_net", "kwargs": {"width": 8}, "output": "logits"},
            "distill": {"logit_losses": [{"name": "kd"}],
                        "pathways": [{"teacher": "stage", "student": "stage", "selector": selector,
                                      "transform": "conv1x1", "distance": "mse", "name": "map"}]},
            "train": {"epochs": 1, "progress": False}}


def test_a_run_of_dict_output_models_trains_on_the_selected_logits_and_feature(tmp_path, dict_net):
    path = tmp_path / "dict.yaml"
    path.write_text(yaml.safe_dump(run_config(tmp_path)))
    assert main(["run", str(path)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["epoch"] == 1 and row["train_kd"] > 0 and row["train_map"] > 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["distill"]["pathways"][0]["selector"] == 0


def test_the_config_selectors_pick_what_an_independent_forward_gives(tmp_path, dict_net):
    distiller = prepare(from_dict(RunConfig, run_config(tmp_path)), None).distiller
    student, teacher = distiller.student, distiller.teacher
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    out = distiller(x, y)
    with torch.no_grad():
        s_logits, t_logits = student(x)["logits"], teacher(x)["logits"]
        s_map, t_map = student.stage(x)[0], teacher.stage(x)[0]
        expected_map = F.mse_loss(*distiller.pathways[0].transform(s_map, t_map))
    torch.testing.assert_close(out["kd"], kd(s_logits, t_logits, y, tau=4.0))
    torch.testing.assert_close(out["map"], expected_map)
    torch.testing.assert_close(out["task"], F.cross_entropy(s_logits, y))


def test_a_wrong_output_key_is_one_line_exit_2_naming_the_outputs_keys(tmp_path, dict_net, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(run_config(tmp_path, student_output="logit")))
    assert main(["run", str(path)]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith("kdtune run: error: student DictNet: key 'logit' not in")
    assert "dict{'pooled': Tensor(2, 8), 'logits': Tensor(2, 10)}" in line and "Did you mean: logits" in line
    assert line.endswith("(in the run config: student.output)")


def test_a_wrong_pathway_index_names_the_modules_output_and_the_config_key(tmp_path, dict_net):
    with pytest.raises(ValueError, match=r"student DictNet, module 'stage': selector index 2 out of range for "
                                         r"output of 'stage' .*tuple\[Tensor\(2, 8, 14, 14\), Tensor\(2, 8\)\].*"
                                         r"\(in the run config: distill.pathways.<i>.selector"):
        prepare(from_dict(RunConfig, run_config(tmp_path, selector=2)), None)


def test_self_distillation_refuses_an_output_selector(dict_net):
    cfg = from_dict(RunConfig, {"data": {"train_per_class": 2, "test_limit": 20},
                                "student": {"name": "dict_net", "output": "logits"}, "selfdistill": {"method": "dsn"}})
    with pytest.raises(ConfigError, match=r"student.output \('logits'\) is not supported"):
        prepare(cfg, None)


@pytest.mark.parametrize("keep", [True, False])
def test_train_keep_freed_memory_sets_the_allocator_only_when_asked(tmp_path, dict_net, monkeypatch, keep):
    import kdtune.build

    calls = []
    monkeypatch.setattr(kdtune.build, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = run_config(tmp_path)
    cfg["train"]["keep_freed_memory"] = keep
    kdtune.build.make_trainer(from_dict(RunConfig, cfg), None)
    assert calls == ([1] if keep else [])


def test_a_run_records_the_transform_and_distance_its_catalogue_method_gave(tmp_path, dict_net):
    """config.yaml names what ran, so a resume rebuilds it even if the catalogue's defaults change later;
    the weight stays unset (a catalogue weight), and what the user set is kept."""
    cfg = run_config(tmp_path)
    cfg["distill"]["pathways"] = [{"teacher": "stage", "student": "stage", "selector": 0, "method": "nst"},
                                  {"teacher": "stage", "student": "stage", "selector": 0, "method": "at",
                                   "transform": "attention_map", "distance": "mse", "name": "mine"}]
    path = tmp_path / "nst.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    nst, mine = yaml.safe_load((run_dir / "config.yaml").read_text())["distill"]["pathways"]
    assert (nst["method"], nst["transform"], nst["distance"], nst["weight"]) == ("nst", "match_spatial", "nst", None)
    assert (mine["transform"], mine["distance"]) == ("attention_map", "mse")
    # the user's own file is left as it was
    assert yaml.safe_load(path.read_text())["distill"]["pathways"][0].get("transform") is None


def test_a_run_started_before_runs_recorded_transforms_resumes_with_the_transform_it_ran(tmp_path, dict_net):
    """An NST run started before 2026-12-06 ran through a 1x1 adapter and its config.yaml says
    ``transform: null``; resumed now, it rebuilds that adapter (its weights are in the checkpoint) rather
    than today's parameter-free default, whose distiller would not fit the checkpoint."""
    cfg = run_config(tmp_path)
    cfg["distill"]["pathways"] = [{"teacher": "stage", "student": "stage", "selector": 0, "method": "nst",
                                   "transform": "conv1x1"}]
    path = tmp_path / "old_nst.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["distill"]["pathways"][0]["transform"] = None  # as a run of before 2026-12-06 recorded it
    saved["train"]["epochs"] = 2  # one more epoch to resume into
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["run", "--resume", str(run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_a_run_saved_before_a_key_existed_resumes_with_the_value_it_ran_with(tmp_path, monkeypatch):
    """config.yaml lacking a key added later with a behaviour-changing default (DistPro's undone lr decay, the
    warmed-up a, the dropped tail) resumes with the old value; a recorded key or an absent section stays as is."""
    import kdtune.recipe
    from kdtune.build import overrides_for_unrecorded_keys

    saved = {"data": {"batch_size": 8}, "distpro": {"g": 1.0}, "selfdistill": {"alpha_warmup": 1.0}}
    assert overrides_for_unrecorded_keys(saved) == ["data.drop_last=false", "distpro.undo_lr_decay=false"]
    cfg = run_config(tmp_path)
    cfg["distpro"] = {"transforms": ["conv1x1"]}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    seen = {}
    monkeypatch.setattr(kdtune.recipe, "run", lambda c, run_dir, resume: seen.setdefault("cfg", c))
    kdtune.recipe.resume_run(tmp_path / "run")
    assert seen["cfg"].distpro.undo_lr_decay is False and seen["cfg"].data.drop_last is False

