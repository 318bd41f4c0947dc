"""kdtune.selfdistill.warmup: eq. 4's label weight a falls from 1 to alpha over the warm-up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import TinyNet
from kdtune.config import ConfigError, RunConfig, TrainConfig, from_dict
from kdtune.selfdistill import SelfDistiller
from kdtune.selfdistill.build import from_config
from kdtune.selfdistill.warmup import AlphaWarmup, alpha_at
from kdtune.trainer import Callback, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def make(method: str = "sd") -> SelfDistiller:
    torch.manual_seed(0)
    return SelfDistiller(TinyNet(), (1, 8, 8), method=method, stages=["blocks.0", "blocks.1"])


@pytest.mark.parametrize(("step", "total", "warmup", "expected"), [
    (0, 100, 1.0, 1.0), (50, 100, 1.0, 0.75), (99, 100, 1.0, 0.505), (100, 100, 1.0, 0.5),
    (10, 100, 0.2, 0.75), (20, 100, 0.2, 0.5), (80, 100, 0.2, 0.5), (0, 100, 0.0, 0.5)])
def test_alpha_falls_linearly_from_one_to_alpha_over_the_warmup(step, total, warmup, expected):
    assert alpha_at(step, total, 0.5, warmup) == pytest.approx(expected)


def test_the_callback_sets_alpha_from_the_global_step():
    sd = make()
    cb = AlphaWarmup(sd, alpha=0.2, warmup=0.5)
    trainer = SimpleNamespace(cfg=SimpleNamespace(epochs=2), train_loader=[None] * 10, global_step=5)
    cb.on_batch_start(trainer, None, None)  # 20 steps, ramp over 10: halfway from 1 to 0.2
    assert sd.alpha == pytest.approx(0.6)
    trainer.global_step = 15
    cb.on_batch_start(trainer, None, None)
    assert sd.alpha == pytest.approx(0.2)


class Recorder(Callback):
    def __init__(self) -> None:
        self.alphas: list[float] = []

    def on_batch_end(self, trainer, out) -> None:
        self.alphas.append(float(out["w/exit_labels"]))


def test_a_run_steps_with_alpha_falling_from_one_to_alpha(tiny_data):
    sd, seen = make(), Recorder()
    trainer = Trainer(sd, tiny_data, config=TrainConfig(epochs=2, progress=False, channels_last=False),
                      callbacks=(AlphaWarmup(sd, alpha=0.5, warmup=1.0), seen))
    trainer.fit()
    steps = 2 * len(trainer.train_loader)
    assert seen.alphas == pytest.approx([1.0 - 0.5 * s / steps for s in range(steps)])


def test_dsn_and_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sd or md"):
        AlphaWarmup(make("dsn"), alpha=0.5, warmup=0.5)
    with pytest.raises(ValueError, match="warmup"):
        AlphaWarmup(make("sd"), alpha=0.5, warmup=1.5)
    base = {"teacher": None, "student": {"name": "resnet8"}, "data": {"dataset": "fashion_mnist"}}
    with pytest.raises(ConfigError, match="alpha_warmup"):
        from_dict(RunConfig, {**base, "selfdistill": {"method": "sd", "alpha_warmup": 1.5}})
    with pytest.raises(ConfigError, match="alpha_warmup"):
        from_dict(RunConfig, {**base, "selfdistill": {"method": "sd", "alpha_warmup": -0.1}})


@pytest.mark.parametrize(("method", "warmup", "added"), [("sd", None, True), ("md", None, True), ("sd", 0.0, False),
                                                      ("sd", 0.3, True), ("dsn", None, False)])
def test_the_config_warms_a_up_by_default_for_soft_targets(tiny_data, method, warmup, added):
    section = {"method": method, **({} if warmup is None else {"alpha_warmup": warmup})}
    cfg = from_dict(RunConfig, {"teacher": None, "student": {"name": "resnet8"}, "data": {"dataset": "fashion_mnist"},
                                "selfdistill": section})
    _, callbacks = from_config(cfg, TinyNet(), tiny_data, (1, 8, 8))
    warmups = [c for c in callbacks if isinstance(c, AlphaWarmup)]
    assert bool(warmups) is added
    if warmups:
        assert warmups[0].warmup == (1.0 if warmup is None else warmup) and warmups[0].alpha == 0.5
