"""The model zoo: every registered model on 28x28 (Fashion-MNIST) and 32x32 (CIFAR) inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdtune.models import MODELS, create_model, list_models
from kdtune.models.resnet import CifarResNet
from kdtune.models.vgg import VGG
from kdtune.models.wrn import WideResNet

ALL_MODELS = list_models()


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_zoo_has_every_family() -> None:
    expected = {"resnet8", "resnet20", "resnet32x4", "wrn_40_2", "vgg8", "vgg13", "mobilenetv2",
                "mobilenetv2_1_0", "shufflenetv1", "shufflenetv2"}
    assert expected <= set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("num_classes", [10, 7])
@pytest.mark.parametrize("in_channels, size", [(1, 28), (3, 32)])
def test_forward_gives_logits(name: str, in_channels: int, size: int, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=in_channels, num_classes=num_classes)
    assert first_conv(model).weight.shape[1] == in_channels  # create_model passes in_channels on
    with torch.no_grad():  # gradients are checked below, once per model
        out = model(torch.randn(2, in_channels, size, size))
    assert isinstance(out, torch.Tensor)  # plain logits, not a tuple or a feature list
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=7).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 1, 28, 28)), torch.tensor([0, 6]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", ALL_MODELS)
def test_train_and_eval_modes(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10)
    x = torch.randn(3, 1, 28, 28)
    bn = next((m for m in model.modules() if isinstance(m, nn.BatchNorm2d)), None)  # None: a ViT (LayerNorm)
    before = bn.running_mean.clone() if bn is not None else None
    model.train()(x)
    if bn is not None:
        assert not torch.equal(bn.running_mean, before)  # train mode updates BN statistics

    model.eval()
    with torch.no_grad():
        out = model(x)
        # Eval mode uses running statistics: a sample's logits don't depend on its batch.
        torch.testing.assert_close(model(x[:1]), out[:1], rtol=1e-4, atol=1e-4)
    assert not model.training and all(not m.training for m in model.modules())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_is_described(name: str) -> None:
    assert MODELS.describe(name)  # shown by `kdtune list models`


@pytest.mark.parametrize("name, paths", [
    ("resnet8", ["conv1", "layer1", "layer2", "layer3", "fc"]),
    ("wrn_16_1", ["conv1", "block1", "block2", "block3", "fc"]),
    ("vgg8", ["block0", "block1", "block2", "block3", "block4", "fc"]),
    ("mobilenetv2", ["conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "conv2", "fc"]),
    ("shufflenetv1", ["conv1", "layer1", "layer2", "layer3", "fc"]),
    ("shufflenetv2", ["conv1", "layer1", "layer2", "layer3", "conv2", "fc"]),
])
def test_stages_have_dotted_paths(name: str, paths: list[str]) -> None:
    modules = dict(create_model(name).named_modules())
    assert [p for p in paths if p not in modules] == []


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(KeyError, match=r"Did you mean: resnet8\b"):
        create_model("resnet9")
    with pytest.raises(KeyError, match="Did you mean:.*vgg8"):
        create_model("vgg9")
    with pytest.raises(KeyError, match="Did you mean:.*shufflenetv2"):
        create_model("shufflenet_v2")


def test_resnet8_parameter_count_by_hand() -> None:
    # Stem: conv 3x3 C->16 + BN(16). One BasicBlock per stage (two 3x3 convs + 2 BN); stages 2
    # and 3 add a 1x1 conv + BN shortcut. Then Linear(64, 10).
    stem = 16 * 3 * 9 + 2 * 16
    layer1 = 2 * (16 * 16 * 9 + 2 * 16)
    layer2 = 16 * 32 * 9 + 32 * 32 * 9 + 2 * 2 * 32 + (16 * 32 + 2 * 32)
    layer3 = 32 * 64 * 9 + 64 * 64 * 9 + 2 * 2 * 64 + (32 * 64 + 2 * 64)
    fc = 64 * 10 + 10
    expected = stem + layer1 + layer2 + layer3 + fc
    assert expected == 78_042
    assert n_params(create_model("resnet8")) == expected
    # One input channel only shrinks the stem conv: 16 * 9 weights per channel.
    assert n_params(create_model("resnet8", in_channels=1)) == expected - 2 * 16 * 9


def test_vgg8_parameter_count_by_hand() -> None:
    convs = 3 * 64 * 9 + 64 * 128 * 9 + 128 * 256 * 9 + 256 * 512 * 9 + 512 * 512 * 9  # no bias
    bns = 2 * (64 + 128 + 256 + 512 + 512)
    assert n_params(create_model("vgg8")) == convs + bns + 512 * 10 + 10 == 3_917_386


# CIFAR-100 parameter counts (millions) commonly quoted for the CRD model zoo (Tian et al. 2020).
@pytest.mark.parametrize("name, millions", [
    ("resnet8", 0.08), ("resnet20", 0.28), ("resnet56", 0.86), ("resnet8x4", 1.23),
    ("resnet32x4", 7.43), ("wrn_16_2", 0.70), ("wrn_40_1", 0.57), ("wrn_40_2", 2.26),
    ("vgg8", 3.96), ("vgg13", 9.46), ("mobilenetv2", 0.81), ("shufflenetv1", 0.95),
    ("shufflenetv2", 1.36),
])
def test_parameter_counts_match_published(name: str, millions: float) -> None:
    assert abs(n_params(create_model(name, num_classes=100)) / 1e6 - millions) < 0.006


def test_resnet20_is_about_027m_at_10_classes() -> None:
    assert 0.265e6 < n_params(create_model("resnet20")) < 0.275e6


def test_invalid_depths_raise() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=9)
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=15, k=1)
    with pytest.raises(ValueError, match="5 blocks"):
        VGG([[64], [128], [256], [512]])


def test_vit_tiny_tokens_by_hand_and_parameter_count() -> None:
    """Patch 4: 7x7 patch tokens at 28x28 (8x8 at 32x32) after one class token; the embedding is a
    strided conv, so token 1 + r*7 + c is the patch at row r, column c."""
    from kdtune.models.vit import ViT

    torch.manual_seed(0)
    m = create_model("vit_tiny", in_channels=1, num_classes=10)
    assert isinstance(m, ViT)
    x = torch.randn(2, 1, 28, 28)
    tokens = m.tokens(x)
    assert tokens.shape == (2, 50, 64) and m.tokens(torch.randn(2, 1, 32, 32)).shape == (2, 65, 64)
    assert torch.allclose(tokens[:, 0], m.cls_token[0, 0].expand(2, -1))
    pos = torch.nn.functional.interpolate(m.pos_embed, size=(7, 7), mode="bilinear", align_corners=False)
    r, c = 2, 5
    patch = x[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].flatten(1)  # (2, 16)
    by_hand = patch @ m.patch_embed.weight.flatten(1).T + m.patch_embed.bias + pos[0, :, r, c]
    assert torch.allclose(tokens[:, 1 + 7 * r + c], by_hand, atol=1e-5)
    # Per block: 2 LayerNorms (2*64 each), attention (4*64*64 + 4*64), MLP (64*128 + 128 + 128*64 + 64).
    block = 2 * 2 * 64 + 4 * 64 * 64 + 4 * 64 + 64 * 128 + 128 + 128 * 64 + 64
    total = (16 * 64 + 64) + 64 + 64 * 64 + 6 * block + 2 * 64 + (64 * 10 + 10)
    assert sum(p.numel() for p in m.parameters()) == total
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        m(torch.randn(1, 1, 30, 30))
