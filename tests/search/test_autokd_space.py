"""Auto-KD transforms (Table 1) against independent loop computations, the space, and specs."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import TinyNet
from kdtune.config import RunConfig, from_dict
from kdtune.distances import DISTANCES, gram_l2
from kdtune.distiller import Distiller, LogitLoss
from kdtune.pathways import Pathway
from kdtune.search.space import LEVELS, DistillerSpec, levels, num_leaves
from kdtune.transforms import (
    AutoKDTransform,
    autokd_attention,
    autokd_inter,
    autokd_local,
    autokd_mask,
    autokd_multi_scale,
    build_transform,
)


def test_attention_is_the_softmax_of_the_channel_mean_magnitude_times_hw():
    f = torch.randn(2, 3, 4, 5)
    out = autokd_attention(f)
    for n in range(2):
        m = torch.tensor([[f[n, :, i, j].abs().mean() for j in range(5)] for i in range(4)])
        a = torch.exp(m) / torch.exp(m).sum() * 20
        for c in range(3):
            torch.testing.assert_close(out[n, c], f[n, c] * a)


def test_mask_is_shared_by_both_sides_and_keeps_about_half():
    s, t = torch.ones(64, 2, 8, 8), 2 * torch.ones(64, 2, 8, 8)
    ms, mt = autokd_mask(s, t, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(ms * 2, mt)  # the same positions on both sides
    assert torch.equal(ms[:, 0], ms[:, 1])  # spatial mask: one per position, all channels
    assert 0.45 < ms.mean() < 0.55
    mc, _ = autokd_mask(s, t, 0.5, torch.Generator().manual_seed(0), dims="channel")
    assert torch.equal(mc.amin((2, 3)), mc.amax((2, 3)))  # channel mask: constant over positions


def test_multi_scale_concatenates_average_pooled_pyramids():
    f = torch.randn(2, 3, 8, 8)
    out = autokd_multi_scale(f, (2, 4))
    p2 = torch.stack([torch.stack([f[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((2, 3)) for j in range(4)], -1)
                      for i in range(4)], -2)
    p4 = torch.stack([torch.stack([f[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean((2, 3)) for j in range(2)], -1)
                      for i in range(2)], -2)
    torch.testing.assert_close(out, torch.cat([p2.flatten(2), p4.flatten(2)], 2))
    assert autokd_multi_scale(torch.randn(2, 3, 7, 7)).shape == (2, 3, 16 + 4)  # odd sizes: ceil


def test_local_splits_windows_into_samples():
    f = torch.randn(3, 2, 6, 6)
    out = autokd_local(f, 2)
    assert out.shape == (12, 2, 3, 3)
    for i, j, b in itertools.product(range(2), range(2), range(3)):
        torch.testing.assert_close(out[(i * 2 + j) * 3 + b], f[b, :, 3 * i:3 * i + 3, 3 * j:3 * j + 3])
    odd = autokd_local(torch.ones(1, 1, 5, 5), 2)  # zero-padded to 6x6
    assert odd.shape == (4, 1, 3, 3) and odd.sum() == 25


def test_inter_spatial_reshapes():
    f = torch.randn(2, 3, 4, 4)
    assert torch.equal(autokd_inter(f, "original"), f)
    torch.testing.assert_close(autokd_inter(f, "sample")[1], f[1].flatten())
    torch.testing.assert_close(autokd_inter(f, "channel")[2], f[:, 2].flatten())
    with pytest.raises(ValueError, match="original"):
        autokd_inter(f, "rows")


def test_gram_l2_normalized_matches_table1_form():
    s, t = torch.randn(5, 12), torch.randn(5, 12)
    gs, gt = s @ s.t(), t @ t.t()
    expected = ((gs / gs.norm() - gt / gt.norm()) ** 2).sum()
    torch.testing.assert_close(gram_l2(s, t, normalize=True), expected)
    torch.testing.assert_close(gram_l2(s, 3 * s, normalize=True), torch.tensor(0.0))  # scale-free


@pytest.mark.parametrize("g,intra,inter", list(itertools.product(*(lv.choices for lv in LEVELS[:3]))))
def test_composite_transform_aligns_both_sides_after_the_adapter(g, intra, inter):
    tf = build_transform("autokd", (4, 3, 8, 8), (4, 6, 4, 4), global_op=g, intra=intra, inter=inter)
    s, t = tf(torch.randn(4, 3, 8, 8), torch.randn(4, 6, 4, 4))
    assert s.shape == t.shape
    # The teacher side is exactly the parameter-free ops applied to the teacher.
    if g != "mask":
        t0 = torch.randn(4, 6, 4, 4)
        tf.eval()
        _, t1 = tf(torch.randn(4, 3, 8, 8), t0)
        ref = autokd_attention(t0) if g == "attention" else t0
        ref = {"original": lambda x: x, "multi_scale": autokd_multi_scale, "local": autokd_local}[intra](ref)
        torch.testing.assert_close(t1, autokd_inter(ref, inter))


def test_composite_transform_rejects_bad_options():
    with pytest.raises(ValueError, match="global_op"):
        AutoKDTransform((2, 3, 4, 4), (2, 3, 4, 4), global_op="sparse")
    with pytest.raises(ValueError, match="identity"):
        AutoKDTransform((2, 3, 4, 4), (2, 6, 4, 4), adapter="identity")


def test_space_has_table1_levels_in_spec_order():
    assert [lv.name for lv in LEVELS] == ["global_op", "intra", "inter", "feature_distance", "feature_weight",
                                          "logit_distance", "temperature", "logit_weight"]
    assert num_leaves() == 10368 and num_leaves(logits=False) == 324
    assert len(levels(False)) == 5


def test_spec_round_trips_and_builds_a_distiller(tmp_path):
    spec = DistillerSpec.from_path((1, 1, 2, 1, 2, 1, 3, 0))
    assert spec.path() == (1, 1, 2, 1, 2, 1, 3, 0)
    assert spec.key() == "attention-multi_scale-channel-kl-wf25-pearson-t8-wp0.1"
    path = spec.save(tmp_path / "best.yaml")
    assert DistillerSpec.load(path) == spec
    feature_only = DistillerSpec.from_choices({lv.name: lv.choices[0] for lv in levels(False)})
    assert feature_only.logit_distance is None and feature_only.logit_losses() == []
    with pytest.raises(ValueError, match="choose one of"):
        DistillerSpec(global_op="nope")

    cfg = from_dict(RunConfig, {"student": {"name": "resnet8"}, "teacher": {"name": "resnet8"}})
    out = spec.apply(cfg, ["stage:-1", "stage:1"], ["stage:-1", "stage:1"], mu=[2.0, 0.5])
    assert [p.weight for p in out.distill.pathways] == [50.0, 12.5]
    assert out.distill.logit_losses[0].name == "dist" and out.distill.logit_losses[0].kwargs == {"tau": 8.0}
    assert cfg.distill.pathways == []  # a copy


@pytest.mark.parametrize("dist", ["l2", "kl", "gl2"])
@pytest.mark.parametrize("inter", ["original", "sample", "channel"])
@pytest.mark.parametrize("intra", ["original", "multi_scale", "local"])
def test_every_transform_and_distance_trains(dist, inter, intra):
    torch.manual_seed(0)
    spec = DistillerSpec(global_op="attention", intra=intra, inter=inter, feature_distance=dist)
    p = spec.pathways(["blocks.1"], ["blocks.1"])[0]
    d = Distiller(TinyNet(4), TinyNet(8), [Pathway(teacher=p.teacher, student=p.student, transform=p.transform,
                                                   distance=p.distance, weight=p.weight, name=p.name,
                                                   transform_kwargs=p.transform_kwargs,
                                                   distance_kwargs=p.distance_kwargs)],
                  [LogitLoss("kd", 1.0, {"tau": 4.0})], input_shape=(1, 8, 8))
    out = d(torch.randn(6, 1, 8, 8), torch.arange(6))
    assert torch.isfinite(out["loss"]) and out["autokd:blocks.1->blocks.1"] >= 0
    out["loss"].backward()
    assert d.student.blocks[0][0].weight.grad is not None
    assert DISTANCES.get("kl")(torch.zeros(2, 3), torch.zeros(2, 3)) == 0


def test_kl_feature_distance_is_on_log_probabilities():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    expected = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()
    torch.testing.assert_close(DISTANCES.get("kl")(s, t), expected)
