"""MGDA (Adaptive Distillation eq. 4): the min-norm solver against brute force, and the strategy end to end."""

from itertools import combinations

import numpy as np
import pytest
import torch
from torch import nn

from helpers import TinyNet
from kdtune.distiller import Distiller
from kdtune.pathways import Pathway
from kdtune.weighting import MGDAWeighting, build_weighting, min_norm_weights
from kdtune.weighting.gradients import path_gradients
from kdtune.weighting.mgda import min_norm_2


def brute_force_min_norm(g: np.ndarray) -> tuple[float, np.ndarray]:
    """min ||sum v_i g_i||^2 over the simplex, by solving the KKT system on every support.

    An optimum lies in the relative interior of the face spanned by its support, where it solves
    the equality-constrained QP ``min v^T M v s.t. 1^T v = 1`` — a linear system. The best
    feasible (v >= 0) solution over all 2^K - 1 supports is the exact optimum.
    Returns (optimal squared norm, the min-norm point sum v_i g_i).
    """
    k = g.shape[0]
    m = g @ g.T
    best_val, best_point = np.inf, None
    for size in range(1, k + 1):
        for support in combinations(range(k), size):
            s = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = 2 * m[np.ix_(s, s)]
            kkt[:size, size] = 1.0
            kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if np.all(sol >= -1e-12) and abs(sol.sum() - 1) < 1e-9:
                point = sol @ g[s]
                val = float(point @ point)
                if val < best_val:
                    best_val, best_point = val, point
    return best_val, best_point


def random_gradient_sets():
    rng = np.random.default_rng(0)
    cases = []
    for k in (2, 3, 4, 5, 6):
        for d in (1, 2, 3, 8, 40):
            for _ in range(4):
                # Mixed scales (an AT path's gradients are orders of magnitude below KD's) and a
                # shared offset, so that some optima are interior, some on faces, some vertices.
                scales = 10.0 ** rng.uniform(-3, 1, size=(k, 1))
                g = rng.normal(size=(k, d)) * scales + rng.normal(size=(1, d)) * rng.uniform(0, 2)
                cases.append(g)
    return cases


@pytest.mark.parametrize("case", range(100))
def test_min_norm_matches_brute_force(case):
    g = random_gradient_sets()[case]
    w = min_norm_weights(g @ g.T)
    assert w.shape == (g.shape[0],) and np.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-12)
    point = w @ g
    best_val, best_point = brute_force_min_norm(g)
    scale = float(np.max(np.sum(g * g, axis=1)))
    # Same squared norm and the same (unique) min-norm point, relative to the gradients' scale.
    assert abs(point @ point - best_val) <= 1e-4 * scale
    assert np.linalg.norm(point - best_point) <= 1e-4 * np.sqrt(scale)


@pytest.mark.parametrize("case", range(0, 100, 3))
def test_min_norm_direction_increases_no_path_loss_to_first_order(case):
    # Optimality of eq. 4: g_i . d >= ||d||^2 for all i, so the step -d has a non-positive
    # directional derivative for every path loss (Sener & Koltun 2018, Thm. 1).
    g = random_gradient_sets()[case]
    d = min_norm_weights(g @ g.T) @ g
    scale = float(np.max(np.sum(g * g, axis=1)))
    directional = g @ (-d)  # first-order change of each f_i along -d, per unit step
    assert np.all(directional <= 1e-6 * scale)
    assert np.all(g @ d >= d @ d - 1e-6 * scale)


def test_two_paths_closed_form():
    g = np.array([[1.0, 0.0], [0.0, 2.0]])
    w, val = min_norm_2(g @ g.T)
    # ||(a, 2(1 - a))||^2 minimised at a = 4/5.
    assert w == pytest.approx([0.8, 0.2]) and val == pytest.approx(0.8)
    # One gradient inside the other's direction: all weight on the shorter one.
    g = np.array([[1.0, 1.0], [3.0, 3.0]])
    assert min_norm_weights(g @ g.T) == pytest.approx([1.0, 0.0])


def test_degenerate_gram_matrices():
    assert min_norm_weights(np.zeros((3, 3))) == pytest.approx([1 / 3] * 3)
    assert min_norm_weights(np.ones((1, 1))) == pytest.approx([1.0])
    g = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0]])  # the origin is in the hull
    w = min_norm_weights(g @ g.T)
    assert np.linalg.norm(w @ g) < 1e-6
    with pytest.raises(ValueError, match="square"):
        min_norm_weights(np.zeros((2, 3)))


def test_path_gradients_zero_where_a_path_does_not_reach():
    net = TinyNet()
    x = torch.randn(4, 1, 8, 8)
    early = net.blocks[0](x).pow(2).mean()  # never reaches blocks[1] or the head
    late = net(x).pow(2).mean()
    params = list(net.parameters())
    g = path_gradients([early, late], params)
    assert g.shape == (2, sum(p.numel() for p in params))
    n_first = sum(p.numel() for p in net.blocks[0].parameters())
    assert g[0, n_first:].abs().max() == 0 and g[0, :n_first].abs().max() > 0
    assert g[1, n_first:].abs().max() > 0
    # The graph is kept: the trainer's backward still works afterwards.
    (early + late).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(g.sum(0), expected, atol=1e-6)


def tiny_distiller(weighting, **kwargs):
    torch.manual_seed(0)
    return Distiller(TinyNet(), TinyNet(width=6), pathways=[
        Pathway("blocks.0", "blocks.0", method="at"), Pathway("blocks.1", "blocks.1", method="at")],
        logit_losses=["kd", "l2_logit"], weighting=weighting, weighting_kwargs=kwargs, input_shape=(1, 8, 8))


def test_mgda_gradient_is_task_plus_alpha_min_norm_direction():
    alpha = 0.7
    distiller = tiny_distiller("mgda", alpha=alpha, fixed=[])  # the paper's form: kd is a path too
    w = distiller.weighting
    assert w.path_names == ["kd", "l2_logit", "at"]  # AT summed over layers: one path
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    student = [p for p in distiller.student.parameters()]

    out = distiller(x, y)
    out["loss"].backward()
    got = torch.cat([p.grad.reshape(-1) for p in student])
    v = torch.tensor([out[f"w/{n}"].item() for n in ("kd", "l2_logit", "at:blocks.0->blocks.0")]) / alpha
    assert v.sum().item() == pytest.approx(1.0, abs=1e-6) and (v >= 0).all()
    assert w.weights.tolist() == pytest.approx(v.tolist(), abs=1e-6)

    # An independent recomputation on a fresh forward of the same batch: per-path gradients.
    for p in student:
        p.grad = None
    teacher_out = distiller.teacher_forward(x)
    logits = distiller.student(x)
    terms = distiller.distill_terms(logits, y, teacher_out)
    paths = [terms["kd"], terms["l2_logit"], terms["at:blocks.0->blocks.0"] + terms["at:blocks.1->blocks.1"]]
    g = path_gradients(paths, student)
    task = path_gradients([torch.nn.functional.cross_entropy(logits, y)], student)[0]
    v_ref = torch.as_tensor(min_norm_weights(g.double() @ g.double().T), dtype=torch.float32)
    assert v.tolist() == pytest.approx(v_ref.tolist(), abs=1e-4)
    d = v_ref @ g
    assert torch.allclose(got, task + alpha * d, atol=1e-5, rtol=1e-4)
    # No path's loss increases to first order along -d.
    assert (g @ d >= -1e-7).all()
    # Fig. 4c: cosine similarities between path gradients are logged.
    cos = (g[0] @ g[2]) / (g[0].norm() * g[2].norm())
    assert out["cos/kd|at"].item() == pytest.approx(cos.item(), abs=1e-4)


@pytest.mark.parametrize("fixed", [None, ["kd"]])
def test_mgda_with_kd_fixed_solves_eq_4_over_the_other_paths_only(fixed):
    """Plain KD stays at its weight by default (fixed=None means ["kd"] beside other paths), as ["kd"] says."""
    distiller = tiny_distiller("mgda", fixed=fixed)
    w = distiller.weighting
    assert w.path_names == ["l2_logit", "at"] and w.fixed_terms == ["kd"]
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    student = list(distiller.student.parameters())
    out = distiller(x, y)
    out["loss"].backward()
    got = torch.cat([p.grad.reshape(-1) for p in student])
    assert out["w/kd"].item() == pytest.approx(1.0)  # kd's catalogue weight
    for p in student:
        p.grad = None
    logits = distiller.student(x)
    terms = distiller.distill_terms(logits, y, distiller.teacher_forward(x))
    g = path_gradients([terms["l2_logit"], terms["at:blocks.0->blocks.0"] + terms["at:blocks.1->blocks.1"]], student)
    fixed, task = path_gradients([terms["kd"], torch.nn.functional.cross_entropy(logits, y)], student)
    v = torch.as_tensor(min_norm_weights(g.double() @ g.double().T), dtype=torch.float32)
    assert w.weights.tolist() == pytest.approx(v.tolist(), abs=1e-4)
    assert torch.allclose(got, task + fixed + v @ g, atol=1e-5, rtol=1e-4)


def test_mgda_reuses_last_weights_without_a_graph_and_checkpoints_them():
    distiller = tiny_distiller("mgda", fixed=[])
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    distiller(x, y)
    solved = distiller.weighting.weights.clone()
    with torch.no_grad():
        out = distiller(x, y)
    assert out["w/kd"].item() == pytest.approx(solved[0].item())
    assert "weighting.weights" in distiller.state_dict()


def test_mgda_single_path_and_unbound_errors():
    w = build_weighting("mgda", ["kd"], {})
    total, used = w({"kd": torch.tensor(2.0, requires_grad=True)})
    assert total.item() == 2.0 and used == {"kd": 1.0}
    w = MGDAWeighting(["a", "b"], {})
    with pytest.raises(RuntimeError, match="bind"):
        w({"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(2.0, requires_grad=True)})
    w.bind(nn.Linear(2, 2))  # a module given directly is the parameter owner
    assert w._student is not None and "_student" not in dict(w.named_modules())
