"""The frozen-teacher fast path computes what the teacher's own hooked forward computes."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from kdtune.distiller import Distiller, freeze
from kdtune.models import create_model
from kdtune.pathways import Pathway
from kdtune.teacher import TeacherRunner, feature_graph, fold_batchnorms
from kdtune.zoo import load_teacher


def _assert_same(fast: tuple[Tensor, dict[str, Tensor]], ref: tuple[Tensor, dict[str, Tensor]]) -> None:
    (logits, feats), (ref_logits, ref_feats) = fast, ref
    assert set(feats) == set(ref_feats)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for k in ref_feats:
        torch.testing.assert_close(feats[k], ref_feats[k], rtol=1e-5, atol=1e-5, msg=k)
    assert torch.equal(logits.argmax(1), ref_logits.argmax(1))


class ConvBnNet(nn.Module):
    """Two conv-BN pairs; the first's pre-BN conv output and the second's BN output get captured."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def _trained_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, then frozen."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return freeze(model)


def test_zoo_resnet56_logits_and_features_equal_the_hooked_forward():
    teacher = freeze(load_teacher("resnet56_fashion_mnist"))
    paths = ["layer1", "layer2", "layer3", "layer2.0.bn1", "layer3.1.conv1", "layer3.8.relu", ""]
    x = torch.randn(16, 1, 28, 28)
    fast = TeacherRunner(teacher, paths)
    ref = TeacherRunner(teacher, paths, fast=False)
    _assert_same(fast(x), ref(x))
    _assert_same(fast(x[:5]), ref(x[:5]))  # a new batch size is checked again, still equal
    assert fast.fast
    # 57 conv-BN pairs; the captured pre-BN conv layer3.1.conv1 keeps its own BN.
    assert fast.folded == 56


def test_hand_built_model_keeps_captured_pre_bn_conv_and_folds_captured_bn():
    model = _trained_bn(ConvBnNet())
    paths = ["conv1", "bn2"]
    x = torch.randn(4, 1, 8, 8)
    fast = TeacherRunner(model, paths)
    _assert_same(fast(x), TeacherRunner(model, paths, fast=False)(x))
    assert fast.folded == 1
    gm = feature_graph(model, paths)
    assert fold_batchnorms(gm) == 1
    assert isinstance(gm.bn1, nn.BatchNorm2d) and not hasattr(gm, "bn2")  # only the pair (conv2, bn2) folded
    with torch.no_grad():
        logits, conv1, bn2 = gm(x)
        h = model.conv2(torch.relu(model.bn1(model.conv1(x))))
        torch.testing.assert_close(conv1, model.conv1(x))
        torch.testing.assert_close(bn2, model.bn2(h), rtol=1e-5, atol=1e-5)


def test_features_keep_the_memory_format_of_the_teachers_own_forward():
    """A channels-last teacher's own forward gives channels-last maps; so does the fast path (whose
    inference graph returns NCHW), so distances never mix the two layouts."""
    model = _trained_bn(ConvBnNet()).to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    paths = ["conv1", "bn2"]
    fast, ref = TeacherRunner(model, paths), TeacherRunner(model, paths, fast=False)
    for _ in range(2):  # the first call (checked against the reference) and a later one
        _, feats = fast(x)
        _, ref_feats = ref(x)
        for k in paths:
            assert not ref_feats[k].is_contiguous() and ref_feats[k].is_contiguous(memory_format=torch.channels_last)
            assert feats[k].stride() == ref_feats[k].stride(), k
    contiguous = _trained_bn(ConvBnNet())
    _, feats = TeacherRunner(contiguous, paths)(torch.randn(4, 1, 8, 8))
    assert all(f.is_contiguous() for f in feats.values())


def test_teacher_is_not_modified():
    model = _trained_bn(ConvBnNet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    TeacherRunner(model, ["bn2"])(torch.randn(2, 1, 8, 8))
    assert isinstance(model.bn2, nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return h.mean((2, 3)) if h.sum() > 0 else -h.mean((2, 3))


def test_untraceable_teacher_falls_back_to_its_own_forward():
    model = freeze(Branchy())
    runner = TeacherRunner(model, ["conv"])
    x = torch.randn(3, 1, 6, 6)
    with pytest.warns(UserWarning, match="fast path unavailable"):
        out = runner(x)
    assert not runner.fast
    _assert_same(out, TeacherRunner(model, ["conv"], fast=False)(x))


def test_weights_changed_in_place_are_seen():
    model = _trained_bn(ConvBnNet())
    runner = TeacherRunner(model, ["bn2"])
    x = torch.randn(2, 1, 8, 8)
    first, _ = runner(x)
    with torch.no_grad():
        model.bn2.running_mean.add_(1.0)
    second, _ = runner(x)
    assert not torch.allclose(first, second)
    _assert_same(runner(x), TeacherRunner(model, ["bn2"], fast=False)(x))


def test_bf16_is_close_and_returns_fp32():
    teacher = freeze(load_teacher("resnet56_fashion_mnist"))
    x = torch.randn(8, 1, 28, 28)
    logits, feats = TeacherRunner(teacher, ["layer2"], precision="bf16")(x)
    ref_logits, ref_feats = TeacherRunner(teacher, ["layer2"], fast=False)(x)
    assert logits.dtype == feats["layer2"].dtype == torch.float32
    assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()
    assert (feats["layer2"] - ref_feats["layer2"]).abs().max() < 0.05 * ref_feats["layer2"].abs().max()


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp32"):
        TeacherRunner(ConvBnNet(), [], precision="fp16")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["fitnets", "at", "rkd", "cc", "sp", "nst", "pkt"])
def test_distiller_losses_and_gradients_equal_with_the_fast_teacher(method):
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", 1, 10), freeze(load_teacher("resnet56_fashion_mnist"))
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    results = []
    for fast in (True, False):
        torch.manual_seed(1)
        d = Distiller(student, teacher, pathways=[Pathway("layer2", "layer2", method=method)],
                      logit_losses=["kd"], input_shape=(1, 28, 28), fast_teacher=fast)
        out = d(x, y)
        out["loss"].backward()  # teacher features enter the loss as constants
        grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        results.append((out, grads))
    (fast_out, fast_grads), (ref_out, ref_grads) = results
    for k in ("loss", "kd", "task"):
        torch.testing.assert_close(fast_out[k], ref_out[k], rtol=1e-4, atol=1e-6)
    for a, b in zip(fast_grads, ref_grads, strict=True):  # float rounding, amplified by the deep sums
        assert (a - b).norm() <= 1e-3 * b.norm() + 1e-7


def test_config_precision_reaches_the_distiller():
    from kdtune.config import RunConfig, from_dict
    from kdtune.recipe import build_distiller

    cfg = from_dict(RunConfig, {"student": {"name": "resnet8"}, "teacher": {"name": "resnet14", "precision": "bf16"},
                                "distill": {"logit_losses": [{"name": "kd"}]}})
    d = build_distiller(cfg, 1, 10, (1, 28, 28))
    logits = d.teacher_forward(torch.randn(2, 1, 28, 28)).logits
    assert d._teacher_runner.precision == "bf16" and logits.dtype == torch.float32


def test_input_taps_equal_the_hooked_forward():
    teacher = freeze(load_teacher("resnet56_fashion_mnist"))
    paths = ["layer2.8.relu:input", "layer3:input", "layer3"]
    x = torch.randn(4, 1, 28, 28)
    fast = TeacherRunner(teacher, paths)
    _assert_same(fast(x), TeacherRunner(teacher, paths, fast=False)(x))
    assert fast.fast
