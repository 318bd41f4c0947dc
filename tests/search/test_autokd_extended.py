"""Auto-KD's §2.1 extended space: Rényi distance, normalised logits, weight warm-up / early stop,
the tree, specs, and a tiny extended search whose best leaf and a hand-written leaf train."""

import json
import math

import pytest
import torch
import yaml

from helpers import TinyNet, kdtune_run, tiny_autokd
from kdtune.config import RunConfig, TrainConfig, from_dict
from kdtune.data import BatchLoader, from_arrays
from kdtune.distances import DISTANCES, kl
from kdtune.distiller import Distiller, LogitLoss
from kdtune.losses import dist, kd, normalize_logits
from kdtune.search.space import EXTENDED_LEVELS, LEVELS, DistillerSpec, levels, num_leaves
from kdtune.trainer import Callback, Trainer
from kdtune.weighting import ScheduledWeighting, build_weighting


def renyi_loop(s, t, alpha, tau=1.0):
    """D_alpha(p || q) = 1/(alpha-1) log sum_i p_i^alpha q_i^(1-alpha), written out per row."""
    total = 0.0
    for sn, tn in zip(s.tolist(), t.tolist(), strict=True):
        zs = sum(math.exp(v / tau) for v in sn)
        zt = sum(math.exp(v / tau) for v in tn)
        q = [math.exp(v / tau) / zs for v in sn]
        p = [math.exp(v / tau) / zt for v in tn]
        total += math.log(sum(pi**alpha * qi ** (1 - alpha) for pi, qi in zip(p, q, strict=True))) / (alpha - 1)
    return total / len(s) * tau**2


@pytest.mark.parametrize("alpha,tau", [(2.0, 1.0), (0.5, 2.0), (3.0, 4.0)])
def test_renyi_divergence_matches_a_loop(alpha, tau):
    s, t = torch.randn(3, 2, 2, 2, dtype=torch.float64), torch.randn(3, 2, 2, 2, dtype=torch.float64)
    got = DISTANCES.get("renyi")(s, t, alpha=alpha, tau=tau)
    assert abs(float(got) - renyi_loop(s.flatten(1), t.flatten(1), alpha, tau)) < 1e-10


def test_renyi_is_zero_for_equal_features_and_kl_at_order_one():
    renyi = DISTANCES.get("renyi")
    s, t = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    assert abs(float(renyi(s, s, alpha=2.0))) < 1e-12
    torch.testing.assert_close(renyi(s, t, alpha=1.0, tau=2.0), kl(s, t, tau=2.0))
    assert abs(float(renyi(s, t, alpha=1.0 + 1e-6)) - float(kl(s, t))) < 1e-5  # the limit alpha -> 1
    assert float(renyi(s, t, alpha=0.5)) <= float(kl(s, t)) <= float(renyi(s, t, alpha=2.0))  # monotone in alpha
    with pytest.raises(ValueError, match="alpha"):
        renyi(s, t, alpha=0.0)


def test_normalized_logits():
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 0.0]])
    mean, std = z.mean(1, keepdim=True), ((z - z.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(normalize_logits(z, "std"), (z - mean) / std, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(normalize_logits(z, "l2"), 2.0 * z / z.norm(dim=1, keepdim=True))  # sqrt(K) = 2
    assert torch.equal(normalize_logits(z, "none"), z)
    with pytest.raises(ValueError, match="std"):
        normalize_logits(z, "zscore")
    # The losses apply it to both sides before softmax(z / tau): std-normalised KD ignores the logits' scale
    # and shift, so a teacher of larger magnitude with the same "shape" teaches nothing new.
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    hand = kd(normalize_logits(s, "std"), normalize_logits(t, "std"), tau=2.0)
    torch.testing.assert_close(kd(s, t, tau=2.0, normalize="std"), hand)
    torch.testing.assert_close(kd(3 * s + 1, t, tau=2.0, normalize="std"), hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dist(s, t, normalize="l2"), dist(normalize_logits(s, "l2"), normalize_logits(t, "l2")))
    torch.testing.assert_close(DISTANCES.get("logit_kd")(s, t, tau=2.0, normalize="std"), hand)


def test_schedule_weighting_warmup_and_early_stop():
    warm = ScheduledWeighting(["kd", "f"], {"kd": 1.0, "f": 5.0}, alpha=2.0, schedule="warmup", fraction=0.2,
                              total_steps=100)
    assert [warm.factor(t) for t in (0, 10, 20, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert warm.weights_for(10) == {"kd": 1.0, "f": 5.0}  # 2 * v * 0.5
    stop = ScheduledWeighting(["kd"], {"kd": 1.0}, schedule="early_stop", fraction=0.8, total_steps=100)
    assert stop.factor(79) == 1.0 and stop.factor(80) == 0.0
    assert stop.active(79) is None and list(stop.active(80)) == []  # nothing computed after the stop
    const = build_weighting("schedule", ["kd"], {"kd": 3.0})
    assert const.weights_for(10**6) == {"kd": 3.0}
    with pytest.raises(RuntimeError, match="run length"):
        ScheduledWeighting(["kd"], {"kd": 1.0}, schedule="warmup").factor(0)
    with pytest.raises(ValueError, match="early_stop"):
        ScheduledWeighting(["kd"], {"kd": 1.0}, schedule="cosine")


class Weights(Callback):
    def __init__(self):
        self.rows = []

    def on_batch_end(self, trainer, out):
        self.rows.append((float(out["w/kd"]) if "w/kd" in out else None, "kd" in out))


@pytest.mark.parametrize("schedule", ["warmup", "early_stop"])
def test_trainer_gives_the_schedule_its_length(schedule):
    torch.manual_seed(0)
    d = Distiller(TinyNet(4), TinyNet(8), logit_losses=[LogitLoss("kd", 1.0, {"tau": 4.0})], weighting="schedule",
                  weighting_kwargs={"schedule": schedule, "fraction": 0.5})
    ds = from_arrays(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), torch.arange(40) % 10, num_classes=10)
    rec = Weights()
    Trainer(d, BatchLoader(ds, 8, seed=0), None, TrainConfig(epochs=2, progress=False, channels_last=False),
            callbacks=[rec]).fit()
    assert d.weighting.total_steps == 10  # 2 epochs x 5 batches
    if schedule == "warmup":  # w(t) = min(1, t / 5)
        assert [w for w, _ in rec.rows] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0])
    else:  # distilled for the first half, then CE alone: the KD term is not even computed
        assert rec.rows == [(1.0, True)] * 5 + [(None, False)] * 5


def test_extended_space_appends_levels_and_keeps_table1_default():
    assert levels() == LEVELS and num_leaves() == 10368
    ext = levels(space="extended")
    assert [lv.name for lv in ext] == [lv.name for lv in LEVELS] + ["logit_norm", "weight_schedule"]
    assert ext[3].choices == ("l2", "kl", "gl2", "renyi")
    assert ext[-2].choices == ("none", "std", "l2") and ext[-1].choices == ("constant", "warmup", "early_stop")
    assert num_leaves(space="extended") == 10368 * 4 // 3 * 3 * 3
    feature_only = levels(False, "extended")
    assert [lv.name for lv in feature_only][-2:] == ["feature_weight", "weight_schedule"]
    assert num_leaves(False, "extended") == 324 * 4 // 3 * 3
    with pytest.raises(ValueError, match="table1"):
        levels(space="full")


def test_extended_spec_becomes_a_run_config():
    spec = DistillerSpec.from_path((0, 0, 1, 3, 1, 0, 2, 2, 1, 2), space="extended")
    assert (spec.feature_distance, spec.logit_norm, spec.weight_schedule) == ("renyi", "std", "early_stop")
    assert spec.path(space="extended") == (0, 0, 1, 3, 1, 0, 2, 2, 1, 2)
    assert spec.key() == "original-original-sample-renyi-wf5-kl-t4-wp1-norm_std-early_stop"
    cfg = from_dict(RunConfig, {"student": {"name": "resnet8"}, "teacher": {"name": "resnet8"}})
    out = spec.apply(cfg, ["stage:-1"], ["stage:-1"], mu=[2.0])
    (p,) = out.distill.pathways
    assert p.distance == "renyi" and p.distance_kwargs == {"alpha": 2.0, "tau": 1.0} and p.weight == 10.0
    assert out.distill.logit_losses[0].kwargs == {"tau": 4.0, "normalize": "std"}
    assert out.distill.weighting.name == "schedule"
    assert out.distill.weighting.kwargs == {"schedule": "early_stop", "fraction": 0.8}
    warm = DistillerSpec(weight_schedule="warmup", warmup_fraction=0.1).weighting()
    assert warm.kwargs == {"schedule": "warmup", "fraction": 0.1}
    with pytest.raises(ValueError, match="none"):
        DistillerSpec(logit_norm="zscore")
    with pytest.raises(ValueError, match="stop_fraction"):
        DistillerSpec(stop_fraction=1.5)
    assert EXTENDED_LEVELS[-1].name == "weight_schedule"


TINY = tiny_autokd("akx", epochs=2, trials=2, final=False, space="extended")


def test_kdtune_run_extended_search_and_an_extended_leaf_trains_directly(tmp_path):
    run_dir = kdtune_run(TINY, tmp_path / "runs")
    info = json.loads((run_dir / "autokd.json").read_text())
    assert info["space"] == "extended" and info["complete_trials"] == 2
    for t in info["trials"]:
        assert set(t["choices"]) == {lv.name for lv in EXTENDED_LEVELS}
    # A hand-written extended leaf (every new option at once) trains with `kdtune run ... spec=`.
    leaf = DistillerSpec(feature_distance="renyi", logit_norm="l2", weight_schedule="warmup", warmup_fraction=0.5)
    leaf.save(tmp_path / "leaf.yaml")
    final = {**TINY, "data": {**TINY["data"], "val_fraction": 0.0}, "autokd": {}}
    frun = kdtune_run(final, tmp_path / "final", f"spec={tmp_path / 'leaf.yaml'}")
    saved = yaml.safe_load((frun / "config.yaml").read_text())
    assert saved["distill"]["weighting"] == {"name": "schedule", "kwargs": {"schedule": "warmup", "fraction": 0.5}}
    assert saved["distill"]["pathways"][0]["distance"] == "renyi"
    assert math.isfinite(json.loads((frun / "summary.json").read_text())["test_acc"])
