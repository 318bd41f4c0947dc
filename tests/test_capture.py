"""Tests for kdtune.capture: hooks by module path, selectors, probing and stage discovery."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.capture import (
    FeatureCapture,
    FeatureNotCapturedError,
    LayerNotFoundError,
    ModuleInfo,
    feature_shape,
    find_stage_outputs,
    get_module,
    pre_activation_path,
    probe,
    select_output,
)
from kdtune.models import create_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def resnet8() -> nn.Module:
    return create_model("resnet8", in_channels=1, num_classes=10)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def small_convnet() -> nn.Sequential:
    """A user model that knows nothing of kdtune: 28 -> 14 -> 7, then a classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 3),
    )


# --------------------------------------------------------------------------- get_module


def test_get_module_returns_the_submodule_object() -> None:
    model = resnet8()
    assert get_module(model, "") is model
    assert get_module(model, "layer2") is model.layer2
    assert get_module(model, "layer2.0.conv1") is model.layer2[0].conv1


def test_bad_top_level_path_suggests_the_real_stages() -> None:
    model = resnet8()
    with pytest.raises(LayerNotFoundError) as info:
        get_module(model, "layer4")
    err = info.value
    assert isinstance(err, KeyError)
    msg = str(err)
    assert "'layer4'" in msg and "CifarResNet" in msg
    assert {"layer1", "layer2", "layer3"} <= set(err.suggestions)
    assert len(err.suggestions) <= 5
    for name in ("layer1", "layer2", "layer3"):
        assert name in msg


def test_bad_index_lists_children_of_longest_valid_prefix() -> None:
    expected = r"'layer3' \(Sequential\) has children: layer3\.0\."
    with pytest.raises(LayerNotFoundError, match=expected) as info:
        get_module(resnet8(), "layer3.5")
    assert "layer3.0" in info.value.suggestions
    # resnet20 has three blocks per stage: all of them are offered.
    with pytest.raises(LayerNotFoundError, match=r"has children: layer3\.0, layer3\.1, layer3\.2\."):
        get_module(create_model("resnet20", in_channels=1), "layer3.9")


def test_parameter_path_is_explained() -> None:
    with pytest.raises(LayerNotFoundError, match="is a Parameter, not a module"):
        get_module(resnet8(), "conv1.weight")


def test_capture_validates_paths_at_construction() -> None:
    model = resnet8()
    with pytest.raises(LayerNotFoundError, match="layer3"):
        FeatureCapture(model, ["layer1", "layer4"])
    assert no_hooks_left(model)
    with pytest.raises(TypeError, match="wrap it in a list"):
        FeatureCapture(model, "layer1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown feature names"):
        FeatureCapture(model, ["layer1"], selectors={"layer2": 0})


# --------------------------------------------------------------------------- capturing


def resnet_stages_by_hand(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three stage outputs computed by calling the submodules directly."""
    h1 = model.layer1(model.relu(model.bn1(model.conv1(x))))
    h2 = model.layer2(h1)
    return h1, h2, model.layer3(h2)


def test_captured_features_equal_direct_computation() -> None:
    model = resnet8().eval()
    x = torch.randn(2, 1, 28, 28)
    with FeatureCapture(model, ["layer1", "layer3"]) as cap:
        logits = model(x)
    h1, _, h3 = resnet_stages_by_hand(model, x)
    assert cap["layer1"].shape == (2, 16, 28, 28) and cap["layer3"].shape == (2, 64, 7, 7)
    torch.testing.assert_close(cap["layer1"], h1)
    torch.testing.assert_close(cap["layer3"], h3)
    torch.testing.assert_close(logits, model.fc(h3.mean(dim=(2, 3))))


def test_named_paths_and_root_output() -> None:
    model = resnet8().eval()
    x = torch.randn(2, 1, 28, 28)
    with FeatureCapture(model, {"mid": "layer2", "logits": ""}) as cap:
        out = model(x)
    assert set(cap.features) == {"mid", "logits"}
    assert cap["logits"] is out
    torch.testing.assert_close(cap["mid"], resnet_stages_by_hand(model, x)[1])


def test_gradient_flows_through_captured_feature() -> None:
    model = resnet8()
    x = torch.randn(2, 1, 28, 28)
    with FeatureCapture(model, ["layer2"]) as cap:
        model(x)
    cap["layer2"].pow(2).mean().backward()
    got = model.conv1.weight.grad.clone()
    assert got.abs().sum() > 0
    assert model.layer3[0].conv1.weight.grad is None  # after the captured module: no gradient

    # Same loss computed without hooks gives the same gradient.
    model.zero_grad()
    resnet_stages_by_hand(model, x)[1].pow(2).mean().backward()
    torch.testing.assert_close(got, model.conv1.weight.grad)


def test_detach_true_stores_values_without_graph() -> None:
    model = resnet8().eval()
    x = torch.randn(2, 1, 28, 28)
    with FeatureCapture(model, ["layer1"], detach=True) as cap:
        out = model(x)
    assert out.requires_grad and not cap["layer1"].requires_grad
    torch.testing.assert_close(cap["layer1"], resnet_stages_by_hand(model, x)[0])


def test_hooks_removed_on_exit_and_on_exception() -> None:
    model = resnet8()
    x = torch.randn(1, 1, 28, 28)
    with FeatureCapture(model, ["layer1", "layer2.0.conv1"]) as cap:
        assert not no_hooks_left(model)
        model(x)
    assert no_hooks_left(model) and not cap.attached
    assert cap["layer1"].shape == (1, 16, 28, 28)  # features stay readable after exit

    with pytest.raises(RuntimeError, match="boom"):
        with FeatureCapture(model, ["layer1", "layer3"]):
            model(x)
            raise RuntimeError("boom")
    assert no_hooks_left(model)


def test_attach_is_idempotent_and_remove_detaches() -> None:
    model = resnet8().eval()
    cap = FeatureCapture(model, ["layer1"])
    cap.attach()
    cap.attach()
    assert len(model.layer1._forward_hooks) == 1
    model(torch.randn(1, 1, 28, 28))
    assert "layer1" in cap
    cap.remove()
    assert no_hooks_left(model)
    cap.clear()
    model(torch.randn(1, 1, 28, 28))
    assert "layer1" not in cap  # detached: the forward captured nothing


class Twice(nn.Module):
    """Calls the same block twice; ``aux`` runs only when asked."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(3, 3)
        self.aux = nn.Linear(3, 2)

    def forward(self, x: Tensor, use_aux: bool = False) -> Tensor:
        h = self.block(self.block(x))
        return self.aux(h) if use_aux else h


def test_module_called_twice_keeps_last_call() -> None:
    model = Twice()
    x = torch.randn(4, 3)
    with FeatureCapture(model, ["block"]) as cap:
        model(x)
    first = F.linear(x, model.block.weight, model.block.bias)
    second = F.linear(first, model.block.weight, model.block.bias)
    torch.testing.assert_close(cap["block"], second)
    assert not torch.allclose(cap["block"], first)


def test_missing_feature_says_forward_did_not_reach_it() -> None:
    model = Twice()
    x = torch.randn(4, 3)
    with FeatureCapture(model, ["block", "aux"]) as cap:
        with pytest.raises(KeyError, match="forward did not reach that module"):
            cap["aux"]  # forward not run yet
        model(x, use_aux=True)
        assert cap["aux"].shape == (4, 2)
        model(x)  # aux unused now: its old value must not linger
        assert "block" in cap
        with pytest.raises(FeatureNotCapturedError, match=r"feature 'aux' \(module 'aux'\)"):
            cap["aux"]
    with pytest.raises(KeyError, match=r"no feature named 'blok'.*Did you mean: block"):
        cap["blok"]


# --------------------------------------------------------------------------- selectors


@dataclass
class Output:
    feat: Tensor
    logits: Tensor


class Head(nn.Module):
    """Returns the same two tensors as a tuple, a dict or an attribute object."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor):
        feat = self.conv(x)
        logits = self.fc(feat.mean(dim=(2, 3)))
        if self.kind == "tuple":
            return feat, logits
        if self.kind == "dict":
            return {"feat": feat, "logits": logits}
        return Output(feat, logits)


class UserNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.head = Head(kind)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


@pytest.mark.parametrize(
    ("kind", "selector"),
    [("tuple", 0), ("tuple", -2), ("dict", "feat"), ("attr", "feat"), ("dict", lambda out: out["feat"])],
)
def test_selectors_pick_the_feature(kind: str, selector: object) -> None:
    model = UserNet(kind)
    x = torch.randn(2, 2, 8, 8)
    with FeatureCapture(model, {"f": "head"}, selectors={"f": selector}) as cap:
        model(x)
    torch.testing.assert_close(cap["f"], model.head.conv(x))


def test_non_tensor_output_without_selector_explains_structure() -> None:
    model = UserNet("tuple")
    with FeatureCapture(model, ["head"]):
        structure = r"tuple\[Tensor\(2, 4, 6, 6\), Tensor\(2, 3\)\]"
        with pytest.raises(TypeError, match=rf"'head'.*{structure}.*selector"):
            model(torch.randn(2, 2, 8, 8))
    assert no_hooks_left(model)


def test_select_output_cases() -> None:
    a, b = torch.zeros(2), torch.ones(3)
    assert select_output(a, None) is a
    assert select_output((a, b), 1) is b
    assert select_output([a, b], -1) is b
    assert select_output({"x": a, "y": b}, "y") is b
    assert select_output(Output(a, b), "logits") is b
    assert select_output((a, b), lambda out: out[0]) is a
    with pytest.raises(IndexError, match="out of range"):
        select_output((a, b), 2)
    with pytest.raises(KeyError, match="Did you mean: x"):
        select_output({"x": a}, "xx")
    with pytest.raises(KeyError, match="no key or attribute 'z'"):
        select_output(Output(a, b), "z")
    with pytest.raises(TypeError, match="must pick a Tensor"):
        select_output((a, "text"), 1)
    with pytest.raises(TypeError, match="needs a tuple/list"):
        select_output(a, 0)
    with pytest.raises(TypeError, match="bool"):
        select_output((a, b), True)


# --------------------------------------------------------------------------- functional_call, DDP


def test_hooks_fire_under_functional_call() -> None:
    model = small_convnet()
    x = torch.randn(2, 1, 28, 28)
    params = {k: (v.detach() * 2).requires_grad_() for k, v in model.named_parameters()}
    with FeatureCapture(model, ["0", "3"]) as cap:
        torch.func.functional_call(model, params, (x,))
    expected = F.conv2d(x, params["0.weight"], params["0.bias"], padding=1)
    torch.testing.assert_close(cap["0"], expected)  # computed with the substituted weights
    assert not torch.allclose(cap["0"], model[0](x))
    cap["3"].sum().backward()
    assert params["0.weight"].grad is not None and params["0.weight"].grad.abs().sum() > 0
    assert model[0].weight.grad is None  # the real parameters are untouched


def test_capture_under_distributed_data_parallel(tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = small_convnet()
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(2, 1, 28, 28)
        for target in (ddp.module, ddp):  # documented way, and the wrapper itself (unwrapped)
            with FeatureCapture(target, ["3"]) as cap:
                out = ddp(x)
            assert cap.model is model
            h = model[2](model[1](model[0](x)))
            torch.testing.assert_close(cap["3"], model[3](h))
            out.sum().backward()
            assert no_hooks_left(model)
        # Free the DDP reducer (it holds the process group) while the group is alive: a reducer
        # released after destroy_process_group, at the test's return, hung in gloo's destructor
        # (thread join) under pytest-xdist.
        del ddp, out
        gc.collect()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- probe


def test_probe_shapes_calls_and_order() -> None:
    model = resnet8()
    infos = probe(model, torch.randn(2, 1, 28, 28))
    assert infos["layer1"].shape == (2, 16, 28, 28)
    assert infos["layer2"].shape == (2, 32, 14, 14)
    assert infos["layer3"].shape == (2, 64, 7, 7)
    assert infos["pool"].shape == (2, 64, 1, 1)
    assert infos["fc"].shape == (2, 10) and infos[""].shape == (2, 10)
    assert infos["layer2.0.conv1"].type == "Conv2d" and infos["layer2"].type == "Sequential"
    assert infos["layer1.0.relu"].calls == 2  # used twice inside a BasicBlock
    assert infos["relu"].calls == 1
    # A container finishes after its children; the model itself finishes last.
    assert infos["layer1.0"].order < infos["layer1"].order < infos["layer2.0.conv1"].order
    assert infos[""].order == len(infos) - 1
    assert [i.order for i in infos.values()] == list(range(len(infos)))


def test_probe_restores_modes_and_keeps_bn_statistics() -> None:
    model = resnet8().train()
    model.bn1.eval()  # a deliberately frozen part must stay frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    infos = probe(model, torch.randn(4, 1, 28, 28) * 3 + 1)
    assert infos["layer3"].shape == (4, 64, 7, 7)
    assert not model.bn1.training
    assert all(m.training for name, m in model.named_modules() if name != "bn1")
    for k, v in model.state_dict().items():  # running_mean/var and num_batches_tracked unchanged
        assert torch.equal(v, before[k]), k


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 3)
        self.spare = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.used(x), x


def test_probe_non_tensor_and_unused_modules() -> None:
    infos = probe(Unused(), (torch.randn(2, 3),))
    assert infos[""].shape is None and infos[""].calls == 1
    assert infos["used"].shape == (2, 3)
    assert infos["spare"] == ModuleInfo("spare", "Linear", None, 0, -1)
    assert list(infos) == ["used", "", "spare"]


def test_probe_removes_hooks_and_restores_mode_on_error() -> None:
    model = resnet8().train()
    with pytest.raises(RuntimeError):
        probe(model, torch.randn(2, 3, 28, 28))  # wrong channel count
    assert no_hooks_left(model) and model.training


# --------------------------------------------------------------------------- stage outputs


@pytest.mark.parametrize("name", ["resnet8", "resnet20"])
def test_resnet_stage_outputs(name: str) -> None:
    model = create_model(name, in_channels=1)
    assert find_stage_outputs(model, torch.randn(2, 1, 28, 28)) == ["layer1", "layer2", "layer3"]
    model = create_model(name, in_channels=3)
    assert find_stage_outputs(model, torch.randn(1, 3, 32, 32)) == ["layer1", "layer2", "layer3"]


def test_wrn_stage_outputs_have_three_resolutions() -> None:
    model = create_model("wrn_16_1", in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    stages = find_stage_outputs(model, x)
    infos = probe(model, x)
    assert stages == ["block1", "block2", "relu"]  # not block2.0.bn1: it is inside the down-sampling block
    assert [infos[p].shape[2:] for p in stages] == [(28, 28), (14, 14), (7, 7)]
    assert [infos[p].order for p in stages] == sorted(infos[p].order for p in stages)


def test_two_branch_downsampling_blocks_give_one_stage_per_resolution() -> None:
    model = create_model("shufflenetv2", in_channels=1)
    assert find_stage_outputs(model, torch.randn(2, 1, 28, 28)) == ["bn1", "layer1", "layer2", "bn2"]


def test_stage_outputs_of_plain_user_model() -> None:
    # Completion order: 0,1 (28x28), 2,3,4 (14x14), 5 (7x7), then 2-D outputs.
    assert find_stage_outputs(small_convnet(), torch.randn(2, 1, 28, 28)) == ["1", "4", "5"]


def test_stage_outputs_ignore_root_with_4d_output() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2))
    # Without ignoring the root, "" (14x14, finishing last) would replace "1".
    assert find_stage_outputs(model, torch.randn(1, 1, 28, 28)) == ["0", "1"]


def test_stage_outputs_of_model_with_tuple_output() -> None:
    model = UserNet("tuple")
    assert find_stage_outputs(model, torch.randn(1, 2, 8, 8)) == ["head.conv"]


def test_stage_outputs_without_feature_maps_fail_clearly() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="pass explicit module paths"):
        find_stage_outputs(mlp, torch.randn(2, 4))


def test_deepcopied_model_writes_into_the_copied_capture() -> None:
    import copy

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
            self.capture = FeatureCapture(self.net, ["0"]).attach()

    original = Holder()
    clone = copy.deepcopy(original)
    clone.net(torch.ones(1, 3))
    assert "0" in clone.capture.features and "0" not in original.capture.features


# --------------------------------------------------------------------------- pre-activation taps


class _Block(nn.Module):
    """relu(conv2(relu(conv1(x))) + x), its ReLU called twice (as in a ResNet basic block)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


class _TwoStages(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(_Block(inplace), _Block(inplace))
        self.stage2 = nn.Conv2d(2, 3, 1)  # no activation: its output is already pre-activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_input_tap_captures_the_value_before_the_last_relu(inplace):
    torch.manual_seed(0)
    model = _TwoStages(inplace)
    x = torch.randn(2, 2, 5, 5)
    path = pre_activation_path(model, "stage1", x)
    assert path == "stage1.1.relu:input"
    assert pre_activation_path(model, "stage2", x) == "stage2"
    with FeatureCapture(model, [path, "stage1"]) as cap:
        model(x)
    block = model.stage1[1]
    h = model.stage1[0](x.clone())
    expected = block.conv2(torch.relu(block.conv1(h))) + h  # computed independently of the hooks
    assert (expected < 0).any()  # negatives present: the tap is really before the ReLU
    torch.testing.assert_close(cap[path], expected)
    torch.testing.assert_close(cap["stage1"], torch.relu(expected))
    cap[path].sum().backward()  # the graph is kept: a loss on the tap trains the model
    assert block.conv2.weight.grad is not None
    assert feature_shape(model, path, x) == (2, 2, 5, 5)


def test_stages_of_a_transformer_are_its_token_blocks() -> None:
    from kdtune.models import create_model

    vit = create_model("vit_tiny", in_channels=1, num_classes=10)
    assert find_stage_outputs(vit, torch.zeros(2, 1, 28, 28)) == [f"blocks.{i}" for i in range(6)]

    class Mixer(nn.Module):  # an MLP-mixer-like model: tokens from a linear embedding, blocks in a ModuleList
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(16, 8)
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            h = self.embed(x.reshape(len(x), 16, 16))  # (N, 16 tokens, 8)
            for layer in self.layers:
                h = h + layer(h)
            return self.head(h.mean(1))

    assert find_stage_outputs(Mixer(), torch.zeros(2, 1, 16, 16)) == ["layers.0", "layers.1", "layers.2"]
    flat = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="nor are there >= 2 blocks giving \\(N, L, D\\) tokens"):
        find_stage_outputs(flat, torch.zeros(2, 1, 4, 4))
