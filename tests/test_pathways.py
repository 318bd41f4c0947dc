import pytest
import torch

from kdtune.distiller import Distiller
from kdtune.losses import LOSSES
from kdtune.models import create_model
from kdtune.pathways import Pathway, connect_stages, resolve_stage
from kdtune.transforms import ShapeMismatchError


def test_method_fills_transform_distance_weight_and_name():
    p = Pathway(teacher="layer2", student="blocks.1", method="fitnets").resolved()
    spec = LOSSES.get("fitnets")
    assert (p.transform, p.distance, p.weight) == ("conv1x1", "mse", spec.weight)
    assert p.name == "fitnets:layer2->blocks.1"


def test_explicit_fields_override_method():
    p = Pathway(teacher="a", student="b", method="fitnets", distance="l1", weight=3.0, name="mine").resolved()
    assert (p.transform, p.distance, p.weight, p.name) == ("conv1x1", "l1", 3.0, "mine")


def test_defaults_without_method():
    p = Pathway(teacher="a", student="b").resolved()
    assert (p.transform, p.distance, p.weight, p.name) == ("identity", "mse", 1.0, "mse:a->b")


def test_logit_method_as_pathway_is_an_error():
    with pytest.raises(ValueError, match="logit loss"):
        Pathway(teacher="a", student="b", method="kd").resolved()


def test_built_loss_equals_distance_of_transform():
    torch.manual_seed(0)
    loss = Pathway(teacher="t", student="s", transform="conv1x1", distance="mse").build((2, 4, 8, 8), (2, 6, 4, 4))
    s, t = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)
    s2, t2 = loss.transform(s, t)
    assert s2.shape == t.shape
    assert torch.allclose(loss(s, t), ((s2 - t2) ** 2).mean())


def test_shape_mismatch_names_pathway_and_both_shapes():
    with pytest.raises(ShapeMismatchError) as err:
        Pathway(teacher="layer3", student="layer1", distance="mse").build((2, 16, 28, 28), (2, 64, 7, 7))
    msg = str(err.value)
    assert "mse:layer3->layer1" in msg and "(2, 16, 28, 28)" in msg and "(2, 64, 7, 7)" in msg
    assert "conv1x1" in msg  # suggests an adapter


def test_check_shapes_leaves_bn_statistics_alone():
    loss = Pathway(teacher="t", student="s", transform="conv1x1").build((2, 4, 8, 8), (2, 6, 8, 8))
    bn = [m for m in loss.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert torch.equal(bn.running_mean, torch.zeros(6)) and int(bn.num_batches_tracked) == 0


def test_resolve_stage():
    stages = ["layer1", "layer2", "layer3"]
    assert resolve_stage("stage:1", stages, "student") == "layer2"
    assert resolve_stage("stage:-1", stages, "student") == "layer3"
    assert resolve_stage("fc", stages, "student") == "fc"
    with pytest.raises(ValueError, match="stage:0 .. stage:2"):
        resolve_stage("stage:3", stages, "teacher")


def test_connect_stages_patterns():
    assert connect_stages(3, 3, "same") == [(0, 0), (1, 1), (2, 2)]
    assert connect_stages(4, 3, "same") == [(1, 0), (2, 1), (3, 2)]
    assert len(connect_stages(3, 3, "all")) == 9
    assert connect_stages(3, 3, "j>=i") == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match="j>=i"):
        connect_stages(3, 3, "some")


def test_token_and_vector_features_in_pathways_give_the_hand_computed_losses():
    """(N, L, D) tokens: ViT student block -> CNN teacher stage through tokens_to_map; (N, D)
    vectors: the student's final class token -> the teacher's pooled features through a linear map."""
    import torch.nn.functional as F

    from kdtune.distiller import Distiller
    from kdtune.models import create_model

    torch.manual_seed(0)
    teacher, student = create_model("resnet8", 1, 10), create_model("vit_tiny", 1, 10)
    d = Distiller(student, teacher, input_shape=(1, 28, 28), pathways=[
        Pathway(teacher="stage:-1", student="stage:-1", transform="tokens_to_map", distance="mse", name="tokens"),
        Pathway(teacher="pool", student="norm", transform="linear", distance="mse", name="vector",
                student_selector=lambda tokens: tokens[:, 0], teacher_selector=lambda f: f.flatten(1)),
    ])
    assert [tuple(p.transform.s_shape) for p in d.pathways] == [(2, 50, 64), (2, 64)]
    x, y = torch.randn(3, 1, 28, 28), torch.arange(3)
    out = d(x, y)
    teacher.eval()
    with torch.no_grad():
        t_map = teacher.layer3(teacher.layer2(teacher.layer1(teacher.relu(teacher.bn1(teacher.conv1(x))))))
    tokens = student.blocks(student.tokens(x))
    s_map = d.pathways[0].transform(tokens, t_map)[0]
    assert torch.allclose(out["tokens"], F.mse_loss(s_map, t_map), atol=1e-6)
    cls = student.norm(tokens)[:, 0]
    expected = F.mse_loss(d.pathways[1].transform.proj(cls), t_map.mean((2, 3)))
    assert torch.allclose(out["vector"], expected, atol=1e-6)


@pytest.mark.parametrize("pool_first", [False, True])
def test_fused_input_convs_equal_separate_pathways(pool_first):
    from kdtune.search.distpro import search_space

    torch.manual_seed(0)
    student, teacher = create_model("resnet8", 1, 10), create_model("resnet14", 1, 10)
    kwargs = {"conv3x3": {"pool_first": True}, "distpro": {"pool_first": True}} if pool_first else {}
    pathways, _ = search_space(teacher, student, (1, 28, 28), "all", ("conv1x1", "conv3x3", "distpro"), "hcl",
                               transform_kwargs=kwargs)
    d = Distiller(student, teacher, pathways, weighting="equal", input_shape=(1, 28, 28))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    teacher_out = d.teacher_forward(x)
    results = []
    for fuse in (True, False):
        d.fuse_input_convs = fuse
        torch.manual_seed(1)
        terms = d.distill_terms(d.student(x), y, teacher_out)
        sum(terms.values()).backward()
        grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
        d.zero_grad()
        results.append((terms, grads))
    (fused, fused_grads), (separate, separate_grads) = results
    assert len(fused) == 27 and fused.keys() == separate.keys()
    for k in separate:
        torch.testing.assert_close(fused[k], separate[k], rtol=1e-5, atol=1e-6, msg=k)
    assert fused_grads.keys() == separate_grads.keys()
    for k in separate_grads:
        torch.testing.assert_close(fused_grads[k], separate_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_fused_input_convs_group_per_feature_and_kind():
    from kdtune.pathways import fused_input_convs

    torch.manual_seed(0)
    s, t8, t16 = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8), torch.randn(2, 3, 16, 16)
    a = Pathway("t", "s", transform="conv1x1", distance="mse").build(s.shape, t8.shape)
    b = Pathway("t", "s", transform="conv1x1", distance="mse").build(s.shape, t16.shape)
    c = Pathway("t", "s", transform="conv3x3", distance="mse").build(s.shape, t8.shape)
    pooled = Pathway("t", "s", transform="conv1x1", distance="mse").build(s.shape, (2, 6, 4, 4))
    other = torch.randn(2, 4, 8, 8)
    items = [("s", a, s, t8), ("s", b, s, t16), ("s", c, s, t8), ("other", a, other, t8),
             ("s", pooled, s, torch.randn(2, 6, 4, 4))]
    out = fused_input_convs(items)
    # the 1x1 pair on "s"; the lone 3x3, the other feature and the 1x1 computed at 4x4 run alone
    assert set(out) == {0, 1}
    torch.testing.assert_close(out[0], a.transform.conv(s))
    torch.testing.assert_close(out[1], b.transform.conv(s))
    assert fused_input_convs(items[1:3]) == {}  # a dropped pathway leaves nothing to fuse
