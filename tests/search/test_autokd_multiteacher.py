"""Auto-KD with several teachers (eq. 5-6): per-teacher train-free weights against a hand computation,
the teacher ensemble, the run config, and a tiny 2-teacher search + final run (untrained resnet8s);
the same for models whose forward returns a dict (``student.output`` / ``teacher.output``)."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import kdtune_run, tiny_autokd
from kdtune.capture import get_module
from kdtune.cli import main
from kdtune.config import ModelConfig, RunConfig, from_dict, load_config
from kdtune.data import BatchLoader
from kdtune.losses import kd
from kdtune.recipe import build_distiller, build_model, load_splits, seed_everything
from kdtune.search.autokd import make_plan, spec_config
from kdtune.search.multiteacher import TeacherEnsemble, ensemble_config, logits_module, member_names
from kdtune.search.space import DistillerSpec

TINY = tiny_autokd("mt", data={"batch_size": 32}, trials=2, final=True, layer_weights="train_free",
                   teacher_layers=["layer2", "layer3"], student_layers=["layer2", "layer3"],
                   teachers=[{"name": "resnet14"}])  # untrained teachers: enough for the plumbing


def linear_cka(x, y):
    """Kornblith et al. 2019, eq. 5: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred (n, d) matrices."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.t() @ x).norm() ** 2 / ((x.t() @ x).norm() * (y.t() @ y).norm()))


def entropy(f):
    """Mean over samples of the Shannon entropy of softmax(vec f_n)."""
    p = torch.softmax(f.flatten(1).double(), 1)
    return float(-(p * p.log()).sum(1).mean())


def output_of(model, path, x):
    box = []
    handle = get_module(model, path).register_forward_hook(lambda _m, _i, out: box.append(out))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    return box[0]


def test_mu_of_each_teacher_is_entropy_times_cka_computed_by_hand():
    cfg = from_dict(RunConfig, TINY)
    plan = make_plan(cfg)
    # Independently: the seeded student, then the teachers, built in the run's order; the first batch.
    seed_everything(0)
    splits = load_splits(cfg)
    student = build_model(cfg.student, 1, 10)
    teachers = [build_model(ModelConfig("resnet8"), 1, 10), build_model(ModelConfig("resnet14"), 1, 10)]
    x, _ = next(iter(BatchLoader(splits.train, 32, shuffle=True, seed=0)))
    expected = []
    for teacher in teachers:
        for layer in ("layer2", "layer3"):
            fs, ft = output_of(student, layer, x), output_of(teacher, layer, x)
            expected.append(entropy(ft) * linear_cka(fs, ft))
    assert plan.members == ["resnet8", "resnet14"] and plan.member_of == [0, 0, 1, 1]
    assert plan.teacher_layers == ["resnet8.layer2", "resnet8.layer3", "resnet14.layer2", "resnet14.layer3"]
    assert plan.student_layers == ["layer2", "layer3"] * 2 and plan.student_logits == "fc"
    assert plan.mu == pytest.approx(expected, rel=1e-4)
    assert plan.member_mu() == pytest.approx([(expected[0] + expected[1]) / 2, (expected[2] + expected[3]) / 2],
                                             rel=1e-4)
    assert len(set(round(m, 6) for m in plan.mu)) == 4  # two different teachers: four different factors


def test_ensemble_members_and_mean_output():
    assert member_names([ModelConfig("resnet8"), ModelConfig("resnet8"), ModelConfig("wrn_16_1")]) == \
        ["resnet8", "resnet8_2", "wrn_16_1"]
    mc = ensemble_config([ModelConfig("resnet8"), ModelConfig("resnet14")])
    torch.manual_seed(0)
    ens = build_model(mc, 1, 10).eval()
    assert isinstance(ens, TeacherEnsemble) and ens.names == ["resnet8", "resnet14"]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), (ens.resnet8(x) + ens.resnet14(x)) / 2)
    assert logits_module(ens.resnet8, x) == "fc"
    with pytest.raises(ValueError, match="members"):
        build_model(ModelConfig("teacher_ensemble", kwargs={"teachers": []}), 1, 10)


def test_two_teacher_config_weights_every_term_by_its_teachers_mu():
    cfg = from_dict(RunConfig, TINY)
    plan = make_plan(cfg)
    spec = DistillerSpec(feature_weight=5.0, logit_weight=0.5, temperature=2.0)
    out = spec_config(cfg, spec, plan)
    assert out.autokd is None and out.teacher.name == "teacher_ensemble" and out.distill.logit_losses == []
    feats, logits = out.distill.pathways[:4], out.distill.pathways[4:]
    assert [p.teacher for p in feats] == plan.teacher_layers
    assert [p.weight for p in feats] == pytest.approx([5.0 * m for m in plan.mu])
    assert [(p.teacher, p.student, p.distance) for p in logits] == [("resnet8", "fc", "logit_kd"),
                                                                     ("resnet14", "fc", "logit_kd")]
    assert [p.weight for p in logits] == pytest.approx([0.5 * m for m in plan.member_mu()])
    # The distiller built from that plain config: each logit term is KD to its own teacher's logits,
    # and the total is CE + sum of weight x term.
    splits = load_splits(cfg)
    d = build_distiller(out, 1, 10, (1, 28, 28))
    x, y = next(iter(BatchLoader(splits.train, 8, shuffle=True, seed=0)))
    res = d(x, y)
    with torch.no_grad():
        for name in ("resnet8", "resnet14"):
            hand = kd(res["logits"], getattr(d.teacher, name)(x), tau=2.0)
            torch.testing.assert_close(res[f"autokd:{name}:logits"], hand)
    terms = [p.name for p in out.distill.pathways]
    total = F.cross_entropy(res["logits"], y) + sum(float(res[f"w/{n}"]) * res[n] for n in terms)
    torch.testing.assert_close(res["loss"], total)


def test_equal_layer_weights_give_every_teacher_mu_one():
    data = copy.deepcopy(TINY)
    data["autokd"]["layer_weights"] = "equal"
    plan = make_plan(from_dict(RunConfig, data))
    assert plan.mu is None and plan.member_mu() == [1.0, 1.0]


def test_kdtune_run_two_teacher_search_then_final_run_trains(tmp_path):
    run_dir = kdtune_run(TINY, tmp_path / "runs")
    info = json.loads((run_dir / "autokd.json").read_text())
    assert info["complete_trials"] == 2 and info["teachers"] == ["resnet8", "resnet14"] and len(info["mu"]) == 4
    assert all(math.isfinite(t["reward"]) for t in info["trials"])
    # The final run's plain config holds the ensemble, trains, and reloads as a config.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert math.isfinite(summary["test_acc"])
    final = load_config(run_dir / "best_config.yaml")
    assert final.teacher.name == "teacher_ensemble" and set(final.teacher.kwargs["members"]) == {"resnet8", "resnet14"}


# --------------------------------------------------------------------------- models with a dict output


def own_models(tmp_path, model="dict_net", output="logits", teachers=2, teacher_output=None, **autokd):
    """TINY on the user's models: a TinyNet student (width 4) and teachers of widths 8 (and 6), all
    ``dict_net`` (a dict output, read through ``output``) or ``tiny_net`` (their tensor twins)."""
    out = None if model == "tiny_net" else output
    t_out = out if teacher_output is None else teacher_output
    extra = [{"name": model, "kwargs": {"width": 6}, "output": t_out}][:teachers - 1]
    return tiny_autokd("own", data={"batch_size": 16}, trials=1, final=True, layer_weights="train_free",
                       teacher_layers=["stage:0", "stage:-1"], student_layers=["stage:0", "stage:-1"],
                       teachers=extra, **autokd) | {
        "output_dir": str(tmp_path / "runs"), "student": {"name": model, "output": out},
        "teacher": {"name": model, "kwargs": {"width": 8}, "output": out},
        "train": {"epochs": 1, "progress": False, "optimizer": {"lr": 0.01}}}


def test_dict_output_models_give_the_train_free_weights_and_terms_of_their_tensor_twins(tmp_path, dict_net):
    """mu (eq. 6) of dict-output models equals that of the same models returning their logits; the
    per-teacher logit terms and the ensemble read each member's logits through its ``output``."""
    cfg, twin = (from_dict(RunConfig, own_models(tmp_path, model)) for model in ("dict_net", "tiny_net"))
    plan, twin_plan = make_plan(cfg), make_plan(twin)
    assert plan.mu == pytest.approx(twin_plan.mu, rel=1e-6) and len(set(round(m, 6) for m in plan.mu)) == 4
    assert (plan.student_logits, twin_plan.student_logits) == ("net.head", "head")
    assert plan.members == ["dict_net", "dict_net_2"] and plan.member_outputs == ["logits", "logits"]
    out = spec_config(cfg, DistillerSpec(logit_weight=0.5, temperature=2.0), plan)
    assert [p.teacher_selector for p in out.distill.pathways[4:]] == ["logits", "logits"]
    d = build_distiller(out, 1, 10, (1, 28, 28))
    x, y = next(iter(BatchLoader(load_splits(cfg).train, 8, shuffle=True, seed=0)))
    res = d(x, y)
    with torch.no_grad():
        members = [getattr(d.teacher, name)(x)["logits"] for name in plan.members]
        torch.testing.assert_close(d.teacher(x), (members[0] + members[1]) / 2)
        for name, t_logits in zip(plan.members, members, strict=True):
            torch.testing.assert_close(res[f"autokd:{name}:logits"], kd(res["logits"], t_logits, tau=2.0))


@pytest.mark.parametrize("teachers", [1, 2])
def test_kdtune_run_search_then_final_run_of_dict_output_models(tmp_path, dict_net, teachers):
    """One teacher or two: the search's rewards read the logits through ``output``, and the final
    run (a plain config: ``student.output``, an ensemble of dict-output members) trains."""
    run_dir = kdtune_run(own_models(tmp_path, teachers=teachers), tmp_path / "runs")
    info = json.loads((run_dir / "autokd.json").read_text())
    assert info["complete_trials"] == 1 and len(info["mu"]) == 2 * teachers
    for t in info["trials"]:  # scored on the selected logits
        metrics = json.loads((tmp_path / t["run_dir"] / "summary.json").read_text())["reward_metrics"]
        assert math.isfinite(t["reward"]) and all(math.isfinite(metrics[k]) for k in ("ce", "acc", "cka", "l1"))
    assert math.isfinite(json.loads((run_dir / "summary.json").read_text())["test_acc"])


@pytest.mark.parametrize("wrong", ["student", "autokd.teachers.0"])
def test_a_wrong_output_key_is_one_line_naming_the_outputs_keys_and_the_config_key(tmp_path, dict_net, capsys,
                                                                                    wrong):
    data = own_models(tmp_path, **({"output": "logit", "teacher_output": "logits"} if wrong == "student"
                                   else {"teacher_output": "logit"}))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith(f"kdtune run: error: {wrong} DictNet: key 'logit' not in module output dict{{'pooled': ")
    assert "'logits': Tensor(" in line and "Did you mean: logits" in line
    assert line.endswith(f"Fix: {wrong}.output=<key or index of the logits>")
