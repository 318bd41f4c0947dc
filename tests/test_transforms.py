"""Tests for kdtune.transforms: every registered transform, plus value checks per entry."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdtune.transforms import (
    TRANSFORMS,
    FeatureTransform,
    ShapeMismatchError,
    SpatialSelfAttention,
    build_transform,
    pooled_conv1x1_bn,
    resize_spatial,
    transform_options,
)

# name -> (student shape, teacher shape, expected student-out shape, expected teacher-out shape)
CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "identity": ((3, 4, 6, 6), (3, 5, 3, 3), (3, 4, 6, 6), (3, 5, 3, 3)),
    "match_spatial": ((3, 4, 6, 6), (3, 5, 3, 3), (3, 4, 3, 3), (3, 5, 3, 3)),
    "conv1x1": ((3, 4, 8, 8), (3, 6, 4, 4), (3, 6, 4, 4), (3, 6, 4, 4)),
    "conv3x3": ((3, 4, 2, 2), (3, 6, 4, 4), (3, 6, 4, 4), (3, 6, 4, 4)),
    "distpro": ((3, 4, 8, 8), (3, 6, 4, 4), (3, 6, 4, 4), (3, 6, 4, 4)),
    "linear": ((3, 5, 4), (3, 5, 7), (3, 5, 7), (3, 5, 7)),
    "token_mlp": ((3, 5, 4), (3, 5, 7), (3, 5, 7), (3, 5, 7)),
    "attention_map": ((3, 4, 8, 8), (3, 6, 4, 4), (3, 16), (3, 16)),
    "flatten_pool": ((3, 4, 8, 8), (3, 6, 4, 4), (3, 4), (3, 6)),
    "autokd": ((3, 4, 8, 8), (3, 6, 4, 4), (3, 6, 4, 4), (3, 6, 4, 4)),  # Auto-KD: adapter, then original ops
    "tokens_to_map": ((3, 17, 4), (3, 6, 8, 8), (3, 6, 8, 8), (3, 6, 8, 8)),  # 4x4 patches + class token
    "map_to_tokens": ((3, 4, 8, 8), (3, 5, 6), (3, 4, 6), (3, 4, 6)),  # class token + 2x2 patches
}
PARAMETER_FREE = {"identity", "match_spatial", "attention_map", "flatten_pool"}


def test_every_registered_transform_has_a_case():
    assert set(TRANSFORMS.names()) == set(CASES)


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_every_transform_shapes_finite_and_gradient(name):
    s_shape, t_shape, s_out_shape, t_out_shape = CASES[name]
    torch.manual_seed(0)
    tf = build_transform(name, s_shape, t_shape)
    assert isinstance(tf, FeatureTransform)
    s = torch.randn(s_shape, requires_grad=True)
    t = torch.randn(t_shape)
    s_out, t_out = tf(s, t)
    assert tuple(s_out.shape) == s_out_shape
    assert tuple(t_out.shape) == t_out_shape
    assert torch.isfinite(s_out).all() and torch.isfinite(t_out).all()
    s_out.pow(2).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    params = list(tf.parameters())
    if name in PARAMETER_FREE:
        assert params == []
    else:
        assert params, f"{name} should be a trainable adapter"
        assert all(p.grad is not None for p in params)
        if name == "map_to_tokens":  # only drops the teacher's class token
            assert torch.equal(t_out, t[:, 1:])
        else:
            assert t_out is t, "adapters must pass the teacher through unchanged"


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_every_transform_is_described(name):
    assert TRANSFORMS.describe(name)


# --------------------------------------------------------------------------- resize


def test_resize_shrinks_by_block_average():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = resize_spatial(x, (2, 2))
    a = x[0, 0].numpy()
    expected = np.array([[a[0:2, 0:2].mean(), a[0:2, 2:4].mean()], [a[2:4, 0:2].mean(), a[2:4, 2:4].mean()]])
    np.testing.assert_allclose(out[0, 0].numpy(), expected)


def test_resize_grows_bilinearly_half_pixel_centres():
    x = torch.tensor([[[[0.0, 1.0]]]])  # (1, 1, 1, 2)
    out = resize_spatial(x, (1, 4))
    # source coordinate (i + 0.5) * 2 / 4 - 0.5, clamped to [0, 1]: 0, 0.25, 0.75, 1
    np.testing.assert_allclose(out.flatten().numpy(), [0.0, 0.25, 0.75, 1.0])


def test_resize_same_size_is_identity():
    x = torch.randn(2, 3, 4, 5)
    assert resize_spatial(x, (4, 5)) is x


# --------------------------------------------------------------------------- adapters


def test_conv1x1_value_against_einsum_and_block_pooling():
    torch.manual_seed(1)
    tf = build_transform("conv1x1", (2, 3, 4, 4), (2, 5, 2, 2)).eval()  # eval: BN uses running stats
    w = torch.randn(5, 3)
    with torch.no_grad():
        tf.conv.weight.copy_(w.view(5, 3, 1, 1))
        tf.bn.running_mean.copy_(torch.arange(5.0))
        tf.bn.running_var.fill_(4.0)
    s = torch.randn(2, 3, 4, 4)
    out, _ = tf(s, torch.randn(2, 5, 2, 2))
    sn, wn = s.numpy().astype(np.float64), w.numpy().astype(np.float64)
    y = np.einsum("oc,nchw->nohw", wn, sn)
    y = (y - np.arange(5.0)[None, :, None, None]) / math.sqrt(4.0 + tf.bn.eps)
    expected = y.reshape(2, 5, 2, 2, 2, 2).mean(axis=(3, 5))  # 2x2 blocks -> (2, 5, 2, 2)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("s_hw", "size"), [((8, 8), (4, 4)), ((7, 7), (3, 3)), ((6, 9), (4, 4))])
@pytest.mark.parametrize("bn_kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}])
@pytest.mark.parametrize("bias", [False, True])
def test_pooled_conv1x1_bn_equals_pooling_after_conv_and_bn(s_hw, size, bn_kwargs, bias):
    """The 1x1 adapter on a larger student map, computed at the teacher's size with BN's statistics
    from the input's moments, equals conv -> BN -> pooling: value, every gradient, running statistics,
    in training (twice: the momentum / cumulative average) and in eval mode; channels-last too."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 1, bias=bias).double()
    bn = nn.BatchNorm2d(5, **bn_kwargs).double()
    if bn.affine:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    conv_ref, bn_ref = copy.deepcopy(conv), copy.deepcopy(bn)
    for train in (True, True, False):
        bn.train(train)
        bn_ref.train(train)
        x = (torch.randn(4, 3, *s_hw, dtype=torch.float64) + 2.0).to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        got = pooled_conv1x1_bn(conv, bn, x, size)
        expected = resize_spatial(bn_ref(conv_ref(x)), size)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(expected)
        params, params_ref = [*conv.parameters(), *bn.parameters()], [*conv_ref.parameters(), *bn_ref.parameters()]
        grads = torch.autograd.grad(got, [x, *params], g)
        grads_ref = torch.autograd.grad(expected, [x, *params_ref], g)
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        for a, b in zip(bn.buffers(), bn_ref.buffers(), strict=True):  # running mean / var, batches tracked
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_conv1x1_adapter_pools_first_only_when_the_student_map_is_larger():
    tf = build_transform("conv1x1", (2, 3, 8, 8), (2, 5, 4, 4))
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    assert tf.input_conv(s, t) is None  # computed at 4x4 (pooled_conv1x1_bn): not fused with other convs
    assert tf.input_conv(torch.randn(2, 3, 4, 4), t) == (tf.conv, None)
    assert tf.input_conv(torch.randn(2, 3, 2, 2), t) == (tf.conv, None)  # upsampled after BN


def test_conv_adapters_upsample_when_student_is_smaller():
    tf = build_transform("conv1x1", (2, 3, 2, 2), (2, 4, 8, 8))
    out, _ = tf(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 8, 8))
    assert out.shape == (2, 4, 8, 8)


def test_spatial_self_attention_is_fig4b_with_optional_sigmoid():
    """Fig. 4b: x * conv(x) (1-channel map, no squashing); sigmoid=True gates with sigmoid(conv(x))."""
    plain, gated = SpatialSelfAttention(channels=3), SpatialSelfAttention(channels=3, sigmoid=True)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        for att in (plain, gated):
            att.conv.weight.zero_()
            att.conv.bias.fill_(math.log(3.0))  # the map is log 3 everywhere; sigmoid(log 3) = 3/4
    torch.testing.assert_close(plain(x), math.log(3.0) * x)
    torch.testing.assert_close(gated(x), 0.75 * x)
    assert not build_transform("distpro", (2, 3, 4, 4), (2, 4, 4, 4)).attention.sigmoid  # off by default
    assert build_transform("distpro", (2, 3, 4, 4), (2, 4, 4, 4), attention_sigmoid=True).attention.sigmoid


def test_distpro_block_order_and_upsampling():
    tf = build_transform("distpro", (2, 3, 2, 2), (2, 4, 4, 4))
    names = [n for n, _ in tf.named_children()]
    assert names == ["conv1", "attention", "conv2", "conv3"]
    out, _ = tf(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 4, 4))
    assert out.shape == (2, 4, 4, 4)


@pytest.mark.parametrize("name", ["conv3x3", "distpro"])
def test_pool_first_runs_the_convs_on_the_pooled_student_map(name):
    """pool_first: the same layers applied to the student map block-averaged to the teacher's size."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 2, 2)
    pooled = build_transform(name, s.shape, t.shape, pool_first=True).eval()
    on_small = build_transform(name, (2, 3, 2, 2), t.shape).eval()  # same layers, built for a 2x2 student map
    on_small.load_state_dict(pooled.state_dict())
    seen = []
    first_conv = next(m for m in pooled.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[-2:]))
    out, t_out = pooled(s, t)
    assert seen == [(2, 2)] and t_out is t  # the convs saw the 2x2 map, the teacher passes unchanged
    block_mean = s.reshape(2, 3, 2, 4, 2, 4).mean((3, 5))  # 4x4 block averages
    torch.testing.assert_close(out, on_small(block_mean, t)[0])
    assert "pool_first=True" in repr(pooled)


@pytest.mark.parametrize("name", ["conv3x3", "distpro"])
def test_pool_first_changes_nothing_when_the_student_map_is_smaller(name):
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 4, 4)
    plain = build_transform(name, s.shape, t.shape).eval()
    pooled = build_transform(name, s.shape, t.shape, pool_first=True).eval()
    pooled.load_state_dict(plain.state_dict())
    torch.testing.assert_close(pooled(s, t)[0], plain(s, t)[0])


def test_linear_value_vectors_and_tokens():
    torch.manual_seed(2)
    for s_shape, t_shape in [((3, 4), (3, 6)), ((3, 5, 4), (3, 5, 6))]:
        tf = build_transform("linear", s_shape, t_shape)
        s = torch.randn(s_shape)
        out, _ = tf(s, torch.randn(t_shape))
        w, b = tf.proj.weight.detach().numpy(), tf.proj.bias.detach().numpy()
        np.testing.assert_allclose(out.detach().numpy(), s.numpy() @ w.T + b, rtol=1e-5, atol=1e-6)


def test_token_mlp_value_in_eval_mode():
    torch.manual_seed(3)
    tf = build_transform("token_mlp", (2, 3, 4), (2, 3, 5), dropout=0.5).eval()
    s = torch.randn(2, 3, 4)
    out, _ = tf(s, torch.randn(2, 3, 5))
    lin1, lin2 = tf.mlp[0], tf.mlp[3]
    h = s.numpy() @ lin1.weight.detach().numpy().T + lin1.bias.detach().numpy()
    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))(h)
    expected = gelu @ lin2.weight.detach().numpy().T + lin2.bias.detach().numpy()
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_token_mlp_dropout_is_active_in_training():
    torch.manual_seed(4)
    tf = build_transform("token_mlp", (2, 3, 4), (2, 3, 8), dropout=0.5).train()
    s = torch.randn(2, 3, 4)
    a, _ = tf(s, torch.randn(2, 3, 8))
    b, _ = tf(s, torch.randn(2, 3, 8))
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------- parameter-free


def test_match_spatial_pools_the_larger_side_by_hand():
    """Teacher 2x2 pooled to the student's 1x1 (its mean); student 2x2 pooled to a 1x1 teacher; channels kept."""
    small = torch.tensor([[[[5.0]]], [[[7.0]]]])  # (2, 1, 1, 1)
    big = torch.arange(16.0).reshape(2, 2, 2, 2)  # (2, 2, 2, 2): per-channel means 1.5, 5.5, 9.5, 13.5
    tf = build_transform("match_spatial", small.shape, big.shape)
    s_out, t_out = tf(small, big)
    assert s_out is small
    np.testing.assert_allclose(t_out.flatten().numpy(), [1.5, 5.5, 9.5, 13.5])
    s_out, t_out = build_transform("match_spatial", big.shape, small.shape)(big, small)
    assert t_out is small and s_out.shape == (2, 2, 1, 1)
    np.testing.assert_allclose(s_out.flatten().numpy(), [1.5, 5.5, 9.5, 13.5])


def test_match_spatial_resizes_the_student_when_neither_side_is_larger():
    s, t = torch.randn(2, 3, 4, 2), torch.randn(2, 5, 2, 4)
    s_out, t_out = build_transform("match_spatial", s.shape, t.shape)(s, t)
    assert t_out is t
    torch.testing.assert_close(s_out, resize_spatial(s, (2, 4)))


def test_attention_map_hand_computed_2x2():
    f = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[-1.0, 0.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
    tf = build_transform("attention_map", f.shape, f.shape)
    a_s, a_t = tf(f, f)
    # mean_c F^2 = [[1, 2], [0, 2]] -> [1, 2, 0, 2] / ||.|| (= 3)
    np.testing.assert_allclose(a_s.numpy(), [[1 / 3, 2 / 3, 0.0, 2 / 3]], rtol=1e-6)
    torch.testing.assert_close(a_s, a_t)


def test_attention_map_resizes_the_student_first():
    torch.manual_seed(5)
    s = torch.randn(2, 3, 4, 4)
    t = torch.randn(2, 5, 2, 2)
    a_s, _ = build_transform("attention_map", s.shape, t.shape)(s, t)
    pooled = s.numpy().reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # student pooled to 2x2
    a = (pooled**2).mean(axis=1).reshape(2, -1)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(a_s.numpy(), a, rtol=1e-5, atol=1e-6)


def test_flatten_pool_means_by_rank():
    torch.manual_seed(6)
    maps, tokens, vectors = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 3), torch.randn(2, 3)
    tf = build_transform("flatten_pool", maps.shape, tokens.shape)
    p_maps, p_tokens = tf(maps, tokens)
    expected = [[maps[n, c].numpy().sum() / 20 for c in range(3)] for n in range(2)]
    np.testing.assert_allclose(p_maps.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(p_tokens.numpy(), tokens.numpy().mean(axis=1), rtol=1e-5)
    out, _ = build_transform("flatten_pool", vectors.shape, vectors.shape)(vectors, vectors)
    assert out is vectors


# --------------------------------------------------------------------------- errors and factory


@pytest.mark.parametrize(
    ("name", "s_shape", "t_shape"),
    [
        ("conv1x1", (8, 16), (8, 32, 4, 4)),
        ("conv3x3", (8, 16, 4, 4), (8, 32)),
        ("distpro", (8, 16, 4), (8, 32, 4, 4)),
        ("linear", (8, 16, 4, 4), (8, 32)),
        ("linear", (8, 5, 16), (8, 7, 32)),
        ("token_mlp", (8, 16), (8, 5, 32)),
        ("attention_map", (8, 16), (8, 32)),
        ("match_spatial", (8, 16, 5), (8, 32, 5)),
        ("flatten_pool", (8, 1, 2, 3, 4), (8, 32)),
    ],
)
def test_shape_mismatch_names_both_shapes(name, s_shape, t_shape):
    with pytest.raises(ShapeMismatchError) as err:
        build_transform(name, s_shape, t_shape)
    msg = str(err.value)
    assert str(s_shape) in msg and str(t_shape) in msg and name in msg
    assert isinstance(err.value, ValueError)


def test_build_unknown_name_suggests_close_names():
    with pytest.raises(KeyError, match="conv1x1"):
        build_transform("conv1x", (2, 3, 4, 4), (2, 3, 4, 4))


def test_build_accepts_class_and_instance():
    from kdtune.transforms import Conv1x1Adapter

    tf = build_transform(Conv1x1Adapter, (2, 3, 4, 4), (2, 5, 4, 4))
    assert isinstance(tf, Conv1x1Adapter)
    assert build_transform(tf, (7, 3, 4, 4), (7, 5, 4, 4)) is tf  # batch size may differ
    with pytest.raises(ShapeMismatchError):
        build_transform(tf, (2, 4, 4, 4), (2, 5, 4, 4))
    with pytest.raises(TypeError):
        build_transform(tf, (2, 3, 4, 4), (2, 5, 4, 4), p=2)


def test_build_passes_options():
    tf = build_transform("attention_map", (1, 1, 1, 2), (1, 1, 1, 2), p=1)
    f = torch.tensor([[[[3.0, -4.0]]]])
    a, _ = tf(f, f)
    np.testing.assert_allclose(a.numpy(), [[3 / 5, 4 / 5]], rtol=1e-6)


def test_unknown_option_is_refused_with_the_allowed_ones():
    assert transform_options("conv3x3") == ["pool_first"]
    assert transform_options("conv1x1") == []
    with pytest.raises(ValueError, match=r"no options \['pool_frist'\]; its options: \['pool_first'\]"):
        build_transform("conv3x3", (2, 16, 28, 28), (2, 64, 7, 7), pool_frist=True)


def test_shapes_must_be_shapes():
    with pytest.raises(TypeError):
        build_transform("identity", torch.zeros(2, 3), (2, 3))
    with pytest.raises(ValueError):
        build_transform("identity", (3,), (2, 3))


def test_adapters_are_modules_that_move_with_the_student():
    tf = build_transform("conv1x1", (2, 3, 4, 4), (2, 5, 4, 4))
    assert isinstance(tf, nn.Module)
    assert {k for k in tf.state_dict()} >= {"conv.weight", "bn.running_mean"}


# --------------------------------------------------------------------------- CNN maps <-> tokens


def test_token_grid_finds_the_patch_grid_with_or_without_a_class_token() -> None:
    from kdtune.transforms import token_grid

    assert token_grid(49) == (7, 0) and token_grid(50) == (7, 1) and token_grid(65) == (8, 1)
    with pytest.raises(ValueError, match="51 tokens are not a square patch grid"):
        token_grid(51)


def test_tokens_to_map_drops_the_class_token_and_projects_each_patch_by_hand() -> None:
    from kdtune.transforms import build_transform

    torch.manual_seed(0)
    tf = build_transform("tokens_to_map", (2, 17, 6), (2, 5, 2, 2)).eval()  # 4x4 patches + class token -> 2x2 map
    s, t = torch.randn(2, 17, 6), torch.randn(2, 5, 2, 2)
    s2, t2 = tf(s, t)
    assert t2 is t and s2.shape == (2, 5, 2, 2)
    conv, bn = tf.proj[0].weight.flatten(1), tf.proj[1]
    grid = s[:, 1:].reshape(2, 4, 4, 6)  # row-major patch tokens
    projected = (grid @ conv.T - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    by_hand = projected.reshape(2, 2, 2, 2, 2, 5).mean(dim=(2, 4)).permute(0, 3, 1, 2)  # 2x2 average pooling
    assert torch.allclose(s2, by_hand, atol=1e-5)


def test_map_to_tokens_flattens_rows_and_keeps_only_patch_tokens_of_the_teacher() -> None:
    from kdtune.transforms import build_transform

    torch.manual_seed(0)
    tf = build_transform("map_to_tokens", (2, 3, 4, 4), (2, 5, 8)).eval()  # teacher: class token + 2x2 grid
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8)
    s2, t2 = tf(s, t)
    assert torch.equal(t2, t[:, 1:]) and s2.shape == (2, 4, 8)
    pooled = torch.nn.functional.adaptive_avg_pool2d(s, 2)
    expected = tf.proj(pooled).flatten(2).transpose(1, 2)
    assert torch.allclose(s2, expected)
    assert torch.allclose(s2[:, 1], tf.proj(pooled)[:, :, 0, 1])  # token 1 = row 0, column 1


def test_token_transforms_name_what_they_need() -> None:
    from kdtune.transforms import build_transform

    with pytest.raises(ShapeMismatchError, match="tokens_to_map.*\\(N, L, D\\) student tokens and an"):
        build_transform("tokens_to_map", (2, 8, 4, 4), (2, 8, 4, 4))
    with pytest.raises(ShapeMismatchError, match="square patch grid: 11 tokens"):
        build_transform("map_to_tokens", (2, 3, 4, 4), (2, 11, 8))
