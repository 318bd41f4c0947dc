"""Self-distillation (kdtune.selfdistill): exits, losses eq. 3-4, generator eq. 5, meta step eq. 6-8."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import TinyNet
from kdtune.capture import LayerNotFoundError
from kdtune.checkpoint import load_checkpoint, load_state_strict, save_atomic
from kdtune.config import ConfigError, RunConfig, TrainConfig, from_dict, load_config
from kdtune.data import BatchLoader, ImageDataset
from kdtune.losses import kd
from kdtune.models import create_model
from kdtune.selfdistill import MetaStep, SelfDistiller, TopDownLabelGenerator
from kdtune.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "fmnist"


pytestmark = pytest.mark.usefixtures("one_thread")


class ThreeStages(nn.Module):
    """A user's model with three stages (8x8, 4x4, 2x2 maps), knowing nothing of kdtune."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.last = nn.Sequential(nn.Conv2d(6, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.last(self.mid(self.stem(x))).mean((2, 3)))


def make(method: str = "md", seed: int = 0, **kw) -> SelfDistiller:
    torch.manual_seed(seed)
    return SelfDistiller(ThreeStages(), (1, 8, 8), method=method, **kw)


def batch(n: int = 8, seed: int = 1, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def model_state(sd: SelfDistiller) -> dict[str, Tensor]:
    """Everything of the model and its exits (not the generator), cloned."""
    return {k: v.detach().clone() for k, v in sd.state_dict().items()
            if isinstance(v, Tensor) and not k.startswith("generator.")}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- exits on any model


def test_exits_found_on_a_user_model() -> None:
    sd = make("sd")
    assert sd.stages == ["stem", "mid", "last"]
    assert len(sd.exits) == 2 and sd.teacher is None and sd.generator is None
    x, y = batch()
    out = sd(x, y)
    assert set(out) == {"loss", "logits", "task", "exit1_ce", "exit1_kl", "exit1_acc", "exit2_ce", "exit2_kl",
                        "exit2_acc", "w/exit_labels"}
    assert out["w/exit_labels"].item() == sd.alpha
    assert out["logits"].shape == (8, 10) and all(v.ndim == 0 for k, v in out.items() if k != "logits")
    out["loss"].backward()
    assert all(p.grad is not None for p in sd.student.parameters())
    assert all(p.grad is not None for p in sd.exits.parameters())


def test_tiny_user_model_with_two_stages_and_explicit_paths() -> None:
    sd = SelfDistiller(TinyNet(), (1, 8, 8), method="md", stages=["blocks.0", "blocks.1"])
    x, y = batch()
    assert torch.isfinite(sd(x, y)["loss"])
    assert set(sd.eval_logits(x)) == {"exit1", "ensemble"}


def test_bad_stage_path_lists_closest_real_ones() -> None:
    with pytest.raises(LayerNotFoundError, match="blocks.1"):
        SelfDistiller(TinyNet(), (1, 8, 8), stages=["blocks.0", "blocks.2"])
    with pytest.raises(ValueError, match="at least 2 stages"):
        SelfDistiller(TinyNet(), (1, 8, 8), stages=["blocks.1"])
    with pytest.raises(ValueError, match="feature map"):
        SelfDistiller(TinyNet(), (1, 8, 8), stages=["blocks.0", "head"])
    with pytest.raises(ValueError, match="one of"):
        SelfDistiller(TinyNet(), (1, 8, 8), method="byot")


@pytest.mark.parametrize("name,stages", [("resnet8", ["layer1", "layer2", "layer3"]),
                                         ("wrn_16_1", ["block1", "block2", "relu"])])
@pytest.mark.parametrize("method", ["dsn", "sd", "md"])
def test_zoo_models(name: str, stages: list[str], method: str) -> None:
    torch.manual_seed(0)
    sd = SelfDistiller(create_model(name, in_channels=1), (1, 28, 28), method=method)
    assert sd.stages == stages
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    out = sd(x, y)
    out["loss"].backward()
    assert sorted(k for k in out if k.startswith("exit")) == (
        ["exit1_acc", "exit1_ce", "exit2_acc", "exit2_ce"] if method == "dsn"
        else ["exit1_acc", "exit1_ce", "exit1_kl", "exit2_acc", "exit2_ce", "exit2_kl"])
    for k in (1, 2):  # the exit's accuracy on the batch, by an independent count
        heads_out = sd.exits[k - 1](sd.features()[k - 1])
        assert out[f"exit{k}_acc"].item() == pytest.approx((heads_out.argmax(1) == y).float().mean().item())
    assert all(p.grad is not None for p in sd.exits.parameters())
    sd.eval()
    logits = sd.eval_logits(x)
    assert {k: v.shape for k, v in logits.items()} == {k: (4, 10) for k in ("exit1", "exit2", "ensemble")}


# --------------------------------------------------------------------------- losses (eq. 3-4)


@pytest.mark.parametrize(("method", "anchor"), [("dsn", None), ("sd", None), ("md", "final"), ("md", "exit")])
def test_loss_is_eq3_eq4(method: str, anchor: str | None) -> None:
    # eq. 5 as written: the fused maps differ from F_k, so the two anchors give different targets.
    sd = make(method, alpha=0.3, tau=2.0, **({"generator_anchor": anchor, "generator_residual": False}
                                             if anchor else {}))
    x, y = batch()
    out = sd(x, y)
    logits = out["logits"].detach()
    feats = [f.detach() for f in sd.features()]
    exits = [head(f) for head, f in zip(sd.exits, feats, strict=False)]
    if method == "md":  # T_k = exit_head_k(F̂_k) (§3.3), each head a copy so nothing real is touched
        with torch.no_grad():
            targets = [copy.deepcopy(head)(m) for head, m in zip(sd.exits, sd.generator(feats), strict=True)]
            if anchor == "final":  # + S_K − S_k
                targets = [t + logits - s for t, s in zip(targets, exits, strict=True)]
    expected = F.cross_entropy(logits, y)
    for k, s_k in enumerate(exits):
        ce = F.cross_entropy(s_k, y)
        if method == "dsn":
            expected = expected + ce
            continue
        t_k = logits if method == "sd" else targets[k]
        p_t = F.softmax(t_k / 2.0, 1)
        kl = (p_t * (p_t.log() - F.log_softmax(s_k / 2.0, 1))).sum(1).mean() * 4.0  # tau^2 KL(T || S)
        expected = expected + 0.3 * ce + 0.7 * kl
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("method", ["sd", "md"])
def test_soft_targets_teach_without_being_taught(method: str) -> None:
    """The KL terms train the exits (and, through them, the early stages) — never the target side."""
    sd = make(method)
    x, y = batch()
    out = sd(x, y)
    sum(v for k, v in out.items() if k.endswith("_kl")).backward()
    assert sd.student.fc.weight.grad is None  # the final classifier is on the target side only
    assert sd.student.last[0].weight.grad is None  # so is the last stage
    assert sd.exits[0].fc.weight.grad is not None and sd.student.stem[0].weight.grad is not None
    if sd.generator is not None:  # the real step does not train the generator
        assert all(p.grad is None for p in sd.generator.parameters())


def test_trainer_steps_model_and_exits_but_not_the_generator(tiny_data: ImageDataset) -> None:
    sd = make("md")
    trainer = Trainer(sd, tiny_data, config=TrainConfig(epochs=1, progress=False, channels_last=False))
    stepped = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert stepped == {id(p) for p in [*sd.student.parameters(), *sd.exits.parameters()]}
    assert not stepped & {id(p) for p in sd.generator.parameters()}
    assert {id(p) for p in sd.extra_parameters()} == {id(p) for p in [*sd.exits.parameters(),
                                                                       *sd.generator.parameters()]}


# --------------------------------------------------------------------------- label generator (eq. 5)


@pytest.mark.parametrize("residual", [False, True])
def test_generator_is_eq5(residual: bool) -> None:
    """eq. 5, and with ``residual`` F̂_k = F_k + eq. 5's map (checked with non-zero refine weights)."""
    torch.manual_seed(0)
    gen = TopDownLabelGenerator([4, 6, 8], residual=residual)
    for conv in gen.refine:  # the residual generator starts at zero: give it weights to check the formula
        torch.nn.init.normal_(conv.weight, std=0.1)
        torch.nn.init.normal_(conv.bias, std=0.1)
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)]
    skip = [f if residual else 0.0 for f in feats]
    f3 = gen.lateral[2](feats[2])  # F̂_3 = conv1x1(F_3)
    f2 = skip[1] + gen.refine[1](F.interpolate(f3, scale_factor=2, mode="bilinear") + gen.lateral[1](feats[1]))
    f1 = skip[0] + gen.refine[0](F.interpolate(f2, scale_factor=2, mode="bilinear") + gen.lateral[0](feats[0]))
    assert f2.shape == feats[1].shape and f1.shape == feats[0].shape  # F̂_k has F_k's shape
    fused1, fused2 = gen(feats)
    torch.testing.assert_close(fused1, f1)
    torch.testing.assert_close(fused2, f2)


def test_residual_generator_starts_at_the_exits_own_predictions() -> None:
    """generator_residual (default) with the exit anchor: F̂_k = F_k at initialisation, so T_k =
    exit_head_k(F_k) — with the heads in the same mode (batch statistics while training); eq. 5 as written
    starts elsewhere."""
    x, _ = batch()
    for residual in (True, False):
        sd = make("md", generator_residual=residual, generator_anchor="exit")
        logits = sd.student(x)
        feats = sd.features()
        with torch.no_grad():
            own = [head(f) for head, f in zip(sd.exits, feats[:-1], strict=True)]
        targets = sd.soft_target_logits(feats, logits, own)
        same = all(torch.allclose(t, o, atol=1e-6) for t, o in zip(targets, own, strict=True))
        assert same == residual


def test_final_anchor_starts_at_sd_and_adds_the_top_down_correction() -> None:
    """generator_anchor="final" (default): t_k = S_K + h_k(F̂_k) − S_k. With the residual generator at its
    start that is SD's target S_K exactly; once the refine convolutions move, the difference from S_K is the
    correction h_k(F̂_k) − h_k(F_k), computed here with plain calls of copies of the heads."""
    x, y = batch()
    sd = make("md")
    logits = sd.student(x)
    feats = sd.features()
    exits = [head(f) for head, f in zip(sd.exits, feats[:-1], strict=True)]
    sd_targets = make("sd").soft_target_logits(feats, logits, exits)
    for t, s in zip(sd.soft_target_logits(feats, logits, exits), sd_targets, strict=True):
        torch.testing.assert_close(t, s)
    with torch.no_grad():
        for conv in sd.generator.refine:
            conv.weight.normal_(0, 0.1)
    heads = copy.deepcopy(sd.exits)
    with torch.no_grad():
        fused = sd.generator([f.detach() for f in feats])
        expected = [logits + h(m) - h(f) for h, m, f in zip(heads, fused, feats, strict=False)]
    targets = sd.soft_target_logits(feats, logits, exits)
    for t, e, s in zip(targets, expected, sd_targets, strict=True):
        torch.testing.assert_close(t, e)
        assert not torch.allclose(t, s)  # the correction is not zero any more
    out = sd(x, y)  # the training loss reads the same targets
    kl = kd(exits[0], targets[0], tau=1.0)
    torch.testing.assert_close(out["exit1_kl"], kl)


def test_final_anchor_gives_no_gradient_to_the_model_or_exits() -> None:
    sd = make("md", generator_residual=False)
    x, _ = batch()
    logits = sd.student(x)
    feats = sd.features()
    exits = [head(f) for head, f in zip(sd.exits, feats[:-1], strict=True)]
    targets = sd.soft_target_logits(feats, logits, exits, generator_grad=True)
    sum(t.square().sum() for t in targets).backward()
    assert all(p.grad is None for p in [*sd.exits.parameters(), *sd.student.parameters()])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sd.generator.parameters())


def test_unknown_generator_anchor_fails() -> None:
    with pytest.raises(ValueError, match="generator_anchor.*final"):
        make("md", generator_anchor="teacher")


def test_targets_are_the_exit_heads_as_constant_functions() -> None:
    """T_k = exit_head_k(F̂_k) (§3.3); the T_k path trains only θ_g: the heads get no gradient and
    their BatchNorm running statistics stay bit-identical."""
    # Zero-initialised refine convs would block the laterals' gradient; the exit anchor reads h_k(F̂_k) alone.
    sd = make("md", generator_residual=False, generator_anchor="exit")
    x, y = batch()
    logits = sd.student(x)
    feats = sd.features()
    heads = copy.deepcopy(sd.exits)  # the independent route: plain calls of copies of the heads
    exit_state = {k: v.clone() for k, v in sd.exits.state_dict().items()}
    targets = sd.soft_target_logits(feats, logits, [logits] * 2, generator_grad=True)
    with torch.no_grad():
        expected = [h(m) for h, m in zip(heads, sd.generator([f.detach() for f in feats]), strict=True)]
    for t, e in zip(targets, expected, strict=True):
        torch.testing.assert_close(t, e)
    sum(t.square().sum() for t in targets).backward()
    assert all(p.grad is None for p in sd.exits.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sd.generator.parameters())
    assert all(p.grad is None for p in sd.student.parameters())  # features reach the generator detached
    assert_same({k: v.detach() for k, v in sd.exits.state_dict().items()}, exit_state)


def test_generator_optimiser_steps_exactly_the_fusion_convolutions() -> None:
    sd = make("md")
    gen = sd.generator
    fusion = {id(p) for p in [*gen.lateral.parameters(), *gen.refine.parameters()]}
    stepped = {id(p) for g in sd.generator_optimizer.param_groups for p in g["params"]}
    assert stepped == fusion and len(stepped) == 4 * 3 - 2  # 3 lateral + 2 refine convs, weight and bias
    assert {n.split(".")[0] for n, _ in gen.named_parameters()} == {"lateral", "refine"}


def test_generator_collapse_is_logged() -> None:
    sd = make("md", tau=2.0, generator_residual=False)  # targets away from the final output
    x, y = batch()
    out = sd(x, y)
    feats = sd.features()
    with torch.no_grad():
        fused = sd.generator([f.detach() for f in feats])
        for k, (head, m, f) in enumerate(zip(copy.deepcopy(sd.exits), fused, feats, strict=False), start=1):
            t = out["logits"] + head(m) - head(f)
            assert out[f"gen/exit{k}_label_agree"].item() == pytest.approx((t.argmax(1) == y).float().mean().item())
            assert out[f"gen/exit{k}_max_prob"].item() == pytest.approx(F.softmax(t / 2.0, 1).max(1)[0].mean().item())


def test_state_with_old_generator_heads_fails_with_a_message() -> None:
    sd = make("md")
    state = sd.state_dict()
    state["generator.heads.0.fc.weight"] = torch.zeros(10, 8)
    with pytest.raises(ValueError, match="generator heads.*retrain"):
        make("md").load_state_dict(state)


# --------------------------------------------------------------------------- meta step (eq. 6-8)


@pytest.mark.parametrize(("objective", "anchor"), [("exits", "final"), ("final", "final"), ("exits", "exit")])
def test_meta_gradient_equals_finite_differences(objective: str, anchor: str) -> None:
    """∇θ_g L_val(θ_s⁺(θ_g)) from the functional look-ahead equals central differences of the same
    quantity computed by an independent route: a real SGD step on a copy of the model. ``final``:
    L_val = CE(y, S_K⁺), the model stepped; ``exits``: + Σ_k CE(y, S_k⁺), model and exits stepped."""
    torch.set_default_dtype(torch.float64)
    try:
        sd = make("md", meta_objective=objective, generator_anchor=anchor)
    finally:
        torch.set_default_dtype(torch.float32)
    x_a, y_a = batch(8, seed=1, dtype=torch.float64)
    x_b, y_b = batch(8, seed=2, dtype=torch.float64)
    zeta = 0.5
    val_loss, grads = sd.meta_gradient(x_a, y_a, x_b, y_b, zeta)
    theta_g = [p.detach().clone() for p in sd.generator.parameters()]

    def val_ce_after_one_real_step(gen_params: list[Tensor]) -> float:
        m = copy.deepcopy(sd)
        with torch.no_grad():
            for p, v in zip(m.generator.parameters(), gen_params, strict=True):
                p.copy_(v)
        loss = m(x_a, y_a)["loss"]  # the training forward (generator without a graph)
        stepped = m.student if objective == "final" else m
        params = [p for n, p in stepped.named_parameters() if not n.startswith("generator.")]
        with torch.no_grad():
            for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                p -= zeta * g  # θ_s⁺ = θ_s − ζ ∇θ_s L_S   (eq. 7)
        if objective == "final":
            return float(F.cross_entropy(m.student(x_b), y_b).detach())
        out = m(x_b, y_b)
        return float((out["task"] + out["exit1_ce"] + out["exit2_ce"]).detach())

    assert val_loss.item() == pytest.approx(val_ce_after_one_real_step(theta_g), rel=1e-10)
    flat = torch.cat([g.flatten() for g in grads])
    assert flat.abs().sum() > 0
    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for direction in [flat / flat.norm(), *(torch.randn(flat.numel(), generator=g, dtype=torch.float64)
                                            for _ in range(3))]:
        parts = direction.split([p.numel() for p in theta_g])
        plus = [p + eps * d.view_as(p) for p, d in zip(theta_g, parts, strict=True)]
        minus = [p - eps * d.view_as(p) for p, d in zip(theta_g, parts, strict=True)]
        numeric = (val_ce_after_one_real_step(plus) - val_ce_after_one_real_step(minus)) / (2 * eps)
        analytic = float(flat @ direction)
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_meta_step_moves_the_generator_downhill() -> None:
    """A small Adam step on ∇θ_g L_val lowers L_val of the look-ahead on the same batches (eq. 8)."""
    torch.set_default_dtype(torch.float64)
    try:
        sd = make("md", generator_lr=1e-4)
    finally:
        torch.set_default_dtype(torch.float32)
    x_a, y_a = batch(8, seed=1, dtype=torch.float64)
    x_b, y_b = batch(8, seed=2, dtype=torch.float64)
    before = sd.meta_step(x_a, y_a, x_b, y_b, lr=0.5)
    after, _ = sd.meta_gradient(x_a, y_a, x_b, y_b, 0.5)
    assert after.item() < before - 1e-9


def test_look_ahead_leaves_the_model_untouched() -> None:
    sd = make("md")
    x, y = batch()
    sd(x, y)["loss"].backward()  # some .grad on the real parameters
    grads = {n: p.grad.clone() for n, p in sd.named_parameters() if p.grad is not None}
    before = model_state(sd)
    gen_before = [p.detach().clone() for p in sd.generator.parameters()]
    sd.meta_step(x, y, *batch(seed=2), lr=0.1)
    assert_same(model_state(sd), before)  # parameters and BN running statistics
    assert {n: p.grad for n, p in sd.named_parameters() if p.grad is not None}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[n]) for n, p in sd.named_parameters() if p.grad is not None)
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, sd.generator.parameters(), strict=True))


def test_training_with_meta_steps_equals_one_real_step_alone(tiny_data: ImageDataset) -> None:
    """A training epoch of one batch with a meta step after it leaves model, exits and optimiser
    exactly as the same epoch without the meta step: only the generator moved."""
    # A constant lr: at the end of a 1-epoch cosine schedule ζ = 0 and the meta-gradient vanishes.
    cfg = from_dict(TrainConfig, {"epochs": 1, "progress": False, "channels_last": False, "log_every": 0,
                                  "schedule": {"name": "constant"}})
    trainers = []
    for meta in (True, False):
        sd = make("md")
        loader = BatchLoader(tiny_data, batch_size=len(tiny_data), shuffle=True, seed=0)
        callbacks = [MetaStep(sd, tiny_data, every=1, batch_size=8)] if meta else []
        trainer = Trainer(sd, loader, config=cfg, callbacks=callbacks)
        for cb in callbacks:
            cb.on_epoch_start(trainer, 0)
        trainer.train_epoch()
        trainers.append(trainer)
    with_meta, alone = trainers
    assert len(with_meta.callbacks[0]._losses) == 1
    assert_same(model_state(with_meta.distiller), model_state(alone.distiller))
    for a, b in zip(with_meta.optimizer.state.values(), alone.optimizer.state.values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    moved = [not torch.equal(a, b) for a, b in zip(with_meta.distiller.generator.parameters(),
                                                    alone.distiller.generator.parameters(), strict=True)]
    assert any(moved)


def test_meta_steps_every_m_epochs(tiny_data: ImageDataset, tmp_path) -> None:
    """Alg. 1: meta epochs are 0, M, 2M ... (0-based), with a meta step after every training step."""
    sd = make("md")
    calls: list[int] = []
    real_meta_step = sd.meta_step

    def counting_meta_step(x_a, y_a, x_b, y_b, zeta: float, factor: float) -> float:
        calls.append(trainer.epoch)
        assert zeta == trainer.optimizer.param_groups[0]["lr"]  # ζ = the current main lr
        assert factor == pytest.approx(zeta / 0.1)  # the generator's lr follows the main schedule
        loss = real_meta_step(x_a, y_a, x_b, y_b, zeta, factor)
        assert sd.generator_optimizer.param_groups[0]["lr"] == pytest.approx(sd.generator_lr * factor)
        return loss

    sd.meta_step = counting_meta_step
    loader = BatchLoader(tiny_data, batch_size=16, shuffle=True, seed=0)  # 3 batches per epoch
    cfg = TrainConfig(epochs=5, progress=False, channels_last=False, log_every=0)
    trainer = Trainer(sd, loader, config=cfg, run_dir=tmp_path, callbacks=[MetaStep(sd, tiny_data, every=2)])
    trainer.fit()
    assert calls == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    rows = [json.loads(line) for line in (tmp_path / "meta.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 3, 5] and all(r["meta_steps"] == 3 for r in rows)


def test_meta_step_needs_md_and_sane_arguments(tiny_data: ImageDataset) -> None:
    with pytest.raises(ValueError, match="method='md'"):
        MetaStep(make("sd"), tiny_data)
    with pytest.raises(RuntimeError, match="label generator"):
        make("dsn").meta_gradient(*batch(), *batch(), lr=0.1)
    with pytest.raises(ValueError, match="every"):
        MetaStep(make("md"), tiny_data, every=0)


# --------------------------------------------------------------------------- evaluation, checkpoints


def test_eval_logits_reuse_the_evaluated_forward_and_keep_modes() -> None:
    sd = make("md")
    x, y = batch()
    sd(x, y)  # BN running statistics move away from their init
    sd.student.eval()  # what Trainer.evaluate does: student in eval, exits untouched
    with torch.no_grad():
        logits = sd.student(x)
    cached = sd.eval_logits(x)
    assert sd.exits.training and not sd.student.training
    fresh = sd.eval_logits(x.clone())  # a new tensor: computed again
    for k in cached:
        torch.testing.assert_close(cached[k], fresh[k])
    probs = torch.stack([F.softmax(v, 1) for v in (cached["exit1"], cached["exit2"], logits)]).mean(0)
    torch.testing.assert_close(cached["ensemble"].exp(), probs)


def test_checkpoint_keeps_the_generator_optimiser(tmp_path) -> None:
    sd = make("md")
    x, y = batch()
    sd.meta_step(x, y, x, y, lr=0.1)
    save_atomic({"distiller": sd.state_dict()}, tmp_path / "c.pt")
    fresh = make("md", seed=5)
    load_state_strict(fresh, load_checkpoint(tmp_path / "c.pt")["distiller"], "distiller")
    for a, b in zip(sd.generator_optimizer.state.values(), fresh.generator_optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert fresh.generator_optimizer.state[fresh.generator.lateral[0].weight]  # keyed by the new parameters
    # The next meta step is the same on both.
    sd.meta_step(x, y, x, y, lr=0.1)
    fresh.meta_step(x, y, x, y, lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(sd.generator.parameters(), fresh.generator.parameters(),
                                                  strict=True))


def test_resumed_run_continues_exactly(tiny_data: ImageDataset, tmp_path) -> None:
    cfg = {"epochs": 2, "progress": False, "channels_last": False, "log_every": 0, "schedule": {"name": "constant"}}

    def trainer(epochs: int, run_dir) -> Trainer:
        sd = make("md")
        loader = BatchLoader(tiny_data, batch_size=16, shuffle=True, seed=0)
        return Trainer(sd, loader, config=from_dict(TrainConfig, {**cfg, "epochs": epochs}), run_dir=run_dir,
                       callbacks=[MetaStep(sd, tiny_data, every=1, batch_size=8)])

    straight = trainer(2, tmp_path / "a")
    straight.fit()
    first = trainer(1, tmp_path / "b")
    first.fit()
    resumed = trainer(2, tmp_path / "b")
    resumed.fit(resume=True)
    a, b = straight.distiller.state_dict(), resumed.distiller.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], Tensor))
    assert len((tmp_path / "b" / "meta.jsonl").read_text().splitlines()) == 2


# --------------------------------------------------------------------------- config, recipe, export


def test_config_section_and_method_alias() -> None:
    cfg = load_config(CONFIGS / "selfdistill.yaml", ["method=dsn"])
    assert cfg.teacher is None and cfg.selfdistill.method == "dsn" and cfg.selfdistill.alpha == 0.5
    assert load_config(CONFIGS / "selfdistill.yaml", ["selfdistill=null"]).selfdistill is None
    with pytest.raises(ConfigError, match="method"):
        load_config(CONFIGS / "selfdistill.yaml", ["method=byot"])
    with pytest.raises(ConfigError, match="alpha"):
        load_config(CONFIGS / "selfdistill.yaml", ["selfdistill.alpha=2"])


def test_teacher_in_a_selfdistill_config_is_an_error() -> None:
    from kdtune.selfdistill import from_config

    cfg = load_config(CONFIGS / "kd.yaml", ["method=md"])
    with pytest.raises(ConfigError, match="teacher-free"):
        from_config(cfg, TinyNet(), None, (1, 8, 8))


@pytest.mark.slow
def test_run_and_export_give_the_plain_trained_model(tmp_path) -> None:
    """`kdtune run` (md, real Fashion-MNIST, tiny) then `kdtune export`: a plain resnet8 whose
    predictions are the trained model's final output and whose accuracy is the run's test_acc."""
    from kdtune.cli import main as cli
    from kdtune.recipe import load_splits, run
    from kdtune.selfdistill import from_config

    cfg = from_dict(RunConfig, {
        "name": "md", "output_dir": str(tmp_path), "teacher": None,
        "data": {"dataset": "fashion_mnist", "train_per_class": 4, "batch_size": 8, "test_limit": 500},
        "student": {"name": "resnet8"},
        "selfdistill": {"method": "md", "meta_every": 1, "meta_steps": 2},
        "train": {"epochs": 2, "progress": False, "log_every": 0},
    })
    run_dir, summary = run(cfg)
    assert {"test_acc/exit1", "test_acc/exit2", "test_acc/ensemble"} <= set(summary["final"])
    assert len((run_dir / "meta.jsonl").read_text().splitlines()) == 2
    assert cli(["export", str(run_dir), str(tmp_path / "student.pt")]) == 0

    plain = create_model("resnet8", in_channels=1, num_classes=10)
    load_state_strict(plain, load_checkpoint(tmp_path / "student.pt"), "exported student")
    splits = load_splits(cfg)
    trained, _ = from_config(cfg, create_model("resnet8", in_channels=1), splits.train, (1, 28, 28))
    load_state_strict(trained, load_checkpoint(run_dir / "checkpoints" / "last.pt")["distiller"], "distiller")
    plain.eval()
    trained.eval()
    correct = 0
    with torch.no_grad():
        for x, y in BatchLoader(splits.test, 1000, shuffle=False):
            out = plain(x)
            assert torch.equal(out, trained.student(x))
            correct += int((out.argmax(1) == y).sum())
    assert correct / len(splits.test) == pytest.approx(summary["test_acc"], abs=1e-4)


# --------------------------------------------------------------------------- meta step: shared and truncated passes


def _meta_gradient_recomputing_everything(sd: SelfDistiller, x_train: Tensor, y_train: Tensor, x_val: Tensor,
                                          y_val: Tensor, lr: float) -> tuple[Tensor, list[Tensor]]:
    """The meta-gradient as computed before the look-ahead forward kept the generator's targets and the
    forward-mode pass stopped after the last exit: generator run again, full model in the jvp."""
    from torch.func import functional_call

    from kdtune.selfdistill.selfdistiller import _buffer_copies
    stepped = sd.student if sd.meta_objective == "final" else sd
    prefix = "student." if sd.meta_objective == "final" else ""
    theta = {prefix + n: p.detach().requires_grad_(True) for n, p in stepped.named_parameters()
             if p.requires_grad and not n.startswith("generator.")}
    out = functional_call(sd, {**theta, **_buffer_copies(sd)}, (x_train, y_train))
    features = [f.detach() for f in sd.features()]
    grads = torch.autograd.grad(out["loss"], list(theta.values()), allow_unused=True)
    theta_plus = {n: (t if g is None else t - lr * g).detach().requires_grad_(True)
                  for (n, t), g in zip(theta.items(), grads, strict=True)}
    final, exit_logits = sd._look_ahead_outputs(theta_plus, x_val, sd.meta_objective == "exits")
    val_loss = F.cross_entropy(final, y_val)
    for s in exit_logits:
        val_loss = val_loss + F.cross_entropy(s, y_val)
    v = torch.autograd.grad(val_loss, list(theta_plus.values()), allow_unused=True)
    direction = {n: torch.zeros_like(t) if vi is None else vi for (n, t), vi in zip(theta.items(), v, strict=True)}
    logits, change = torch.func.jvp(lambda th: tuple(sd._look_ahead_outputs(th, x_train)[1]),
                                    ({n: t.detach() for n, t in theta.items()},), (direction,))
    fused = sd.generator(features)
    targets = [sd._constant_head(head, f) for head, f in zip(sd.exits, fused, strict=True)]
    if sd.generator_anchor == "final":
        targets = [t + out["logits"].detach() - s.detach() for t, s in zip(targets, logits, strict=True)]
    exit_logits = [s.detach().requires_grad_(True) for s in logits]
    soft = sum((1.0 - sd.alpha) * kd(s, t, tau=sd.tau) for s, t in zip(exit_logits, targets, strict=True))
    slopes = torch.autograd.grad(soft, exit_logits, create_graph=True)
    inner = sum((slope * c).sum() for slope, c in zip(slopes, change, strict=True))
    return val_loss.detach(), list(torch.autograd.grad(-lr * inner, list(sd.generator.parameters())))


@pytest.mark.parametrize(("objective", "anchor"), [("exits", "final"), ("final", "final"), ("exits", "exit")])
def test_meta_gradient_equals_the_recomputing_one(objective: str, anchor: str) -> None:
    """Sharing the look-ahead forward's targets and stopping the jvp after the last exit change nothing
    but float rounding."""
    torch.set_default_dtype(torch.float64)
    try:
        sd = make("md", meta_objective=objective, generator_anchor=anchor)
        with torch.no_grad():
            for p in sd.generator.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    finally:
        torch.set_default_dtype(torch.float32)
    assert sd._exit_stop == "mid"  # the jvp stops after the last exit's stage
    moved = {n for n, _ in sd.named_parameters() if not n.startswith(("generator.", "student.last.", "student.fc."))}
    assert sd._exit_reach == moved  # and moves what the exits depend on
    args = (*batch(8, seed=1, dtype=torch.float64), *batch(8, seed=2, dtype=torch.float64), 0.5)
    val, grads = sd.meta_gradient(*args)
    ref_val, ref_grads = _meta_gradient_recomputing_everything(sd, *args)
    assert torch.equal(val, ref_val)
    scale = max(g.abs().max() for g in ref_grads)
    assert scale > 0
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, rtol=1e-12, atol=1e-12 * scale)
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for v in vars(sd).values())  # no graph kept


def test_generator_grad_forward_keeps_the_targets_it_used() -> None:
    sd = make("md")
    with torch.no_grad():
        for p in sd.generator.parameters():
            p.add_(0.1)
    x, y = batch()
    assert "gen/targets" not in sd(x, y)  # the training step hands out no graph
    out = sd(x, y, generator_grad=True)
    kept = out["gen/targets"].unbind(0)
    assert len(kept) == len(sd.exits)
    exits = [head(f) for head, f in zip(sd.exits, sd.features(), strict=False)]
    again = sd.soft_target_logits(sd.features(), out["logits"], exits, generator_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(kept, again, strict=True))
    assert all(t.requires_grad for t in kept)  # differentiable in θ_g
    gen = torch.autograd.grad(sum(t.sum() for t in kept), list(sd.generator.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in gen)


def test_truncated_look_ahead_gives_the_exits_of_the_full_one() -> None:
    """The forward-mode pass that stops after the last exit's stage: same exit outputs and tangents,
    and its stopping hook is gone afterwards."""
    sd = make("md")
    x, _ = batch()
    theta = {n: p.detach() for n, p in sd.named_parameters() if not n.startswith("generator.")}
    direction = {n: torch.randn_like(t) for n, t in theta.items()}
    hooks = len(sd.student.mid._forward_hooks)
    full = torch.func.jvp(lambda th: tuple(sd._look_ahead_outputs(th, x)[1]), (theta,), (direction,))
    cut = torch.func.jvp(lambda th: tuple(sd._look_ahead_outputs(th, x, final=False)[1]), (theta,), (direction,))
    assert len(sd.student.mid._forward_hooks) == hooks
    for a, b in zip([*full[0], *full[1]], [*cut[0], *cut[1]], strict=True):
        assert torch.equal(a, b)
    final, exits = sd._look_ahead_outputs(theta, x, final=False)
    assert final is None and len(exits) == 2


class StageChangedLater(ThreeStages):
    """The second stage's output is modified in place after the last stage has read it."""

    def __init__(self) -> None:
        super().__init__()
        self.mid = nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1), nn.BatchNorm2d(6))  # no op keeps its output for backward

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.stem(x))
        out = self.fc(self.last((h + 0.0).relu()).mean((2, 3)))
        h.mul_(2.0)  # the exit reads the doubled map
        return out


class StageCalledTwice(ThreeStages):
    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        self.mid(h)
        return self.fc(self.last(self.mid(h)).mean((2, 3)))


@pytest.mark.parametrize("model", [StageChangedLater, StageCalledTwice])
def test_look_ahead_runs_the_whole_model_when_stopping_early_is_unsafe(model: type[nn.Module]) -> None:
    torch.manual_seed(0)
    sd = SelfDistiller(model(), (1, 8, 8), method="md", stages=["stem", "mid", "last"])
    assert sd._exit_stop is None
    assert sd._eval_cache is None and not sd._capture.features  # the probe leaves nothing behind
    val, grads = sd.meta_gradient(*batch(seed=1), *batch(seed=2), 0.1)
    assert torch.isfinite(val) and all(torch.isfinite(g).all() for g in grads)
