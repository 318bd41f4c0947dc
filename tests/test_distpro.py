"""DistPro search (kdtune.search.distpro): hypergradients, functional look-ahead, dropping, trainer run."""

from __future__ import annotations

import copy
import gzip
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import TinyNet, kdtune_run
from kdtune.checkpoint import load_checkpoint
from kdtune.config import TrainConfig
from kdtune.data import BatchLoader, train_val_split
from kdtune.distiller import Distiller
from kdtune.losses import LOSSES
from kdtune.search.distpro import (
    DistProCallback,
    DistProSearch,
    logit_losses_from_process,
    logit_pathway,
    pathways_from_process,
    search_space,
    virtual_step,
)
from kdtune.trainer import Callback, Trainer
from kdtune.weighting.process import DistProWeighting, Process, distance_from_uniform, normalize

SHAPE = (1, 8, 8)


def make(tau=None, transforms=("conv1x1", "distpro"), double=False, alpha_init=None, learn_g=False):
    torch.manual_seed(0)
    teacher, student = TinyNet(width=6), TinyNet(width=4)
    pathways, infos = search_space(teacher, student, SHAPE, connections="all", transforms=transforms)
    d = Distiller(student, teacher, pathways, weighting="distpro",
                  weighting_kwargs={"learned": [p.name for p in pathways], "tau": tau, "learn_g": learn_g},
                  input_shape=SHAPE)
    if double:
        d.double()
    if alpha_init is not None:
        d.weighting.alpha_tilde.copy_(torch.as_tensor(alpha_init, dtype=d.weighting.alpha_tilde.dtype))
    return d, infos


def make_optimizer(d, kind):
    params = [p for p in d.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if kind == "sgd_plain":
        return torch.optim.SGD(params, lr=0.1)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)


def batches(double=False, n=6):
    g = torch.Generator().manual_seed(1)
    dtype = torch.float64 if double else torch.float32
    x = torch.randn(n, *SHAPE, generator=g, dtype=dtype)
    xv = torch.randn(n, *SHAPE, generator=g, dtype=dtype)
    return x, torch.arange(n) % 10, xv, (torch.arange(n) + 3) % 10


def real_step(d, opt, x, y, step=0):
    opt.zero_grad(set_to_none=True)
    d(x, y, step)["loss"].backward()
    opt.step()


def twin(d, opt, kind, **kw):
    """An identical, independent distiller + optimiser (deepcopy would share the capture hooks)."""
    d2, _ = make(double=next(d.parameters()).dtype == torch.float64, **kw)
    d2.load_state_dict(d.state_dict())
    opt2 = make_optimizer(d2, kind)
    # deepcopy: Optimizer.load_state_dict keeps the very tensors of the momentum buffers, which
    # opt2.step() would then update in place under opt's feet.
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    return d2, opt2


def warmed(kind, double=False, **kw):
    """A distiller with non-trivial α̃ and an optimiser that already holds momentum / moments."""
    g = torch.Generator().manual_seed(3)
    d, infos = make(double=double, **kw)
    n = len(d.weighting.learned)
    d.weighting.alpha_tilde.copy_(1.0 + torch.randn(n, generator=g, dtype=torch.float64).to(d.weighting.alpha_tilde))
    opt = make_optimizer(d, kind)
    d.train()
    x, y, _, _ = batches(double, n=8)
    real_step(d, opt, x, y)
    return d, opt


def cosine(a, b):
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def test_search_space_names_stages_and_count():
    d, infos = make(transforms=("conv1x1", "conv3x3", "distpro"))
    assert len(d.pathways) == 2 * 2 * 3  # TinyNet: 2 stages each; all pairs x 3 transforms
    assert infos[0].name == "t0-s0:conv1x1" and infos[0].teacher == "blocks.0" and infos[0].distance == "hcl"
    _, infos_j = search_space(TinyNet(6), TinyNet(4), SHAPE, connections="j>=i", transforms=("conv1x1",))
    assert [p.name for p in infos_j] == ["t0-s0:conv1x1", "t0-s1:conv1x1", "t1-s1:conv1x1"]


def test_normalizations_of_table_7():
    a = torch.tensor([0.5, 1.0, -2.0])
    assert torch.allclose(normalize(a), torch.softmax(torch.cat([a, torch.ones(1)]), 0)[:3])
    assert normalize(a).sum() < 1  # the bias term keeps some mass back
    assert torch.allclose(normalize(a, "softmax").sum(), torch.tensor(1.0))
    assert torch.allclose(normalize(a, "l1_biased"), a.abs() / (a.abs().sum() + 1))
    assert torch.allclose(normalize(a, "l1"), a.abs() / a.abs().sum())
    assert torch.equal(normalize(a, "raw"), torch.tensor([0.5, 1.0, 0.0]))
    assert torch.allclose(normalize(a, "sigmoid"), torch.sigmoid(a))
    with pytest.raises(ValueError, match="biased_softmax"):
        normalize(a, "softmx")


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_virtual_step_equals_real_optimiser_step(kind):
    d, opt = warmed(kind)
    x, y, _, _ = batches()
    params = dict(d.named_parameters())
    loss = d(x, y)["loss"]
    names = [n for n, p in params.items() if p.requires_grad]
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    g = {n: gr for n, gr in zip(names, grads, strict=True) if gr is not None}
    theta1 = virtual_step({n: p.detach() for n, p in params.items()}, g, opt, params)
    for n, p in params.items():  # the real step with the same gradients
        p.grad = g.get(n)
    opt.step()
    for n in g:
        assert torch.allclose(theta1[n], params[n].detach(), atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("fused", [False, True])
def test_pathway_step_equals_a_plain_per_pathway_computation(fused):
    """The fast step (fast teacher, HCL of the pooled difference, 1x1 adapters at the teacher's size,
    optionally fused input convs) gives the loss and gradients of the straightforward computation: the
    teacher's own hooked forward, conv -> BN -> resize for every 1x1 adapter, and ReviewKD's HCL loop
    pooling both maps, pathway by pathway (12x12 and 6x6 maps: nested pools and the pooling matrix)."""
    from kdtune.transforms import Conv1x1Adapter, resize_spatial

    shape = (1, 12, 12)
    kwargs = {"conv3x3": {"pool_first": True}, "distpro": {"pool_first": True}}
    models = []
    for _ in range(2):  # two identical distillers: each step moves its own BatchNorm statistics
        torch.manual_seed(0)
        teacher, student = TinyNet(width=6), TinyNet(width=4)
        pathways, _ = search_space(teacher, student, shape, "all", ("conv1x1", "conv3x3", "distpro"),
                                   transform_kwargs=kwargs)
        d = Distiller(student, teacher, pathways, ["kd"], weighting="distpro",
                      weighting_kwargs={"learned": [p.name for p in pathways]}, input_shape=shape).double()
        d.weighting.alpha_tilde.copy_(torch.linspace(0.5, 1.5, len(pathways), dtype=torch.float64))
        d.fuse_input_convs = fused
        models.append(d.train())
    fast, ref = models
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, *shape, generator=g, dtype=torch.float64), torch.arange(6) % 10
    loss = fast(x, y)["loss"]

    def hcl_by_definition(s, t):
        pool, total, weight = F.adaptive_avg_pool2d, 1.0, 1.0
        out = F.mse_loss(s, t)
        for level in (4, 2, 1):
            if level < min(s.shape[-2:]):
                weight /= 2
                out, total = out + weight * F.mse_loss(pool(s, level), pool(t, level)), total + weight
        return out / total

    t_logits, t_feats = ref._teacher_runner.reference(x)
    logits = ref.student(x)
    terms = {"kd": LOSSES.get("kd").fn(logits, t_logits, y, **ref.logit_losses[0].kwargs)}
    for p, s_path, t_path in zip(ref.pathways, ref._student_paths, ref._teacher_paths, strict=True):
        s, t, tf = ref._student_capture[s_path], t_feats[t_path], p.transform
        aligned = (resize_spatial(tf.bn(tf.conv(s)), t.shape[-2:]) if isinstance(tf, Conv1x1Adapter)
                   else tf(s, t)[0])
        terms[p.name] = hcl_by_definition(aligned, t)
    distill, _ = ref.weighting(terms, 0)
    expected = F.cross_entropy(logits, y) + distill
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    params, params_ref = list(fast.parameters()), list(ref.parameters())
    for (name, _), a, b in zip(fast.named_parameters(), torch.autograd.grad(loss, params, allow_unused=True),
                               torch.autograd.grad(expected, params_ref, allow_unused=True), strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11, msg=name)
    for (name, a), b in zip(fast.named_buffers(), ref.buffers(), strict=True):  # BN running statistics
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_alpha_gradient_from_the_weighted_terms_equals_it_through_the_whole_loss():
    """The θ± passes run the network without a graph and differentiate only the weighting of its
    terms: the same ∇α̃ L_train as autograd through the whole loss."""
    d, opt = warmed("sgd", double=True, learn_g=True)
    x, y, _, _ = batches(True)
    search = DistProSearch(d)
    t = d.teacher_forward(x)
    params = {n: p.detach() + 0.01 for n, p in d.named_parameters()}  # some θ other than the module's
    alpha = d.weighting.alpha_tilde.detach().clone().requires_grad_(True)
    g = d.weighting.g_tilde.detach().clone().requires_grad_(True)
    loss = search._train_loss(params, {"alpha_tilde": alpha, "g_tilde": g}, x, y, 3, t)
    expected = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(loss, [alpha, g])])
    got = search._alpha_grad(params, x, y, 3, t)
    assert got.shape == (len(d.weighting.learned) + 1,) and expected.abs().max() > 0 and expected[-1] != 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("learn_g", [False, True])
def test_finite_difference_agrees_with_exact(learn_g):
    """Eq. 5 against double backward on a small network (cosine >= 0.99); with g learned, g's entry too."""
    d, opt = warmed("sgd", learn_g=learn_g)
    x, y, xv, yv = batches()
    fd = DistProSearch(d, "finite_difference").hypergradient(x, y, xv, yv, opt)
    exact = DistProSearch(d, "exact").hypergradient(x, y, xv, yv, opt)
    assert exact.abs().max() > 0
    assert cosine(fd, exact) >= 0.99, (fd, exact)
    assert torch.allclose(fd, exact, rtol=0.1, atol=0.05 * float(exact.abs().max()))
    assert fd.shape == (len(d.weighting.learned) + learn_g,)


@pytest.mark.parametrize("kind,learn_g", [("sgd", False), ("adamw", False), ("sgd_plain", False), ("sgd", True)])
def test_exact_agrees_with_brute_force_derivative(kind, learn_g):
    """∂/∂α̃_k L_val(θ'(α̃)) (and ∂/∂g with g learned), θ' made by the *real* optimiser, by central
    differences (float64)."""
    d, opt = warmed(kind, double=True, learn_g=learn_g)
    x, y, xv, yv = batches(double=True)
    exact = DistProSearch(d, "exact").hypergradient(x, y, xv, yv, opt)
    n = len(d.weighting.learned)

    def l_val(hyper):
        d2, opt2 = twin(d, opt, kind, learn_g=learn_g)
        d2.weighting.alpha_tilde.copy_(hyper[:n])
        if learn_g:
            d2.weighting.g_tilde.copy_(hyper[n])
        d2.train()
        real_step(d2, opt2, x, y)
        return float(F.cross_entropy(d2.student(xv), yv).detach())

    h = 1e-4
    base = torch.cat([d.weighting.alpha_tilde, d.weighting.g_tilde.reshape(1)] if learn_g
                     else [d.weighting.alpha_tilde]).clone()
    numeric = torch.zeros_like(base)
    for k in range(len(base)):
        e = torch.zeros_like(base)
        e[k] = h
        numeric[k] = (l_val(base + e) - l_val(base - e)) / (2 * h)
    assert numeric.abs().max() > 0
    assert torch.allclose(exact, numeric, rtol=1e-4, atol=1e-6 * float(numeric.abs().max()) + 1e-10), (exact, numeric)


@pytest.mark.parametrize("mode", ["finite_difference", "exact"])
def test_lookahead_leaves_no_trace(mode):
    """After a search step + real step, parameters and BN buffers equal one real step alone."""
    d, opt = warmed("sgd")
    d_ref, opt_ref = twin(d, opt, "sgd")
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    x, y, xv, yv = batches()
    d.train()
    d_ref.train()
    search = DistProSearch(d, mode)
    t, hyper = search.step(x, y, xv, yv, opt, step=1)
    assert not torch.equal(d.weighting.alpha_tilde, d_ref.weighting.alpha_tilde)  # α moved
    d.reuse_teacher_output(x, t)
    real_step(d, opt, x, y, step=1)
    d_ref.weighting.alpha_tilde.copy_(d.weighting.alpha_tilde)  # the reference uses the same α_t
    d_ref.weighting.alpha_exp_avg.copy_(d.weighting.alpha_exp_avg)
    d_ref.weighting.alpha_exp_avg_sq.copy_(d.weighting.alpha_exp_avg_sq)
    d_ref.weighting.alpha_updates.copy_(d.weighting.alpha_updates)
    real_step(d_ref, opt_ref, x, y, step=1)
    mine, ref = d.state_dict(), d_ref.state_dict()
    assert mine.keys() == ref.keys()
    for k in ref:
        assert torch.equal(mine[k], ref[k]), k  # params, BN running stats, num_batches_tracked
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    for p, q in zip(opt.param_groups[0]["params"], opt_ref.param_groups[0]["params"], strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])


def test_shared_forward_gives_the_same_step_with_one_student_forward_fewer():
    """share_forward: the look-ahead's pass at θ is the real step's forward, re-weighted with the new α:
    the same hypergradient, α̃, parameters, BN statistics, momentum and logged terms as two passes."""
    d, opt = warmed("sgd")
    d_ref, opt_ref = twin(d, opt, "sgd")
    x, y, xv, yv = batches()
    forwards = {"shared": 0, "separate": 0}
    d.student.register_forward_hook(lambda *a: forwards.__setitem__("shared", forwards["shared"] + 1))
    d_ref.student.register_forward_hook(lambda *a: forwards.__setitem__("separate", forwards["separate"] + 1))
    outs = []
    for model, optimizer, share in ((d, opt, True), (d_ref, opt_ref, False)):
        model.train()
        t, hyper = DistProSearch(model).step(x, y, xv, yv, optimizer, step=2, share_forward=share)
        model.reuse_teacher_output(x, t)
        out = model(x, y, 2)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        outs.append((hyper, out))
    (hyper, out), (hyper_ref, out_ref) = outs
    torch.testing.assert_close(hyper, hyper_ref, rtol=1e-5, atol=1e-7)
    assert out.keys() == out_ref.keys()
    for k in out_ref:
        torch.testing.assert_close(out[k], out_ref[k], rtol=1e-5, atol=1e-7, msg=k)
    mine, ref = d.state_dict(), d_ref.state_dict()
    for k in ref:  # params, α̃ and its moments, BN running statistics (moved once), num_batches_tracked
        torch.testing.assert_close(mine[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    for p, q in zip(opt.param_groups[0]["params"], opt_ref.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])
    assert forwards["shared"] == forwards["separate"] - 1


def test_teacher_runs_once_per_search_step_and_alpha_is_not_trained_by_main_optimiser():
    d, opt = warmed("sgd")
    assert all(p is not d.weighting.alpha_tilde for p in d.parameters())  # a buffer: no optimiser sees it
    assert "weighting.alpha_tilde" in d.state_dict()
    calls = []
    d.teacher.register_forward_hook(lambda *a: calls.append(1))
    x, y, xv, yv = batches()
    t, _ = DistProSearch(d).step(x, y, xv, yv, opt)
    d.reuse_teacher_output(x, t)
    real_step(d, opt, x, y)
    assert len(calls) == 1


def test_search_computes_every_pathway_below_tau_and_logs_what_replay_keeps():
    """Dropping (α̃ ≤ τ) is a replay saving (§3.4): a search step computes every pathway's loss."""
    d, infos = make(tau=0.5)
    n = len(d.weighting.learned)
    alpha = torch.full((n,), 1.0)
    alpha[: n // 2] = 0.2  # half at or below tau
    d.weighting.alpha_tilde.copy_(alpha)
    ran = []
    for p in d.pathways:
        p.transform.register_forward_hook(lambda m, a, o, name=p.name: ran.append(name))
    x, y, xv, yv = batches()
    d.fuse_input_convs = False  # each transform's own forward runs: the hooks see which ones
    out = d(x, y)
    assert sorted(ran) == sorted(d.weighting.learned)
    assert all(name in out for name in d.weighting.learned)
    assert out["pathways_kept"].item() == pytest.approx(0.5)  # what a replay of this step would keep
    ran.clear()
    opt = make_optimizer(d, "sgd")
    DistProSearch(d).step(x, y, xv, yv, opt)  # every look-ahead forward computes every pathway too
    counts = {name: ran.count(name) for name in d.weighting.learned}
    assert min(counts.values()) == max(counts.values()) > 0
    # The replay of the same α̃ drops the pathways at or below τ.
    process = Process(infos, [0], normalize(alpha)[None], alpha[None], tau=0.5)
    replay = Distiller(copy.deepcopy(d.student), copy.deepcopy(d.teacher), pathways_from_process(process),
                       weighting="process", weighting_kwargs={"process": process, "total_steps": 1}, input_shape=SHAPE)
    ran.clear()
    for p in replay.pathways:
        p.transform.register_forward_hook(lambda m, a, o, name=p.name: ran.append(name))
    replay.fuse_input_convs = False
    out = replay(x, y)
    assert sorted(ran) == sorted(d.weighting.learned[n // 2:])
    assert not any(name in out for name in d.weighting.learned[: n // 2])
    replay.fuse_input_convs = True  # fused input convs concatenate the kept pathways' weights only
    replay(x, y)["loss"].backward()
    used = {p.name for p in replay.pathways if any(q.grad is not None for q in p.parameters())}
    assert used == set(d.weighting.learned[n // 2:])


def test_learned_g_sets_the_total_weight_and_takes_adams_step():
    """Σα = S/(S + e^g) with S = Σ e^α̃ (eq. 2); ∂Σα/∂g = −σ(1 − σ), σ = e^g/(S + e^g); a first Adam
    step moves g by lr against its gradient's sign (as α̃), so Σα can move while α̃ stays."""
    alpha_tilde, g = torch.tensor([0.5, 1.0, 2.0]), torch.tensor(1.5, requires_grad=True)
    total = normalize(alpha_tilde, "biased_softmax", g).sum()
    s = sum(math.exp(v) for v in (0.5, 1.0, 2.0))
    sigma = math.exp(1.5) / (s + math.exp(1.5))
    assert float(total.detach()) == pytest.approx(s / (s + math.exp(1.5)))
    (grad,) = torch.autograd.grad(total, g)
    assert float(grad) == pytest.approx(-sigma * (1 - sigma))
    assert torch.equal(normalize(alpha_tilde, "biased_softmax", torch.tensor(1.5)),
                       normalize(alpha_tilde, "biased_softmax", 1.5))
    w = DistProWeighting(["a", "b"], {}, alpha_lr=0.05, learn_g=True, g=1.0)
    assert w.hyper_names == ["alpha_tilde", "g_tilde"]
    before = float(w.alpha().sum())
    assert before == pytest.approx(2 / 3)  # α̃ = g = 1: L/(L+1)
    w.update_alpha(torch.tensor([0.0, 0.0, -2e-3]))  # L_val falls as g rises: the pathways count less
    assert float(w.g_tilde) == pytest.approx(1.05, abs=1e-4) and torch.equal(w.alpha_tilde, torch.ones(2))
    assert float(w.alpha().sum()) == pytest.approx(2 * math.e / (2 * math.e + math.exp(1.05)))
    with pytest.raises(ValueError, match="3 entries; this weighting learns 2"):
        DistProWeighting(["a", "b"], {}).update_alpha(torch.zeros(3))
    with pytest.raises(ValueError, match="learn_g learns the bias"):
        DistProWeighting(["a", "b"], {}, normalization="softmax", learn_g=True)


def test_search_with_learned_g_records_its_trace_and_resumes_it(tmp_path, tiny_data):
    """A search with learn_g writes g per step in the process (g_trace; α already includes it), logs
    Σα and g per step, and its checkpoint carries g and the trace."""
    torch.manual_seed(0)
    train, val = train_val_split(tiny_data, 0.2, seed=0)
    d, infos = make(learn_g=True)
    cb = DistProCallback(BatchLoader(val, 4, shuffle=True, seed=0), infos)
    cfg = TrainConfig(epochs=1, progress=False, log_every=1, channels_last=False)
    Trainer(d, BatchLoader(train, 8, seed=0), None, cfg, run_dir=tmp_path, callbacks=[cb]).fit()
    proc = Process.load(tmp_path / "process.json")
    assert proc.g == 1.0 and len(proc.g_trace) == len(proc.steps)
    assert proc.g_trace[-1] != 1.0  # g moved
    last = torch.tensor(proc.g_trace[-1])
    torch.testing.assert_close(proc.alpha[-1], normalize(proc.alpha_tilde[-1], "biased_softmax", last),
                               rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert all("alpha_sum" in r and "g" in r for r in rows)
    assert json.loads((tmp_path / "process.json").read_text())["meta"]["alpha_from_uniform"]["alpha_sum"] == \
        pytest.approx(float(proc.alpha[-1].sum()))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert any(k.endswith("g_tilde") for k in state["distiller"])
    restored = DistProCallback(BatchLoader(val, 4), infos)
    restored.load_state_dict(cb.state_dict())
    assert restored.g_trace == cb.g_trace


@pytest.mark.parametrize("undo", [False, True])
def test_undo_lr_decay_divides_the_hypergradient_by_the_schedule_factor(undo):
    """Eq. 4's hypergradient carries ξ_t; at a schedule factor ξ_t/ξ_0 = 0.1, ``undo_lr_decay`` steps α̃
    with 10x the hypergradient (SGD on α̃: the step is γ · hypergradient exactly), else with it as is."""
    d, opt = warmed("sgd_plain", double=True)  # float64: α̃ ≈ 1 moves by ~1e-6 here
    d.weighting.alpha_optimizer = "sgd"
    assert DistProSearch.lr_decay(opt) == 1.0  # no scheduler: no initial_lr recorded
    for group in opt.param_groups:  # as a scheduler leaves them after one 0.1 milestone
        group["initial_lr"], group["lr"] = group["lr"], group["lr"] * 0.1
    x, y, xv, yv = batches(double=True)
    search = DistProSearch(d, undo_lr_decay=undo)
    assert search.lr_decay(opt) == pytest.approx(0.1)
    hyper = search.hypergradient(x, y, xv, yv, opt)
    before = d.weighting.alpha_tilde.clone()
    search.step(x, y, xv, yv, opt)
    expected = d.weighting.alpha_lr * hyper / (0.1 if undo else 1.0)
    assert expected.abs().max() > 0
    torch.testing.assert_close(before - d.weighting.alpha_tilde, expected, rtol=1e-6, atol=1e-12)
    for group in opt.param_groups:  # a schedule that reached lr 0: the hypergradient is 0, not 0 / 0
        group["lr"] = 0.0
    before = d.weighting.alpha_tilde.clone()
    search.step(x, y, xv, yv, opt)
    assert torch.equal(d.weighting.alpha_tilde, before)


def test_alpha_optimiser_adam_and_sgd():
    w = DistProWeighting(["a", "b"], {}, alpha_optimizer="sgd", alpha_lr=0.05, tau=None)
    w.update_alpha(torch.tensor([1.0, -2.0]))
    assert torch.allclose(w.alpha_tilde, torch.tensor([0.95, 1.10]))
    w = DistProWeighting(["a", "b"], {}, alpha_lr=0.05)
    w.update_alpha(torch.tensor([1e-3, -3.0]))
    assert torch.allclose(w.alpha_tilde, torch.tensor([0.95, 1.05]), atol=1e-4)  # Adam: first step ≈ lr·sign
    with pytest.raises(FloatingPointError):
        w.update_alpha(torch.tensor([float("nan"), 0.0]))


def test_search_in_trainer_writes_process_and_logs(tmp_path, tiny_data):
    torch.manual_seed(0)
    train, val = train_val_split(tiny_data, 0.2, seed=0)
    d, infos = make(tau=0.5)
    cb = DistProCallback(BatchLoader(val, 4, shuffle=True, seed=0), infos, meta={"dataset": "tiny"})
    cfg = TrainConfig(epochs=2, progress=False, log_every=1, channels_last=False)
    trainer = Trainer(d, BatchLoader(train, 8, seed=0), None, cfg, run_dir=tmp_path, callbacks=[cb])
    assert all(p is not d.weighting.alpha_tilde for g in trainer.optimizer.param_groups for p in g["params"])
    trainer.fit()
    proc = Process.load(tmp_path / "process.json")
    assert proc.steps == list(range(2 * len(trainer.train_loader)))
    assert proc.names == d.weighting.learned and proc.pathways[0].teacher_stage == 0
    assert proc.alpha.shape == (len(proc.steps), len(infos)) and len(proc.kept) == len(proc.steps)
    assert not torch.allclose(proc.alpha_tilde[-1], torch.ones(len(infos)))  # α̃ moved from α₀ = 1
    assert torch.allclose(proc.alpha[-1], normalize(d.weighting.alpha_tilde))
    assert (tmp_path / "process.png").stat().st_size > 0
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert all("pathways_kept" in r for r in rows)
    raw = json.loads((tmp_path / "process.json").read_text())  # inspectable: names, grid, values
    assert {"pathways", "steps", "alpha", "alpha_tilde"} <= raw.keys()
    # How far α moved from uniform: per epoch in metrics.jsonl, at the end in the process file.
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_alpha_max_vs_uniform"] >= 1.0 and r["train_alpha_kl_from_uniform"] >= 0 for r in epochs)
    moved = raw["meta"]["alpha_from_uniform"]
    assert moved == pytest.approx(cb.alpha_from_uniform()) and moved["largest_alpha"] > moved["uniform_alpha"]


def test_distance_from_uniform_by_hand():
    """Shares p = α / Σα of α = (0.1, 0.1, 0.2): p = (1/4, 1/4, 1/2); max p·L = 1.5;
    KL(p ‖ 1/3) = 2 · 1/4 log(3/4) + 1/2 log(3/2) = 0.0589 nats."""
    got = distance_from_uniform(torch.tensor([0.1, 0.1, 0.2]))
    assert got["alpha_max_vs_uniform"] == pytest.approx(1.5)
    assert got["alpha_kl_from_uniform"] == pytest.approx(0.5 * math.log(0.75) + 0.5 * math.log(1.5))
    assert distance_from_uniform(torch.full((4,), 0.2)) == pytest.approx(
        {"alpha_max_vs_uniform": 1.0, "alpha_kl_from_uniform": 0.0})


def test_logit_pathway_is_learned_recorded_and_replayed(tmp_path, tiny_data):
    """KD on the logits as one more pathway: its own α̃ moves in the search, the process records it
    (kind logit, its kwargs), and the replay weights the KD term with the process's α."""
    torch.manual_seed(0)
    teacher, student = TinyNet(width=6), TinyNet(width=4)
    pathways, infos = search_space(teacher, student, SHAPE, "same", ("conv1x1",))
    loss, info = logit_pathway("kd", {"tau": 2.0})
    infos = [*infos, info]
    d = Distiller(student, teacher, pathways, [loss], weighting="distpro",
                  weighting_kwargs={"learned": [p.name for p in infos]}, input_shape=SHAPE)
    train, val = train_val_split(tiny_data, 0.2, seed=0)
    cb = DistProCallback(BatchLoader(val, 4, shuffle=True, seed=0), infos)
    cfg = TrainConfig(epochs=1, progress=False, channels_last=False)
    Trainer(d, BatchLoader(train, 8, seed=0), None, cfg, run_dir=tmp_path, callbacks=[cb]).fit()
    proc = Process.load(tmp_path / "process.json")
    assert proc.names[-1] == "kd" and proc.pathways[-1].kind == "logit"
    assert proc.pathways[-1].loss_kwargs == {"tau": 2.0}  # the catalogue's kd defaults, tau overridden
    assert proc.alpha_tilde[-1, -1] != 1.0  # the logit pathway's α̃ moved
    replay = Distiller(TinyNet(width=4), TinyNet(width=6), pathways_from_process(proc),
                       logit_losses_from_process(proc), weighting="process",
                       weighting_kwargs={"process": proc, "mode": "final"}, input_shape=SHAPE)
    assert [ll.name for ll in replay.logit_losses] == ["kd"] and replay.logit_losses[0].kwargs["tau"] == 2.0
    x, y, _, _ = batches()
    out = replay(x, y)
    assert out["w/kd"].item() == pytest.approx(proc.alpha[-1, -1].item())



def write_tiny_fashion_mnist(root, n_train=50, n_test=20):
    """The first images of the real Fashion-MNIST as a dataset directory of its own (IDX files), so
    a `kdtune run` config can point data.root at it and evaluate on 20 test images, not 10 000."""
    from kdtune.data import load_fashion_mnist

    root.mkdir()
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        data = load_fashion_mnist(split)
        for kind, arr in (("images-idx3", data.images[:n, 0]), ("labels-idx1", data.labels[:n])):
            dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            header = bytes([0, 0, 0x08, arr.ndim]) + dims
            with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.to(torch.uint8).numpy().tobytes())
    return root


SEARCH_CONFIG = {
    "seed": 0,
    "data": {"dataset": "fashion_mnist", "val_fraction": 0.2, "batch_size": 8, "eval_batch_size": 20,
             "test_limit": 200},
    "student": {"name": "resnet8"},
    "teacher": {"name": "resnet8"},  # untrained: enough to move α̃
    "distpro": {"connections": "same", "transforms": ["conv1x1", "distpro"], "alpha_lr": 0.1},
    "train": {"epochs": 2, "progress": False, "threads": 1, "channels_last": False, "log_every": 1},
}

KILL_SEARCH_SCRIPT = textwrap.dedent('''
    import json, os, signal, sys
    from kdtune.config import RunConfig, from_dict
    from kdtune.recipe import run
    from kdtune.trainer import Callback

    cfg, run_dir, kill_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])

    class Kill(Callback):  # runs before DistPro's α update of the same step
        def on_batch_start(self, trainer, x, y):
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    run(from_dict(RunConfig, cfg), run_dir, callbacks=(Kill(),))
''')


def test_search_sigkilled_mid_epoch_resumes_to_the_same_process_and_student(tmp_path):
    """`kdtune run --resume` after a SIGKILL in epoch 2 ends exactly where an uninterrupted search
    does: the same α̃ and α at every recorded step, bit-identical student weights and α̃ moments."""
    script = tmp_path / "search.py"
    script.write_text(KILL_SEARCH_SCRIPT)
    root = write_tiny_fashion_mnist(tmp_path / "fmnist")
    cfg = json.dumps({**SEARCH_CONFIG, "data": {**SEARCH_CONFIG["data"], "root": str(root)}})

    def search(run_dir, kill_at):
        return subprocess.run([sys.executable, str(script), cfg, str(run_dir), str(kill_at)],
                              capture_output=True, text=True, timeout=300)

    straight = search(tmp_path / "a", -1)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = search(tmp_path / "b", 7)  # 40 training images, batch 8: 5 steps per epoch, killed in epoch 2
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["global_step"] == 5
    (tmp_path / "b" / "process.json").unlink()  # the checkpoint alone must carry the process so far
    kdtune = Path(sys.executable).with_name("kdtune")
    resumed = subprocess.run([str(kdtune), "run", "--resume", str(tmp_path / "b")], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    pa, pb = (Process.load(tmp_path / r / "process.json") for r in ("a", "b"))
    assert pa.steps == pb.steps == list(range(10))
    assert torch.equal(pa.alpha_tilde, pb.alpha_tilde) and torch.equal(pa.alpha, pb.alpha) and pa.kept == pb.kept
    assert not torch.equal(pa.alpha_tilde[-1], pa.alpha_tilde[0])  # the search did move α̃
    ca, cb = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("a", "b"))
    assert ca["distiller"].keys() == cb["distiller"].keys()
    for k in ca["distiller"]:  # student, adapters, BN statistics, α̃ and its Adam moments
        assert torch.equal(ca["distiller"][k], cb["distiller"][k]), k
    recorded_a, recorded_b = ca["callbacks"]["DistProCallback"], cb["callbacks"]["DistProCallback"]
    for k in ("steps", "alpha", "alpha_tilde", "kept"):  # the full-precision process in the checkpoint
        assert torch.equal(recorded_a[k], recorded_b[k]), k


def test_checkpoint_carries_the_recorded_process(tmp_path, tiny_data):
    """In-process twin of the SIGKILL test: interrupted after epoch 1, resumed by a fresh trainer
    and callback, the search continues the process of the checkpoint (process.json deleted)."""
    train, val = train_val_split(tiny_data, 0.2, seed=0)

    class Interrupt(Callback):
        def on_epoch_start(self, trainer, epoch):
            if epoch == 1:
                raise KeyboardInterrupt

    def search(run_dir, extra=(), resume=False):
        d, infos = make(tau=0.5)
        cb = DistProCallback(BatchLoader(val, 4, seed=1), infos)
        cfg = TrainConfig(epochs=2, progress=False, channels_last=False)
        Trainer(d, BatchLoader(train, 8, seed=0), None, cfg, run_dir=run_dir, callbacks=[*extra, cb]).fit(resume)
        return cb, d

    straight, d_straight = search(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "b", [Interrupt()])
    (tmp_path / "b" / "process.json").unlink()
    resumed, d_resumed = search(tmp_path / "b", resume=True)
    assert resumed.steps == straight.steps == list(range(8))
    assert resumed.alpha_tilde == straight.alpha_tilde and resumed.alpha == straight.alpha
    assert torch.equal(d_resumed.weighting.alpha_tilde, d_straight.weighting.alpha_tilde)

    # A checkpoint without the recorded process (older kdtune) and no process.json: a clear error.
    ckpt_path = tmp_path / "b" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    del ckpt["callbacks"]
    ckpt["epoch"], ckpt["global_step"] = 1, 4
    torch.save(ckpt, ckpt_path)
    (tmp_path / "b" / "process.json").unlink()
    with pytest.raises(RuntimeError, match="no recorded process.*process.json"):
        search(tmp_path / "b", resume=True)


def test_configs_logit_pathway_search_and_kd_baseline(tiny_data):
    """``distpro.logit_pathway: true`` adds KD as a learned pathway (a configured kd supplies its tau);
    ``baseline=kd`` on the retrain config trains plain KD, no process needed."""
    from types import SimpleNamespace

    from kdtune.config import RunConfig, from_dict
    from kdtune.search.distpro import from_config

    splits = SimpleNamespace(train=tiny_data, val=tiny_data)
    base = {"student": {"name": "resnet8"}, "teacher": {"name": "resnet14"},
            "data": {"val_fraction": 0.2}}
    search = {"connections": "same", "transforms": ["conv1x1"], "logit_pathway": True}
    cfg = from_dict(RunConfig, {**base, "distpro": search,
                                "distill": {"logit_losses": [{"name": "kd", "kwargs": {"tau": 2}}]}})
    d, (cb,) = from_config(cfg, splits, SHAPE)
    assert d.weighting.learned[-1] == "kd" and cb.infos[-1].kind == "logit" and cb.infos[-1].loss_kwargs["tau"] == 2
    assert [ll.name for ll in d.logit_losses] == ["kd"]
    assert all(p.endswith(".relu:input") for p in d._student_capture.paths.values())  # pre-activation taps
    kd_cfg = from_dict(RunConfig, {**base, "distill": {"weighting": {"name": "process", "kwargs": {"mode": "kd"}}}})
    d, callbacks = from_config(kd_cfg, splits, SHAPE)
    assert callbacks == [] and len(d.pathways) == 0 and [ll.name for ll in d.logit_losses] == ["kd"]
    assert d.logit_losses[0].kwargs["tau"] == 4.0 and type(d.weighting).__name__ == "FixedWeighting"


def test_search_of_dict_output_models_trains_with_finite_terms(tmp_path, dict_net):
    """A DistPro search (1 epoch, real images) whose student and teacher return dicts: L_val and the
    logit pathway read the logits through ``student.output`` / ``teacher.output``."""
    root = write_tiny_fashion_mnist(tmp_path / "fmnist")
    cfg = {**SEARCH_CONFIG, "data": {**SEARCH_CONFIG["data"], "root": str(root)},
           "student": {"name": "dict_net", "output": "logits"},
           "teacher": {"name": "dict_net", "kwargs": {"width": 8}, "output": "logits"},
           "distpro": {**SEARCH_CONFIG["distpro"], "logit_pathway": True},
           "train": {**SEARCH_CONFIG["train"], "epochs": 1}}
    run_dir = kdtune_run(cfg, tmp_path / "runs")
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    proc = Process.load(run_dir / "process.json")
    assert proc.names[-1] == "kd" and len(proc.names) >= 3 and proc.steps == list(range(5))
    terms = [row[f"train_{name}"] for name in ("loss", "task", *proc.names)]
    assert all(math.isfinite(v) and v > 0 for v in terms), row
    assert torch.isfinite(proc.alpha_tilde).all() and not torch.equal(proc.alpha_tilde[-1], proc.alpha_tilde[0])


@pytest.mark.parametrize("overrides", [[], ["distill.logit_losses=[]"]])
def test_shipped_retrain_config_keeps_plain_kd_beside_the_process(tmp_path, tiny_data, overrides):
    """configs/fmnist/distpro_retrain.yaml replays the process over its pathways with plain KD (tau 4) at weight 1
    beside it, at every step (the KD floor); ``distill.logit_losses=[]`` is the process alone (Table 1)."""
    from types import SimpleNamespace

    from kdtune.config import load_config
    from kdtune.models import create_model
    from kdtune.search.distpro import from_config

    teacher, student = create_model("resnet14", in_channels=1), create_model("resnet8", in_channels=1)
    infos = search_space(teacher, student, SHAPE, "same", ("conv1x1",))[1]
    alpha = torch.tensor([[0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    file = Process(infos, [0, 1], alpha, torch.ones(2, 3) * 2.0).save(tmp_path / "process.json")
    cfg = load_config(Path(__file__).parents[1] / "configs/fmnist/distpro_retrain.yaml",
                      ["teacher.name=resnet14", "teacher.checkpoint=null", f"process={file}", *overrides])
    d, _ = from_config(cfg, SimpleNamespace(train=tiny_data, val=None), SHAPE)
    d.weighting.set_total_steps(2)
    x, y, _, _ = batches()
    out = d(x, y, step=1)
    assert [p.name for p in d.pathways] == [p.name for p in infos]
    for name, a in zip(proc_names := [p.name for p in infos], alpha[1].tolist(), strict=True):
        assert out[f"w/{name}"].item() == pytest.approx(a)  # the process's α at the last step
    if overrides:
        assert d.logit_losses == [] and "w/kd" not in out
    else:
        assert [(ll.name, ll.kwargs["tau"]) for ll in d.logit_losses] == [("kd", 4)]
        assert out["w/kd"].item() == 1.0 and "kd" not in proc_names
