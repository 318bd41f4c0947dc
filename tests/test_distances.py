"""Tests for kdtune.distances: every registered distance, plus independent value checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdtune.distances import DISTANCES, register_distance
from kdtune.transforms import ShapeMismatchError

RELATION = {"sp", "rkd", "pkt", "nst", "cc", "cka"}
#: Distances on logits (N, K) (Auto-KD's per-teacher logit pathways, kdtune.losses), not on feature maps.
LOGIT = {"logit_kd", "logit_dist"}


def example_shapes(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A student shape and a different teacher shape of the kind the distance takes."""
    return ((4, 12), (4, 5)) if name in LOGIT else ((4, 3, 4, 4), (4, 5, 4, 4))


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().astype(np.float64)


def softmax_np(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# --------------------------------------------------------------------------- every entry


def test_relation_flags():
    for name in DISTANCES.names():
        flag = DISTANCES.get(name).same_shape
        assert isinstance(flag, bool)
        assert flag is (name not in RELATION), name


@pytest.mark.parametrize("name", DISTANCES.names())
def test_every_distance_scalar_finite_gradient_and_zero_on_equal(name):
    fn = DISTANCES.get(name)
    torch.manual_seed(0)
    s_shape, other_shape = example_shapes(name)
    s = torch.randn(*s_shape, requires_grad=True)
    # relation-based distances must accept a different width
    t = torch.randn(*other_shape) if name in RELATION else torch.randn(*s_shape)
    d = fn(s, t)
    assert d.dim() == 0 and torch.isfinite(d)
    assert d.item() > 0
    d.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    same = fn(t, t.clone())
    assert abs(same.item()) < 1e-5, f"{name}(t, t) = {same.item()}"


@pytest.mark.parametrize("name", [n for n in DISTANCES.names() if n not in RELATION])
def test_same_shape_distances_reject_other_shapes(name):
    s_shape, t_shape = example_shapes(name)
    with pytest.raises(ShapeMismatchError) as err:
        DISTANCES.get(name)(torch.randn(*s_shape), torch.randn(*t_shape))
    assert str(s_shape) in str(err.value) and str(t_shape) in str(err.value)


@pytest.mark.parametrize("name", sorted(RELATION))
def test_relation_distances_reject_other_batch_sizes(name):
    with pytest.raises(ShapeMismatchError):
        DISTANCES.get(name)(torch.randn(4, 3, 2, 2), torch.randn(3, 3, 2, 2))


@pytest.mark.parametrize("name", DISTANCES.names())
def test_every_distance_is_described(name):
    assert DISTANCES.describe(name)


def test_register_distance_sets_flag_and_checks_shapes():
    try:
        @register_distance("_test_sum_diff", same_shape=True)
        def sum_diff(s, t):
            """Test entry."""
            return (s - t).sum()

        assert DISTANCES.get("_test_sum_diff") is sum_diff and sum_diff.same_shape is True
        assert sum_diff.__doc__ == "Test entry."
        assert sum_diff(torch.ones(2), torch.zeros(2)).item() == 2.0
        with pytest.raises(ShapeMismatchError, match="_test_sum_diff"):
            sum_diff(torch.ones(2), torch.zeros(3))
    finally:
        DISTANCES._items.pop("_test_sum_diff", None)


# --------------------------------------------------------------------------- point-wise values


def test_mse_l1_smooth_l1_values():
    torch.manual_seed(1)
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    d = f64(s) - f64(t)
    assert DISTANCES.get("mse")(s, t).item() == pytest.approx((d**2).mean(), rel=1e-5)
    assert DISTANCES.get("l1")(s, t).item() == pytest.approx(np.abs(d).mean(), rel=1e-5)
    beta = 0.5
    huber = np.where(np.abs(d) < beta, 0.5 * d**2 / beta, np.abs(d) - 0.5 * beta)
    assert DISTANCES.get("smooth_l1")(s, t, beta=beta).item() == pytest.approx(huber.mean(), rel=1e-5)


def test_cosine_value():
    torch.manual_seed(2)
    s, t = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    a, b = f64(s).reshape(3, -1), f64(t).reshape(3, -1)
    expected = np.mean([1 - a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i]) for i in range(3)])
    assert DISTANCES.get("cosine")(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_kl_value():
    torch.manual_seed(3)
    s, t, tau = torch.randn(3, 5), torch.randn(3, 5), 2.0
    ps, pt = softmax_np(f64(s) / tau, 1), softmax_np(f64(t) / tau, 1)
    expected = (pt * np.log(pt / ps)).sum() / 3 * tau**2
    assert DISTANCES.get("kl")(s, t, tau=tau).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_by_explicit_loops():
    torch.manual_seed(4)
    n, c, h, w, tau = 2, 3, 2, 3, 4.0
    s, t = torch.randn(n, c, h, w), torch.randn(n, c, h, w)
    total = 0.0
    for i in range(n):
        for j in range(c):
            zs = [float(v) / tau for v in s[i, j].flatten()]
            zt = [float(v) / tau for v in t[i, j].flatten()]
            ps = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
            pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
            total += sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    expected = tau**2 * total / (n * c)
    assert DISTANCES.get("cwd")(s, t, tau=tau).item() == pytest.approx(expected, rel=1e-5)


def test_pearson_against_numpy_corrcoef():
    torch.manual_seed(5)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    a, b = f64(s), f64(t)
    inter = 1 - np.mean([np.corrcoef(a[i], b[i])[0, 1] for i in range(4)])
    intra = 1 - np.mean([np.corrcoef(a[:, k], b[:, k])[0, 1] for k in range(6)])
    fn = DISTANCES.get("pearson")
    assert fn(s, t).item() == pytest.approx(inter + intra, rel=1e-5)
    assert fn(s, t, beta=2.0, gamma=0.0).item() == pytest.approx(2 * inter, rel=1e-5)
    # DIST on logits: softmax with a temperature first, times tau^2
    tau = 2.0
    ya, yb = softmax_np(a / tau, 1), softmax_np(b / tau, 1)
    inter = 1 - np.mean([np.corrcoef(ya[i], yb[i])[0, 1] for i in range(4)])
    intra = 1 - np.mean([np.corrcoef(ya[:, k], yb[:, k])[0, 1] for k in range(6)])
    got = fn(s, t, softmax=True, tau=tau).item()
    assert got == pytest.approx(tau**2 * (inter + intra), rel=1e-5)


def test_gram_l2_by_loops():
    torch.manual_seed(6)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    a, b = f64(s).reshape(2, 3, 4), f64(t).reshape(2, 3, 4)
    sq = []
    for n in range(2):
        for i in range(3):
            for j in range(3):
                gs = sum(a[n, i, k] * a[n, j, k] for k in range(4)) / 4
                gt = sum(b[n, i, k] * b[n, j, k] for k in range(4)) / 4
                sq.append((gs - gt) ** 2)
    assert DISTANCES.get("gram_l2")(s, t).item() == pytest.approx(np.mean(sq), rel=1e-5)
    # 2-D rows (sample-wise reshape): G = X X^T / D
    x, y = f64(s).reshape(2, -1), f64(t).reshape(2, -1)
    expected = np.mean((x @ x.T / 12 - y @ y.T / 12) ** 2)
    got = DISTANCES.get("gram_l2")(s.reshape(2, -1), t.reshape(2, -1)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def _block_mean(x: np.ndarray, level: int) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, level, h // level, level, w // level).mean(axis=(3, 5))


def test_hcl_is_weighted_sum_of_pooled_mses():
    torch.manual_seed(7)
    fn = DISTANCES.get("hcl")
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    a, b = f64(s), f64(t)

    def m(x, y):
        return ((x - y) ** 2).mean()

    # 8x8: full, 4x4 (1/2), 2x2 (1/4), 1x1 (1/8); normalised by 1 + 1/2 + 1/4 + 1/8
    expected = (m(a, b) + sum(w * m(_block_mean(a, lv), _block_mean(b, lv))
                              for w, lv in [(0.5, 4), (0.25, 2), (0.125, 1)])) / 1.875
    assert fn(s, t).item() == pytest.approx(expected, rel=1e-5)
    # 4x4: level 4 is skipped without consuming a halving (ReviewKD)
    s4, t4 = s[..., :4, :4], t[..., :4, :4]
    a4, b4 = f64(s4), f64(t4)
    expected = (m(a4, b4) + 0.5 * m(_block_mean(a4, 2), _block_mean(b4, 2))
                + 0.25 * m(_block_mean(a4, 1), _block_mean(b4, 1))) / 1.75
    assert fn(s4, t4).item() == pytest.approx(expected, rel=1e-5)
    # 1x1: plain MSE
    s1, t1 = s[..., :1, :1], t[..., :1, :1]
    assert fn(s1, t1).item() == pytest.approx(m(f64(s1), f64(t1)), rel=1e-5)


def _hcl_by_definition(s: torch.Tensor, t: torch.Tensor, levels=(4, 2, 1)) -> torch.Tensor:
    """ReviewKD's loop: both maps pooled separately by adaptive average pooling, level by level."""
    h, w = s.shape[-2:]
    loss, weight, total = torch.nn.functional.mse_loss(s, t), 1.0, 1.0
    for level in levels:
        if level >= min(h, w):
            continue
        weight /= 2.0
        pool = torch.nn.functional.adaptive_avg_pool2d
        loss = loss + weight * torch.nn.functional.mse_loss(pool(s, level), pool(t, level))
        total += weight
    return loss / total


@pytest.mark.parametrize("hw", [(28, 28), (14, 14), (7, 7), (6, 10), (3, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_hcl_equals_its_definition_in_value_and_gradient(hw, channels_last):
    """The fast HCL (pooled differences; nested average pools or one pooling matrix) is ReviewKD's
    loop on every map size: divisible (28), not (14 -> 4, 7 -> 4 and 2), non-square, tiny."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    s = torch.randn(3, 5, *hw, dtype=torch.float64).to(memory_format=fmt).requires_grad_(True)
    t = torch.randn(3, 5, *hw, dtype=torch.float64).to(memory_format=fmt)
    got, expected = DISTANCES.get("hcl")(s, t), _hcl_by_definition(s, t)
    (g_got,), (g_expected,) = torch.autograd.grad(got, s), torch.autograd.grad(expected, s)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-10, atol=1e-14)
    other = DISTANCES.get("hcl")(s, t, levels=(3, 1))  # levels that do not nest 28 -> 3
    assert other.item() == pytest.approx(_hcl_by_definition(s, t, (3, 1)).item(), rel=1e-12)


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_hcl_gradients_of_both_inputs_and_second_derivatives(hw, channels_last):
    """The hand-written backward: numerical gradients of s and t, and of the gradient itself
    (DistPro's exact hypergradient differentiates through it), nested pools and pooling matrix."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    s = torch.randn(2, 3, *hw, dtype=torch.float64).to(memory_format=fmt).requires_grad_(True)
    t = torch.randn(2, 3, *hw, dtype=torch.float64).to(memory_format=fmt).requires_grad_(True)
    fn = DISTANCES.get("hcl")
    assert torch.autograd.gradcheck(fn, (s, t))
    assert torch.autograd.gradgradcheck(fn, (s, t))


def test_at_distance_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    # squared differences: 1, 1, 0, 0 -> mean 0.5
    assert DISTANCES.get("at")(s, t).item() == pytest.approx(0.5)


# --------------------------------------------------------------------------- relation values


def _cka_feature_space(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_cka_value_and_invariances():
    fn = DISTANCES.get("cka")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4))
    y = rng.standard_normal((6, 3)) + 0.5 * x[:, :3]
    xt, yt = torch.tensor(x), torch.tensor(y)
    assert fn(xt, yt).item() == pytest.approx(1 - _cka_feature_space(x, y), rel=1e-9)
    assert fn(xt, xt).item() == pytest.approx(0.0, abs=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    assert fn(xt, torch.tensor(2.5 * x @ q)).item() == pytest.approx(0.0, abs=1e-12)
    assert fn(torch.tensor(3.0 * x @ q), yt).item() == pytest.approx(fn(xt, yt).item(), rel=1e-9)
    # not invariant to anisotropic scaling: the test above can fail
    aniso = torch.tensor(x * np.array([1.0, 10.0, 0.1, 1.0]))
    assert abs(fn(aniso, yt).item() - fn(xt, yt).item()) > 1e-3


def test_sp_by_loops():
    torch.manual_seed(8)
    s, t = torch.randn(3, 2, 2), torch.randn(3, 5)
    a, b = f64(s).reshape(3, -1), f64(t)

    def g(x):
        m = np.array([[x[i] @ x[j] for j in range(3)] for i in range(3)])
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    expected = ((g(a) - g(b)) ** 2).sum() / 9
    assert DISTANCES.get("sp")(s, t).item() == pytest.approx(expected, rel=1e-5)


def _smooth_l1(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def test_rkd_distance_and_angle_parts_by_loops():
    torch.manual_seed(9)
    n = 4
    s, t = torch.randn(n, 3), torch.randn(n, 5)
    a, b = f64(s), f64(t)

    def dist_potential(x):
        d = [[float(np.linalg.norm(x[i] - x[j])) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mu for j in range(n)] for i in range(n)]

    ds, dt = dist_potential(a), dist_potential(b)
    loss_d = sum(_smooth_l1(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2

    def cos_angle(x, i, j, k):
        u, v = x[i] - x[j], x[k] - x[j]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        return 0.0 if nu == 0 or nv == 0 else float(u @ v / nu / nv)

    loss_a = sum(_smooth_l1(cos_angle(a, i, j, k) - cos_angle(b, i, j, k))
                 for i in range(n) for j in range(n) for k in range(n)) / n**3

    fn = DISTANCES.get("rkd")
    got_d = fn(s, t, distance_weight=1.0, angle_weight=0.0).item()
    got_a = fn(s, t, distance_weight=0.0, angle_weight=1.0).item()
    assert got_d == pytest.approx(loss_d, rel=1e-4)
    assert got_a == pytest.approx(loss_a, rel=1e-4)
    assert fn(s, t).item() == pytest.approx(25 * loss_d + 50 * loss_a, rel=1e-4)


def test_rkd_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        DISTANCES.get("rkd")(torch.randn(1, 3), torch.randn(1, 3))


def test_pkt_value():
    torch.manual_seed(10)
    s, t = torch.randn(4, 3), torch.randn(4, 6)

    def cond(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        k = (x @ x.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = cond(f64(s)), cond(f64(t))
    eps = 1e-7
    expected = np.mean(pt * np.log((pt + eps) / (ps + eps)))
    assert DISTANCES.get("pkt")(s, t).item() == pytest.approx(expected, rel=1e-4)


def test_nst_by_loops_and_gram_equivalence():
    torch.manual_seed(11)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2)
    a, b = f64(s).reshape(2, 3, 4), f64(t).reshape(2, 4, 4)
    a = a / np.linalg.norm(a, axis=2, keepdims=True)
    b = b / np.linalg.norm(b, axis=2, keepdims=True)

    def k(x, y):
        return float(x @ y) ** 2

    per_sample = []
    for n in range(2):
        ss = np.mean([k(a[n, i], a[n, j]) for i in range(3) for j in range(3)])
        tt = np.mean([k(b[n, i], b[n, j]) for i in range(4) for j in range(4)])
        st = np.mean([k(a[n, i], b[n, j]) for i in range(3) for j in range(4)])
        per_sample.append(ss + tt - 2 * st)
    got = DISTANCES.get("nst")(s, t).item()
    assert got == pytest.approx(np.mean(per_sample), rel=1e-4)
    # the same number as the squared distance of spatial Gram matrices S^T S / Cs - T^T T / Ct
    gram = np.mean([np.sum((a[n].T @ a[n] / 3 - b[n].T @ b[n] / 4) ** 2) for n in range(2)])
    assert got == pytest.approx(gram, rel=1e-4)


def test_nst_many_channels_small_map_equals_the_channel_kernel():
    """Shapes with more channels than positions, where kdtune takes the Gram form: value and gradient equal
    the kernel means (which form runs is not observable here; benchmarks/nst_cost.py times it)."""
    torch.manual_seed(13)
    s, t = torch.randn(3, 9, 2, 2, dtype=torch.float64), torch.randn(3, 7, 2, 2, dtype=torch.float64)
    a, b = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)

    def kernel_mean(x, y):  # mean over channel pairs and samples of (x_i . y_j)^2
        return (x @ y.transpose(1, 2)).pow(2).mean()

    expected = kernel_mean(a, a) + kernel_mean(b, b) - 2 * kernel_mean(a, b)
    torch.testing.assert_close(DISTANCES.get("nst")(s, t), expected)
    # and the gradient too
    s.requires_grad_(True)
    (g_fast,) = torch.autograd.grad(DISTANCES.get("nst")(s, t), s)
    a = F.normalize(s.flatten(2), dim=2)
    (g_ref,) = torch.autograd.grad(kernel_mean(a, a) - 2 * kernel_mean(a, b), s)
    torch.testing.assert_close(g_fast, g_ref)


def test_nst_needs_equal_spatial_sizes():
    with pytest.raises(ShapeMismatchError, match="spatial"):
        DISTANCES.get("nst")(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))


def test_cc_taylor_value_and_convergence_to_rbf():
    torch.manual_seed(12)
    s, t = torch.randn(4, 3), torch.randn(4, 5)
    gamma = 0.4

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def taylor(x, order):
        x = unit(x)
        return np.array([[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * (x[i] @ x[j]) ** p
                              for p in range(order + 1)) for j in range(4)] for i in range(4)])

    expected = np.mean((taylor(f64(s), 2) - taylor(f64(t), 2)) ** 2)
    fn = DISTANCES.get("cc")
    assert fn(s, t).item() == pytest.approx(expected, rel=1e-4)

    def rbf(x):
        x = unit(x)
        return np.exp(-gamma * ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))

    exact = np.mean((rbf(f64(s)) - rbf(f64(t))) ** 2)
    assert fn(s, t, order=12).item() == pytest.approx(exact, rel=1e-3)
