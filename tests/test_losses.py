"""Tests for kdtune.losses: the method catalogue and the logit losses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdtune.distances import DISTANCES
from kdtune.losses import LOSSES, LossSpec, dist, dkd, get_loss, kd, l2_logit
from kdtune.transforms import TRANSFORMS, ShapeMismatchError, build_transform

LOGIT = [n for n in LOSSES.names() if LOSSES.get(n).kind == "logit"]
FEATURE = [n for n in LOSSES.names() if LOSSES.get(n).kind == "feature"]


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().astype(np.float64)


def softmax_np(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def logits_case(seed: int = 0, n: int = 4, k: int = 5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g) * 2
    t = torch.randn(n, k, generator=g) * 2
    y = torch.randint(0, k, (n,), generator=g)
    return s, t, y


# --------------------------------------------------------------------------- catalogue


def test_catalogue_has_the_methods():
    assert set(LOGIT) == {"kd", "l2_logit", "dkd", "dist"}
    assert set(FEATURE) >= {"fitnets", "at", "sp", "rkd", "pkt", "nst", "cc", "cwd", "reviewkd", "hcl", "cka"}


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_spec_is_consistent_and_described(name):
    spec = get_loss(name)
    assert isinstance(spec, LossSpec) and spec.name == name
    assert spec.doc and spec.__doc__ == spec.doc
    assert LOSSES.describe(name) == spec.doc.splitlines()[0]
    assert spec.weight > 0
    if spec.kind == "feature":
        assert spec.transform in TRANSFORMS and spec.distance in DISTANCES and spec.fn is None


def test_lossspec_class_keeps_its_own_docstring():
    assert LossSpec.__doc__.startswith("A named distillation method")


@pytest.mark.parametrize("name", LOGIT)
def test_every_logit_loss_finite_gradient_zero_on_equal(name):
    spec = get_loss(name)
    s, t, y = logits_case()
    s.requires_grad_(True)
    loss = spec(s, t, y)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert abs(spec(t, t.clone(), y).item()) < 1e-5


@pytest.mark.parametrize("name", FEATURE)
def test_every_feature_method_runs_through_its_transform(name):
    spec = get_loss(name)
    torch.manual_seed(0)
    s = torch.randn(4, 3, 8, 8, requires_grad=True)
    t = torch.randn(4, 6, 4, 4)
    tf = build_transform(spec.transform, s.shape, t.shape)
    fn = DISTANCES.get(spec.distance)
    s_out, t_out = tf(s, t)
    loss = fn(s_out, t_out, **spec.kwargs)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    for p in tf.parameters():
        assert p.grad is not None


def test_usual_weights():
    expected = {"fitnets": 100.0, "at": 500.0, "sp": 3000.0, "rkd": 1.0, "pkt": 30000.0, "nst": 50.0,
                "cc": 0.02, "kd": 1.0, "dkd": 1.0, "reviewkd": 1.0}
    assert {k: get_loss(k).weight for k in expected} == expected
    assert get_loss("rkd").kwargs == {"distance_weight": 25.0, "angle_weight": 50.0}
    assert get_loss("dkd").kwargs == {"alpha": 1.0, "beta": 8.0, "tau": 4.0}


def test_nst_compares_the_student_as_it_is():
    """NST's default pathway has no adapter (its paper's form): nothing to train, channels untouched, the larger
    (teacher) map pooled to the student's size -- the value is the distance on the pooled teacher map."""
    spec = get_loss("nst")
    torch.manual_seed(3)
    s, t = torch.randn(4, 12, 2, 2), torch.randn(4, 5, 4, 4)  # a wide, coarse student; a narrow, fine teacher
    tf = build_transform(spec.transform, s.shape, t.shape)
    assert list(tf.parameters()) == []
    s_out, t_out = tf(s, t)
    assert s_out is s and t_out.shape == (4, 5, 2, 2)
    expected = DISTANCES.get("nst")(s, F.adaptive_avg_pool2d(t, 2), **spec.kwargs)
    torch.testing.assert_close(DISTANCES.get(spec.distance)(s_out, t_out, **spec.kwargs), expected)


def test_get_loss_unknown_name_suggests():
    with pytest.raises(KeyError, match="fitnets"):
        get_loss("fitnet")
    spec = get_loss("kd")
    assert get_loss(spec) is spec


def test_spec_validation_and_immutability():
    with pytest.raises(ValueError):
        LossSpec("bad", "logit")
    with pytest.raises(ValueError):
        LossSpec("bad", "feature", transform="conv1x1")
    with pytest.raises(KeyError, match="conv1x1"):
        LossSpec("bad", "feature", transform="conv1x", distance="mse")
    with pytest.raises(ValueError):
        LossSpec("bad", "other", fn=kd)  # type: ignore[arg-type]
    kwargs = {"tau": 2.0}
    spec = LossSpec("mine", "logit", fn=kd, kwargs=kwargs, doc="Mine.")
    kwargs["tau"] = 100.0
    assert spec.kwargs == {"tau": 2.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.weight = 2.0  # type: ignore[misc]
    assert "mine" not in LOSSES  # building a spec does not register it


def test_spec_call_applies_defaults_and_overrides():
    s, t, y = logits_case(1)
    spec = get_loss("kd")
    assert spec(s, t, y).item() == pytest.approx(kd(s, t, tau=4.0).item())
    assert spec(s, t, y, tau=1.0).item() == pytest.approx(kd(s, t, tau=1.0).item())
    assert spec(s, t, y, tau=1.0).item() != pytest.approx(spec(s, t, y).item())
    with pytest.raises(TypeError, match="pathway"):
        get_loss("at")(s, t, y)


# --------------------------------------------------------------------------- logit values


@pytest.mark.filterwarnings("ignore:reduction")
def test_kd_explicit_sum_and_batchmean_not_mean():
    s, t, _ = logits_case(2, n=3, k=4)
    tau = 4.0
    ps, pt = softmax_np(f64(s) / tau), softmax_np(f64(t) / tau)
    n, k = ps.shape
    expected = sum(pt[i, j] * np.log(pt[i, j] / ps[i, j]) for i in range(n) for j in range(k)) / n * tau**2
    got = kd(s, t, tau=tau).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # reduction="mean" would divide by N*K instead of N: K times smaller
    wrong = F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="mean").item() * tau**2
    assert got == pytest.approx(k * wrong, rel=1e-5)
    assert got != pytest.approx(wrong, rel=1e-2)


def test_kd_ce_form_is_kl_plus_teacher_entropy():
    """Adaptive Distillation eq. 6: tau^2 CE(q_T, q_S) = tau^2 KL(q_T || q_S) + tau^2 H(q_T), same gradient."""
    s, t, _ = logits_case(4, n=5, k=6)
    tau = 3.0
    pt = softmax_np(f64(t) / tau)
    entropy = -(pt * np.log(pt)).sum(1).mean()
    s_kl, s_ce = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    kl, ce = kd(s_kl, t, tau=tau), kd(s_ce, t, tau=tau, form="ce")
    assert ce.item() == pytest.approx(kl.item() + tau**2 * entropy, rel=1e-5)
    assert ce.item() > kl.item() + 1.0  # the entropy term is not negligible here
    kl.backward()
    ce.backward()
    torch.testing.assert_close(s_ce.grad, s_kl.grad)
    with pytest.raises(ValueError, match="kd form 'js'.*'kl', 'ce'"):
        kd(s, t, form="js")


def test_kd_rejects_mismatched_logits():
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3\)"):
        kd(torch.randn(2, 3), torch.randn(2, 4))


def test_l2_logit_value():
    s, t, _ = logits_case(3)
    d = f64(s) - f64(t)
    assert l2_logit(s, t).item() == pytest.approx((d**2).sum(axis=1).mean(), rel=1e-5)
    assert l2_logit(s, t, squared=False).item() == pytest.approx(
        np.sqrt((d**2).sum(axis=1)).mean(), rel=1e-5)


def _dkd_explicit(s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, beta: float, tau: float):
    ps, pt = softmax_np(s / tau), softmax_np(t / tau)
    tckd = nckd = 0.0
    for i, gt in enumerate(y):
        bs = np.array([ps[i, gt], 1 - ps[i, gt]])
        bt = np.array([pt[i, gt], 1 - pt[i, gt]])
        tckd += np.sum(bt * np.log(bt / bs))
        others = [j for j in range(s.shape[1]) if j != gt]
        qs = ps[i, others] / ps[i, others].sum()
        qt = pt[i, others] / pt[i, others].sum()
        nckd += np.sum(qt * np.log(qt / qs))
    n = len(y)
    return alpha * tau**2 * tckd / n + beta * tau**2 * nckd / n


def test_dkd_against_explicit_tckd_nckd():
    s, t, y = logits_case(4, n=3, k=4)
    expected = _dkd_explicit(f64(s), f64(t), y.numpy(), alpha=1.0, beta=8.0, tau=4.0)
    assert dkd(s, t, y).item() == pytest.approx(expected, rel=1e-5)
    expected = _dkd_explicit(f64(s), f64(t), y.numpy(), alpha=0.5, beta=2.0, tau=2.0)
    assert dkd(s, t, y, alpha=0.5, beta=2.0, tau=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_dkd_reformulates_kd_for_one_sample():
    # Zhao et al. 2022, eq. 5: KD = TCKD + (1 - p_gt^t) NCKD (per sample)
    s, t, y = logits_case(5, n=1, k=6)
    tau = 2.0
    tckd = dkd(s, t, y, alpha=1.0, beta=0.0, tau=tau).item()
    nckd = dkd(s, t, y, alpha=0.0, beta=1.0, tau=tau).item()
    p_gt = softmax_np(f64(t) / tau)[0, y.item()]
    assert kd(s, t, tau=tau).item() == pytest.approx(tckd + (1 - p_gt) * nckd, rel=1e-5)


def test_dkd_needs_valid_targets():
    s, t, _ = logits_case(6)
    with pytest.raises(ValueError, match="targets"):
        dkd(s, t, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets"):
        dkd(s, t, torch.zeros(3, dtype=torch.long))


def test_dist_against_numpy_corrcoef():
    s, t, _ = logits_case(7, n=4, k=5)
    ys, yt = softmax_np(f64(s)), softmax_np(f64(t))
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(4)])
    intra = 1 - np.mean([np.corrcoef(ys[:, k], yt[:, k])[0, 1] for k in range(5)])
    assert dist(s, t).item() == pytest.approx(inter + intra, rel=1e-5)
    assert dist(s, t, beta=1.0, gamma=0.0).item() == pytest.approx(inter, rel=1e-5)
