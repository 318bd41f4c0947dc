import pytest
import torch
import torch.nn.functional as F

from helpers import TinyNet
from kdtune.capture import LayerNotFoundError
from kdtune.distiller import Distiller, LogitLoss
from kdtune.models import create_model
from kdtune.pathways import Pathway
from kdtune.transforms import ShapeMismatchError


def make(pathways=(), logit_losses=("kd",), **kw):
    torch.manual_seed(0)
    teacher, student = TinyNet(width=6), TinyNet(width=4)
    return Distiller(student, teacher, pathways=list(pathways), logit_losses=list(logit_losses),
                     input_shape=(1, 8, 8), **kw)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4])


def test_kd_term_and_total_match_hand_computation():
    d = make(logit_losses=[LogitLoss("kd", weight=0.7, kwargs={"tau": 2.0})], task_weight=0.3)
    x, y = batch()
    out = d(x, y)
    s, t = d.student(x), d.teacher(x)
    p_t = F.softmax(t / 2, 1)
    kd = 4.0 * (p_t * (p_t.log() - F.log_softmax(s / 2, 1))).sum() / len(x)  # tau^2 * batchmean KL
    ce = F.cross_entropy(s, y)
    assert torch.allclose(out["kd"], kd, atol=1e-6)
    assert torch.allclose(out["loss"], 0.3 * ce + 0.7 * kd, atol=1e-6)
    assert out["w/kd"].item() == pytest.approx(0.7)


def test_teacher_is_frozen_and_run_once_per_batch():
    d = make(pathways=[Pathway("blocks.1", "blocks.1", method="fitnets")])
    calls = []
    d.teacher.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    d.train()
    assert not d.teacher.training
    x, y = batch()
    d(x, y)["loss"].backward()
    assert len(calls) == 1
    after = d.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())


def test_adapters_are_trained_and_teacher_not_in_state_dict():
    d = make(pathways=[Pathway("blocks.1", "blocks.1", method="fitnets")])
    keys = d.state_dict().keys()
    assert not any(k.startswith("teacher") for k in keys)
    assert any(k.startswith("pathways.0.transform") for k in keys)
    x, y = batch()
    d(x, y)["loss"].backward()
    extra = d.extra_parameters()
    assert extra and all(p.grad is not None for p in extra)


def test_pathway_term_equals_independent_computation():
    d = make(pathways=[Pathway("blocks.0", "blocks.0", transform="identity", distance="cka")],
             logit_losses=[])
    x, y = batch()
    out = d(x, y)
    fs, ft = d.student.blocks[0](x), d.teacher.blocks[0](x)
    # linear CKA by hand: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features
    X = fs.flatten(1) - fs.flatten(1).mean(0)
    Y = ft.flatten(1) - ft.flatten(1).mean(0)
    cka = (Y.T @ X).norm() ** 2 / ((X.T @ X).norm() * (Y.T @ Y).norm())
    assert torch.allclose(out["cka:blocks.0->blocks.0"], 1 - cka, atol=1e-5)


def test_stage_paths_on_a_user_model():
    d = make(pathways=[Pathway("stage:-1", "stage:-1", method="fitnets")])
    assert d.pathways[0].name == "fitnets:blocks->blocks"  # the container finishes last


def test_wrong_layer_path_lists_real_ones():
    with pytest.raises(LayerNotFoundError, match="blocks.1"):
        make(pathways=[Pathway("blocks.1", "blocks.5", method="fitnets")])


def test_unalignable_shapes_name_pathway_and_shapes():
    with pytest.raises(ShapeMismatchError, match=r"mse:blocks\.1->blocks\.0.*\(2, 4, 8, 8\).*\(2, 12, 4, 4\)"):
        make(pathways=[Pathway("blocks.1", "blocks.0", distance="mse")])


def test_feature_method_as_logit_loss_is_an_error():
    with pytest.raises(ValueError, match="Pathway"):
        make(logit_losses=["fitnets"])


def test_student_alone_never_runs_the_teacher():
    torch.manual_seed(0)
    d = Distiller(TinyNet(), TinyNet())
    calls = []
    d.teacher.register_forward_hook(lambda *a: calls.append(1))
    x, y = batch()
    out = d(x, y)
    assert calls == [] and torch.allclose(out["loss"], F.cross_entropy(out["logits"], y))


def test_given_teacher_output_is_reused():
    d = make()
    x, y = batch()
    t_out = d.teacher_forward(x)
    calls = []
    d.teacher.register_forward_hook(lambda *a: calls.append(1))
    out = d(x, y, teacher_output=t_out)
    assert calls == [] and torch.equal(out["teacher_logits"], t_out.logits)


def test_reused_forward_is_reweighted_not_rerun_and_refuses_another_precision():
    """reuse_forward: the next forward on that very batch runs neither model, takes the terms as they
    are and applies the weighting as it is now; another batch runs normally; a forward under another
    autocast context than the reused one is refused."""
    d = make(pathways=[Pathway("blocks.1", "blocks.1", method="fitnets")], fast_teacher=False)  # hooks see it
    x, y = batch()
    first = d(x, y)
    calls = []
    d.student.register_forward_hook(lambda *a: calls.append("student"))
    d.teacher.register_forward_hook(lambda *a: calls.append("teacher"))
    d.weighting.base_weights["kd"] = 3.0  # the weighting changes between the two forwards
    d.reuse_forward(x, first)
    again = d(x, y)
    assert calls == []
    assert again["kd"] is first["kd"] and again["w/kd"].item() == pytest.approx(3.0)
    torch.testing.assert_close(again["loss"], first["loss"] + 2.0 * first["kd"] * d.weighting.scales["kd"])
    d.reuse_forward(x, first)
    d(batch()[0].clone(), y)  # another tensor: computed, and the pending output is dropped
    assert calls == ["teacher", "student"]
    d.reuse_forward(x, first)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast"):
        d(x, y)


def test_zoo_models_distil_across_architectures():
    torch.manual_seed(0)
    d = Distiller(create_model("resnet8", 1), create_model("wrn_16_2", 1),
                  pathways=[Pathway(f"stage:{i}", f"stage:{i}", method="at") for i in range(3)],
                  logit_losses=["kd"], input_shape=(1, 28, 28))
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    out = d(x, y)
    assert [p.name.split("->")[1] for p in d.pathways] == ["layer1", "layer2", "layer3"]
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_inactive_pathways_are_not_computed():
    from kdtune.weighting import FixedWeighting

    class DropFitnets(FixedWeighting):
        def active(self, step):
            return {"kd"}

    calls = []
    d = make(pathways=[Pathway("blocks.1", "blocks.1", method="fitnets")])
    d.weighting = DropFitnets(d.weighting.names, d.weighting.base_weights)
    d.pathways[0].transform.register_forward_hook(lambda *a: calls.append(1))
    x, y = batch()
    out = d(x, y)
    assert calls == [] and "fitnets:blocks.1->blocks.1" not in out and "kd" in out


# --------------------------------------------------------------------------- outputs that are not one tensor


class DictOut(torch.nn.Module):
    """A model returning {"logits", "features"}, like many HF / detection models."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"logits": self.net(x), "features": self.net.blocks(x)}


class TupleOut(torch.nn.Module):
    """A model returning (features, logits); its blocks return (map, pooled) tuples."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.stage = PairBlock(net.blocks)

    def forward(self, x):
        return self.stage(x)[1], self.net(x)


class PairBlock(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = blocks

    def forward(self, x):
        h = self.blocks(x)
        return h, h.mean((2, 3))


def test_dict_teacher_and_tuple_student_with_selectors_give_the_plain_models_losses():
    plain = make(pathways=[Pathway("blocks.1", "blocks.1", method="fitnets")])
    torch.manual_seed(0)
    teacher, student = TinyNet(width=6), TinyNet(width=4)
    student.load_state_dict(plain.student.state_dict())
    teacher.load_state_dict(plain.teacher.state_dict())
    wrapped = Distiller(TupleOut(student), DictOut(teacher), logit_losses=["kd"], input_shape=(1, 8, 8),
                        pathways=[Pathway("net.blocks.1", "net.blocks.1", method="fitnets")],
                        teacher_output="logits", student_output=1)
    wrapped.pathways.load_state_dict(plain.pathways.state_dict())
    x, y = batch()
    a, b = plain(x, y), wrapped(x, y)
    for key in ("loss", "task", "kd"):
        assert torch.allclose(a[key], b[key]), key


def test_pathway_selector_picks_a_feature_out_of_a_tuple_output():
    torch.manual_seed(0)
    teacher, student = TupleOut(TinyNet(width=6)), TupleOut(TinyNet(width=4))
    d = Distiller(student, teacher, input_shape=(1, 8, 8), teacher_output=1, student_output=1,
                  pathways=[Pathway("stage", "stage", transform="conv1x1", distance="mse", selector=0, name="map"),
                            Pathway("stage", "stage", transform="linear", distance="mse", selector=1, name="pooled")])
    x, y = batch()
    out = d(x, y)
    t_map = teacher.net.blocks(x)
    s_map = student.net.blocks(x)
    expected = F.mse_loss(*d.pathways[0].transform(s_map, t_map))
    assert torch.allclose(out["map"], expected)
    assert torch.allclose(out["pooled"], F.mse_loss(*d.pathways[1].transform(s_map.mean((2, 3)), t_map.mean((2, 3)))))


def test_dict_output_without_a_selector_names_the_model_its_keys_and_the_fix():
    with pytest.raises(ValueError, match=r"teacher DictOut returns dict\{'logits': Tensor\(2, 10\), 'features'.*"
                                         r"Distiller\(\.\.\., teacher_output='logits'\)"):
        Distiller(TinyNet(4), DictOut(TinyNet(6)), logit_losses=["kd"], input_shape=(1, 8, 8))


def test_a_wrong_selector_names_the_outputs_keys():
    with pytest.raises(ValueError, match=r"teacher DictOut: key 'logit' not in .*'logits'.*'features'.*"
                                         r"Did you mean: logits\?.*teacher_output="):
        Distiller(TinyNet(4), DictOut(TinyNet(6)), logit_losses=["kd"], input_shape=(1, 8, 8), teacher_output="logit")
    with pytest.raises(ValueError, match=r"student TupleOut.*out of range.*tuple\[Tensor"):
        Distiller(TupleOut(TinyNet(4)), TinyNet(6), input_shape=(1, 8, 8), student_output=2)
    with pytest.raises(ValueError, match=r"student TupleOut, module 'stage': output of 'stage' \(PairBlock.*\) "
                                         r"tuple\[Tensor\(2, 8, 4, 4\), Tensor\(2, 8\)\] has no key or "
                                         r"attribute 'x'. Fix: Pathway\(\.\.\., student_sel"):
        Distiller(TupleOut(TinyNet(4)), TupleOut(TinyNet(6)), input_shape=(1, 8, 8), teacher_output=1,
                  student_output=1, pathways=[Pathway("stage", "stage", student_selector="x", teacher_selector=0)])


class Flat(torch.nn.Module):
    """An MLP that wants (N, 64) inputs, not images."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x)


def test_a_student_with_the_wrong_input_convention_fails_at_construction(tiny_data):
    from kdtune.config import TrainConfig
    from kdtune.data import BatchLoader
    from kdtune.trainer import Trainer

    with pytest.raises(ValueError, match=r"student Flat cannot take the data's input, a batch of shape \(2, 1, 8, 8\) "
                                         r"\(mat1 and mat2 shapes cannot be multiplied.*make its first layer take"):
        Trainer(Distiller(Flat()), BatchLoader(tiny_data, 8), None, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="student Flat cannot take the data's input"):
        Distiller(Flat(), TinyNet(6), logit_losses=["kd"], input_shape=(1, 8, 8))
