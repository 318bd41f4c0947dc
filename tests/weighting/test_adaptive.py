"""``adaptive`` (Adaptive Distillation eq. 5-6) and the path grouping shared with ``mgda``."""

import math

import pytest
import torch

from helpers import TinyNet
from kdtune.config import OptimizerConfig, TrainConfig
from kdtune.data import BatchLoader
from kdtune.distiller import Distiller
from kdtune.losses import kd
from kdtune.pathways import Pathway
from kdtune.trainer import Callback, Trainer
from kdtune.weighting import AdaptiveWeighting, build_weighting
from kdtune.weighting.paths import group_terms

TERMS = ["kd", "l2_logit", "at:layer1->layer1", "at:layer2->layer2"]


def test_loss_and_gradient_of_z_follow_eq_5_and_6():
    w = AdaptiveWeighting(TERMS, {}, alpha=0.5, fixed=[])  # the paper's form: kd is a path too
    with torch.no_grad():
        w.z.copy_(torch.tensor([0.3, -1.0, 2.0]))
    f = {"kd": torch.tensor(2.0), "l2_logit": torch.tensor(5.0),
         "at:layer1->layer1": torch.tensor(0.01), "at:layer2->layer2": torch.tensor(0.03)}
    total, used = w(f)
    z = [0.3, -1.0, 2.0]
    paths = [2.0, 5.0, 0.04]  # AT summed over layers: one path
    expected = 0.5 * sum(math.exp(-zi) * fi + zi for zi, fi in zip(z, paths, strict=True))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    eq6 = [0.5 * (1 - math.exp(-zi) * fi) for zi, fi in zip(z, paths, strict=True)]
    assert w.z.grad.tolist() == pytest.approx(eq6, rel=1e-5)
    assert used["at:layer1->layer1"] == used["at:layer2->layer2"] == pytest.approx(0.5 * math.exp(-2.0))
    assert used["kd"] == pytest.approx(0.5 * math.exp(-0.3))


def test_plain_kd_is_a_fixed_term_by_default_when_other_paths_remain():
    assert AdaptiveWeighting(TERMS, {}).fixed_terms == ["kd"]
    assert AdaptiveWeighting(TERMS, {}).path_names == ["l2_logit", "at"]
    assert AdaptiveWeighting(["kd"], {}).path_names == ["kd"]  # nothing else: kd is the path
    assert AdaptiveWeighting(["at:a->a"], {}).fixed_terms == []
    assert AdaptiveWeighting(TERMS, {}, fixed=[]).path_names == ["kd", "l2_logit", "at"]  # the paper's form


def test_fixed_terms_stay_at_their_weight_outside_eq_5():
    w = AdaptiveWeighting(TERMS, {"kd": 2.0, "l2_logit": 7.0}, alpha=0.5, fixed=["kd", "l2_*"])
    assert w.path_names == ["at"] and w.fixed_terms == ["kd", "l2_logit"] and w.z.shape == (1,)
    w.set_scales({"kd": 1.5})  # a calibrated scale multiplies the configured weight
    with torch.no_grad():
        w.z.fill_(0.7)
    f = {"kd": torch.tensor(3.0, requires_grad=True), "l2_logit": torch.tensor(5.0),
         "at:layer1->layer1": torch.tensor(0.01), "at:layer2->layer2": torch.tensor(0.03)}
    total, used = w(f)
    # eq. 5 over AT only (alpha 0.5), plus kd at 2 x 1.5 and l2_logit at 7, not multiplied by alpha
    expected = 0.5 * (math.exp(-0.7) * 0.04 + 0.7) + 3.0 * 3.0 + 7.0 * 5.0
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    assert f["kd"].grad.item() == pytest.approx(3.0)
    assert w.z.grad.item() == pytest.approx(0.5 * (1 - math.exp(-0.7) * 0.04), rel=1e-5)  # eq. 6 sees AT alone
    assert used["kd"] == pytest.approx(3.0) and used["l2_logit"] == pytest.approx(7.0)
    assert used["at:layer1->layer1"] == pytest.approx(0.5 * math.exp(-0.7))
    total, used = w({"at:layer1->layer1": torch.tensor(0.01)})  # an absent fixed term adds nothing
    assert set(used) == {"at:layer1->layer1"}
    with pytest.raises(ValueError, match="match no term"):
        AdaptiveWeighting(TERMS, {}, fixed=["ce"])
    with pytest.raises(ValueError, match="nothing is left to weigh"):
        AdaptiveWeighting(TERMS, {}, fixed=["*"])


@pytest.mark.parametrize("layerwise", [False, True])
def test_z_converges_to_log_f_at_a_fixed_point(layerwise):
    # Constant path losses: the stationary point of eq. 6 is z_i = log f_i (v_i = 1 / f_i).
    values = {"kd": 3.0, "l2_logit": 0.2, "at:layer1->layer1": 0.004, "at:layer2->layer2": 0.016}
    w = AdaptiveWeighting(TERMS, {}, alpha=1.0, layerwise=layerwise)
    opt = torch.optim.SGD(w.parameters(), lr=0.1, momentum=0.9)  # the paper's main optimiser
    for _ in range(600):
        total, _ = w({k: torch.tensor(v) for k, v in values.items()})
        opt.zero_grad()
        total.backward()
        opt.step()
    grouped = group_terms(TERMS, layerwise)
    target = [math.log(sum(values[t] for t in grouped[p])) for p in w.path_names]
    assert w.z.detach().tolist() == pytest.approx(target, abs=1e-3)


def test_z_tracks_log_mean_loss_with_noisy_losses():
    # Stochastic eq. 6: with f_i drawn around m_i every step, z_i settles near log E[f_i].
    torch.manual_seed(0)
    means = torch.tensor([4.0, 0.05])
    w = AdaptiveWeighting(["kd", "at:l1->l1"], {}, fixed=[])
    opt = torch.optim.SGD(w.parameters(), lr=0.02)
    tail = []
    for step in range(4000):
        f = means * torch.empty(2).uniform_(0.5, 1.5)
        total, _ = w({"kd": f[0], "at:l1->l1": f[1]})
        opt.zero_grad()
        total.backward()
        opt.step()
        if step >= 3000:
            tail.append(w.z.detach().clone())
    assert torch.stack(tail).mean(0).tolist() == pytest.approx(means.log().tolist(), abs=0.05)


def test_z_is_trained_by_the_main_optimiser_and_checkpointed():
    torch.manual_seed(0)
    distiller = Distiller(TinyNet(), TinyNet(width=6), pathways=[Pathway("blocks.1", "blocks.1", method="at")],
                          logit_losses=["kd"], weighting="adaptive", weighting_kwargs={"fixed": []},
                          input_shape=(1, 8, 8))
    z = distiller.weighting.z
    assert any(p is z for p in distiller.extra_parameters())
    assert "weighting.z" in distiller.state_dict() and z.tolist() == [0.0, 0.0]
    opt = torch.optim.SGD(distiller.parameters(), lr=0.1)
    out = distiller(torch.randn(8, 1, 8, 8), torch.arange(8) % 10)
    assert out["w/kd"].item() == 1.0  # v = exp(0)
    out["loss"].backward()
    opt.step()
    assert z.grad is not None and z.abs().min() > 0


def test_grad_cosine_logs_fig_4c_similarity():
    torch.manual_seed(0)
    distiller = Distiller(TinyNet(), TinyNet(width=6), pathways=[Pathway("blocks.1", "blocks.1", method="at")],
                          logit_losses=["kd"], weighting="adaptive",
                          weighting_kwargs={"grad_cosine": True, "fixed": []},
                          input_shape=(1, 8, 8))
    out = distiller(torch.randn(8, 1, 8, 8), torch.arange(8) % 10)
    cos = out["cos/kd|at"].item()
    assert -1.0 <= cos <= 1.0 and cos != 0.0 and out["cos/mean"].item() == cos
    out["loss"].backward()  # the graph survived the extra per-path gradients
    plain = Distiller(TinyNet(), TinyNet(width=6), pathways=[Pathway("blocks.1", "blocks.1", method="at")],
                      logit_losses=["kd"], weighting="adaptive", input_shape=(1, 8, 8))
    assert not any(k.startswith("cos/") for k in plain(torch.randn(8, 1, 8, 8), torch.arange(8) % 10))


def test_grouping_rules():
    assert group_terms(TERMS) == {"kd": ["kd"], "l2_logit": ["l2_logit"],
                                  "at": ["at:layer1->layer1", "at:layer2->layer2"]}
    assert list(group_terms(TERMS, layerwise=True)) == TERMS
    logits_vs_features = group_terms(TERMS, groups={"logits": ["kd", "l2_*"], "features": ["at:*"]})
    assert logits_vs_features == {"logits": ["kd", "l2_logit"], "features": TERMS[2:]}
    with pytest.raises(ValueError, match="matches no path"):
        group_terms(TERMS, groups={"logits": ["kd"], "features": ["at:*"]})
    with pytest.raises(ValueError, match="several paths"):
        group_terms(TERMS, groups={"a": ["*"], "b": ["kd"], "c": ["l2_logit"]})


def test_absent_terms_and_bad_arguments():
    w = build_weighting("adaptive", TERMS, {})
    total, used = w({"kd": torch.tensor(2.0)})  # other paths dropped this step
    assert total.item() == pytest.approx(2.0) and list(used) == ["kd"]
    with pytest.raises(KeyError, match="unknown term"):
        w({"fitnets": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="alpha"):
        build_weighting("adaptive", TERMS, {}, alpha=-1)
    with pytest.raises(TypeError, match="adaptive"):
        build_weighting("adaptive", TERMS, {}, alhpa=1)


def test_ce_form_of_st_shrinks_its_learned_weight_by_the_teacher_entropy():
    # eq. 6 settles at v = 1/f, so the constant tau^2 H(q_T) of App. A.1's CE form lowers v_kd from
    # 1/KL to 1/(KL + tau^2 H): why the shipped adaptive configs give ST in the KL form.
    torch.manual_seed(0)
    t, s = torch.randn(16, 10), torch.randn(16, 10)
    tau = 4.0
    p_t = torch.softmax(t / tau, dim=1)
    entropy = float(-(p_t * p_t.log()).sum(1).mean()) * tau**2
    settled = {}
    for form in ("kl", "ce"):
        w = AdaptiveWeighting(["kd", "at:l1->l1"], {}, fixed=[])
        opt = torch.optim.SGD(w.parameters(), lr=0.1, momentum=0.9)
        f = {"kd": kd(s, t, tau=tau, form=form), "at:l1->l1": torch.tensor(0.01)}
        for _ in range(800):
            total, used = w(f)
            opt.zero_grad()
            total.backward()
            opt.step()
        settled[form] = used["kd"]
    kl = float(kd(s, t, tau=tau))
    assert settled["kl"] == pytest.approx(1 / kl, rel=1e-2)
    assert settled["ce"] == pytest.approx(1 / (kl + entropy), rel=1e-2)
    assert settled["kl"] / settled["ce"] > 10  # the entropy dominates f: KD all but switched off


@pytest.mark.parametrize("lr", [0.1, None])
def test_z_has_its_own_rate_in_the_main_optimiser_and_follows_the_schedule(tmp_path, tiny_data, lr):
    # z learns at the paper's rate 0.1 (no weight decay) whatever the student's rate; lr=None: the student's.
    torch.manual_seed(0)
    distiller = Distiller(TinyNet(), TinyNet(width=6), pathways=[Pathway("blocks.1", "blocks.1", method="at")],
                          logit_losses=["kd"], weighting="adaptive", weighting_kwargs={"lr": lr},
                          input_shape=(1, 8, 8))
    cfg = TrainConfig(epochs=2, progress=False, channels_last=False, log_every=1,
                      optimizer=OptimizerConfig(lr=0.01, weight_decay=5e-4))
    trainer = Trainer(distiller, BatchLoader(tiny_data, 10), None, cfg, run_dir=tmp_path)
    groups = trainer.optimizer.param_groups
    z = distiller.weighting.z
    in_group = [any(p is z for p in g["params"]) for g in groups]
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len([p for p in distiller.parameters() if p.requires_grad])  # every parameter, once
    if lr is None:
        assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(0.01)
        return
    assert in_group == [False, True] and groups[0]["lr"] == pytest.approx(0.01)
    assert groups[1]["lr"] == pytest.approx(0.1) and groups[1]["weight_decay"] == 0.0
    trainer.fit()
    # cosine to zero over the run: both groups decayed by the same factor
    assert groups[1]["lr"] / 0.1 == pytest.approx(groups[0]["lr"] / 0.01)
    assert groups[1]["lr"] < 0.1


def test_z_lr_must_be_positive():
    with pytest.raises(ValueError, match="lr"):
        AdaptiveWeighting(["kd"], {}, lr=0.0)


def test_a_resumed_adaptive_run_continues_exactly_with_zs_own_group(tmp_path, tiny_data):


    class Interrupt(Callback):  # stops the run at the start of its second epoch, after the first checkpoint
        def on_epoch_start(self, trainer, epoch):
            if epoch == 1:
                raise KeyboardInterrupt

    def trainer(run_dir, callbacks=()):
        torch.manual_seed(0)
        d = Distiller(TinyNet(), TinyNet(width=6), pathways=[Pathway("blocks.1", "blocks.1", method="at")],
                      logit_losses=["kd"], weighting="adaptive", input_shape=(1, 8, 8))
        c = TrainConfig(epochs=2, progress=False, channels_last=False, log_every=1,
                        optimizer=OptimizerConfig(lr=0.01))
        return Trainer(d, BatchLoader(tiny_data, 10), None, c, run_dir=run_dir, callbacks=list(callbacks))

    straight = trainer(tmp_path / "a")
    straight.fit()
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "b", [Interrupt()]).fit()
    resumed = trainer(tmp_path / "b")
    resumed.load_checkpoint()
    resumed.fit()
    assert torch.equal(resumed.distiller.weighting.z, straight.distiller.weighting.z)
    assert resumed.optimizer.param_groups[1]["lr"] == pytest.approx(straight.optimizer.param_groups[1]["lr"])
    for p, q in zip(resumed.distiller.student.parameters(), straight.distiller.student.parameters(), strict=True):
        assert torch.equal(p, q)
