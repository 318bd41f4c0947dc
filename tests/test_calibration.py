"""Calibrated weights: each term's weighted gradient is ``ratio`` times the task gradient (hand-built case)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from helpers import TinyNet, kdtune_run
from kdtune.calibration import calibrate_from_config, calibrated_weights
from kdtune.config import CalibrateConfig, ConfigError, load_config
from kdtune.distiller import Distiller, LogitLoss
from kdtune.losses import kd, l2_logit
from kdtune.pathways import Pathway


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return TinyNet(width=4), TinyNet(width=6)


def _batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _distiller(weighting: str = "fixed", logit_losses=("kd", "l2_logit"), **kwargs) -> Distiller:
    student, teacher = _models()
    return Distiller(student, teacher, logit_losses=list(logit_losses), weighting=weighting,
                     weighting_kwargs=kwargs, input_shape=(1, 8, 8))


def _grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))


def _independent_norms(d: Distiller, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """||d loss / d theta|| of CE, kd and l2_logit, straight from torch.autograd (the student in train mode)."""
    params = [p for p in d.student.parameters() if p.requires_grad]
    d.train()
    state = {k: v.clone() for k, v in d.state_dict().items()}
    with torch.no_grad():
        t = d.teacher(x)
    s = d.student(x)
    out = {"task": _grad_norm(F.cross_entropy(s, y), params),
           "kd": _grad_norm(kd(s, t, tau=4.0), params),
           "l2_logit": _grad_norm(l2_logit(s, t), params)}
    d.load_state_dict(state)
    return out


def test_calibration_reaches_the_ratio_on_a_hand_built_model():
    x, y = _batch()
    d = _distiller()
    expected = _independent_norms(d, x, y)
    record = d.calibrate([(x, y)], ratio=0.3)
    for name in ("task", "kd", "l2_logit"):
        assert record.grad_norms[name] == pytest.approx(expected[name], rel=1e-5)
    params = [p for p in d.student.parameters() if p.requires_grad]
    d.train()
    s, t = d.student(x), d.teacher_forward(x)
    terms = d.distill_terms(s, y, t)
    task = _grad_norm(F.cross_entropy(s, y), params)
    for name, value in terms.items():  # the weighting's own total for this term alone: w_i s_i term_i
        total, logged = d.weighting({name: value})
        assert _grad_norm(total, params) / task == pytest.approx(0.3, rel=1e-4)
        assert logged[name] == pytest.approx(0.3 * expected["task"] / expected[name], rel=1e-5)


def test_ratio_is_reached_on_the_mean_norms_over_several_batches():
    batches = [_batch(seed=s) for s in (1, 2, 3)]
    d = _distiller()
    norms = [_independent_norms(d, x, y) for x, y in batches]
    mean = {k: sum(n[k] for n in norms) / 3 for k in norms[0]}
    record = d.calibrate(batches, ratio=1.0)
    assert record.batches == 3
    assert record.weights["kd"] == pytest.approx(mean["task"] / mean["kd"], rel=1e-5)
    assert record.weights["l2_logit"] == pytest.approx(mean["task"] / mean["l2_logit"], rel=1e-5)


def test_calibrated_weights_by_hand_and_zero_gradient_terms_keep_their_weight():
    assert calibrated_weights({"task": 2.0, "a": 4.0, "b": 0.5, "c": 0.0}, 0.5) == {"a": 0.25, "b": 2.0}
    with pytest.raises(ValueError, match="task gradient"):
        calibrated_weights({"task": 0.0, "a": 1.0}, 1.0)


@pytest.mark.parametrize("strategy", ["fixed", "equal", "adaptive", "mgda", "schedule"])
def test_every_strategy_starts_from_the_calibrated_weights(strategy):
    x, y = _batch()
    d = _distiller(strategy, alpha=2.0, **({"fixed": []} if strategy in ("adaptive", "mgda") else {}))  # kd a path
    record = d.calibrate([(x, y)], ratio=0.5)
    out = d(x, y)
    c = record.weights
    if strategy == "mgda":
        # The scaled gradients have equal norms (both 0.5 ||g_task|| on this batch): the min-norm point
        # of a segment between two equal-norm vectors is its middle, whatever their angle.
        expected = {n: 2.0 * 0.5 * c[n] for n in c}
    else:  # fixed / schedule (constant): alpha c_i; equal: alpha c_i; adaptive: alpha exp(-0) c_i
        expected = {n: 2.0 * c[n] for n in c}
    for name, w in expected.items():
        assert float(out[f"w/{name}"]) == pytest.approx(w, rel=1e-4)


def test_without_calibration_mgda_follows_the_larger_gradient():
    """The control of the test above: uncalibrated, the two norms differ and v* is not 1/2."""
    x, y = _batch()
    out = _distiller("mgda", fixed=[])(x, y)
    assert abs(float(out["w/kd"]) - 0.5) > 0.05


def test_user_weight_multiplies_the_calibrated_one_and_catalogue_weight_is_replaced():
    x, y = _batch()
    student, teacher = _models()
    d = Distiller(student, teacher, logit_losses=[LogitLoss("kd", weight=3.0)],
                  pathways=[Pathway(teacher="blocks.1", student="blocks.1", method="fitnets")],
                  input_shape=(1, 8, 8))
    assert d.weight_sources == {"kd": "user", "fitnets:blocks.1->blocks.1": "catalogue"}
    record = d.calibrate([(x, y)], ratio=1.0)
    out = d(x, y)
    assert float(out["w/kd"]) == pytest.approx(3.0 * record.weights["kd"], rel=1e-5)
    assert float(out["w/fitnets:blocks.1->blocks.1"]) == pytest.approx(record.weights["fitnets:blocks.1->blocks.1"],
                                                                       rel=1e-5)
    lines = d.weight_lines()
    assert lines[0].startswith("term kd: weight") and "calibrated: grad ratio 1 x user weight 3" in lines[0]


def test_weight_lines_name_the_source_without_calibration():
    student, teacher = _models()
    d = Distiller(student, teacher, logit_losses=["kd"],
                  pathways=[Pathway(teacher="blocks.1", student="blocks.1", method="fitnets"),
                            Pathway(teacher="blocks.0", student="blocks.0", transform="conv1x1", weight=7.0)],
                  input_shape=(1, 8, 8))
    assert d.weight_lines() == ["term kd: weight 1 (catalogue)",
                                "term fitnets:blocks.1->blocks.1: weight 100 (catalogue)",
                                "term mse:blocks.0->blocks.0: weight 7 (user)"]


def test_measuring_moves_no_running_statistic_and_draws_no_random_number():
    x, y = _batch()
    d = _distiller()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    torch.manual_seed(5)
    d.calibrate([(x, y)])
    after_rng = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_rng, torch.rand(3))
    for k, v in d.state_dict().items():
        assert torch.equal(v, before[k]), k


class _Loader(list):
    """A list of batches with the BatchLoader's set_epoch; counts the batches read."""

    read = 0

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self):
        for b in list.__iter__(self):
            self.read += 1
            yield b


def test_recorded_weights_are_reused_without_measuring():
    d = _distiller()
    loader = _Loader([_batch()])
    cc = CalibrateConfig(ratio=0.5, batches=1, weights={"kd": 0.25, "l2_logit": 4.0}, grad_norms={"task": 1.0})
    record = calibrate_from_config(d, loader, cc)
    assert loader.read == 0
    assert record.weights == {"kd": 0.25, "l2_logit": 4.0}
    assert d.weighting.scales == {"kd": 0.25, "l2_logit": 4.0}
    fresh = CalibrateConfig(ratio=0.5, batches=1)
    calibrate_from_config(_distiller(), loader, fresh)
    assert loader.read == 1 and set(fresh.weights) == {"kd", "l2_logit"} and "task" in fresh.grad_norms


def test_calibrate_config_switch_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": {"name": "resnet8"}}))
    cfg = load_config(path, ["distill.calibrate.ratio=0.5"])
    assert cfg.distill.calibrate == CalibrateConfig(ratio=0.5)
    assert load_config(path).distill.calibrate is None
    with pytest.raises(ConfigError, match="distill.calibrate.ratio: must be > 0"):
        load_config(path, ["distill.calibrate.ratio=0"])
    with pytest.raises(ConfigError, match="distill.calibrate.batches: must be >= 1"):
        load_config(path, ["distill.calibrate.batches=0"])


def test_a_calibrated_run_records_weights_and_resumes_with_them(tmp_path, one_thread):
    config = {"seed": 0, "name": "cal", "data": {"dataset": "fashion_mnist", "train_per_class": 10,
                                                  "test_limit": 100, "batch_size": 50},
              "student": {"name": "resnet8"}, "teacher": {"name": "resnet8"},
              "distill": {"logit_losses": [{"name": "kd"}],
                          "pathways": [{"teacher": "stage:1", "student": "stage:1", "method": "at"}]},
              "train": {"epochs": 1, "progress": False}}
    run_dir = kdtune_run(config, tmp_path / "runs", "distill.calibrate.ratio=0.5", "distill.calibrate.batches=2")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["distill"]["calibrate"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(saved["weights"]) == {"kd", "at:layer2->layer2"}
    assert summary["calibration"]["weights"] == pytest.approx(saved["weights"])
    assert summary["calibration"]["grad_norms"]["task"] > 0
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["w/kd"] == pytest.approx(saved["weights"]["kd"], rel=1e-5)
    # A resumed run reads the recorded weights: tamper with them and the resumed distiller uses the file's.
    from kdtune.recipe import prepare

    cfg = load_config(run_dir / "config.yaml", ["distill.calibrate.weights.kd=7.0"])
    assert prepare(cfg, None).distiller.weighting.scales["kd"] == 7.0


def test_distpro_pathway_weights_start_from_the_calibrated_ones():
    """DistPro's search weights alpha (eq. 2; biased softmax of alpha~ = 1 with g = 1: 1/3 each of two)
    multiply the calibrated scales, so its hypergradient moves weights around the calibrated point."""
    x, y = _batch()
    d = _distiller("distpro")
    record = d.calibrate([(x, y)], ratio=1.0)
    out = d(x, y)
    for name, c in record.weights.items():
        assert float(out[f"w/{name}"]) == pytest.approx(c / 3, rel=1e-5)


def test_weight_lines_say_which_weights_the_strategy_sets():
    d = _distiller("distpro", learned=["kd"])
    assert d.weight_lines() == ["term kd: weight 1 (catalogue; x the weight DistProWeighting sets)",
                                "term l2_logit: weight 1 (catalogue)"]
    assert _distiller("mgda").weight_lines()[0] == "term kd: weight 1 (catalogue; x the weight MGDAWeighting sets)"
