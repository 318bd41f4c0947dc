"""Path weights over training (Adaptive Distillation Fig. 4): logged each step, plotted, reported."""

import json

import pytest

from helpers import TinyNet
from kdtune.cli import main
from kdtune.config import TrainConfig
from kdtune.data import BatchLoader
from kdtune.distiller import Distiller
from kdtune.pathways import Pathway
from kdtune.report import plot_weights, read_steps, weight_series
from kdtune.trainer import Trainer


@pytest.mark.parametrize("weighting", ["adaptive", "mgda"])
def test_weights_and_gradient_cosines_are_logged_and_plotted(tmp_path, tiny_data, weighting):
    d = Distiller(TinyNet(), TinyNet(width=6), pathways=[Pathway("blocks.0", "blocks.0", method="at"),
                                                         Pathway("blocks.1", "blocks.1", method="at")],
                  logit_losses=["kd"], weighting=weighting, input_shape=(1, 8, 8),
                  weighting_kwargs={"fixed": []})  # kd a path too (the paper's form)
    cfg = TrainConfig(epochs=2, progress=False, log_every=1, channels_last=False)
    Trainer(d, BatchLoader(tiny_data, 10), None, cfg, run_dir=tmp_path).fit()
    rows = read_steps(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert r["w/at:blocks.0->blocks.0"] == r["w/at:blocks.1->blocks.1"]  # one path: one weight
        if weighting == "mgda":
            assert r["w/kd"] + r["w/at:blocks.0->blocks.0"] == pytest.approx(1.0, abs=1e-5)  # on the simplex
            assert -1 <= r["cos/kd|at"] <= 1
    if weighting == "adaptive":
        assert rows[0]["w/kd"] != rows[-1]["w/kd"]  # learned: the weights move
        assert not any(k.startswith("cos/") for k in rows[0])
    assert (tmp_path / "weights.png").stat().st_size > 0  # written at the end of fit
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "w/kd" in epochs[-1]


def test_plot_weights_without_weights_and_report(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert plot_weights(run) is None  # no steps.jsonl
    (run / "steps.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert plot_weights(run) is None  # steps, but no weights
    rows = [{"step": s, "w/kd": 1.0 / s, "w/at:a->a": 100.0 * s, "w/at:b->b": 100.0 * s, "cos/kd|at": 0.1}
            for s in range(1, 5)]
    (run / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.5}) + "\n")
    assert main(["report", str(run)]) == 0
    assert f"weights: {run / 'weights.png'}" in capsys.readouterr().out
    assert (run / "weights.png").stat().st_size > 0


def test_weight_series_labels_only_the_heaviest_paths_when_there_are_many():
    keys = [f"w/p{i}" for i in range(27)] + ["w/at:a->a", "w/at:b->b"]
    rows = [{"step": s, **{f"w/p{i}": i * s / 1000 for i in range(27)}, "w/at:a->a": 0.5, "w/at:b->b": 0.5}
            for s in (1, 2)]
    lines = weight_series(rows, keys, max_labelled=8)
    assert len(lines) == 28  # the two AT terms share one weight: one line
    labelled = [line["label"] for line in lines if line["label"] is not None]
    assert labelled == ["at (2 terms)", "p26", "p25", "p24", "p23", "p22", "p21", "p20"]  # by peak weight
    others = [line for line in lines if line["label"] is None]
    assert [line["others_label"] for line in others] == ["other 20 paths"] + [None] * 19
    assert lines[1]["steps"] == [1, 2] and lines[1]["values"] == [0.026, 0.052]


def test_weight_series_keeps_every_label_when_few():
    rows = [{"step": 1, "w/kd": 0.3, "w/at:x": None}, {"step": 2, "w/kd": 0.2, "w/at:x": 0.7}]
    lines = weight_series(rows, ["w/at:x", "w/kd"])
    assert [(line["label"], line["steps"], line["values"]) for line in lines] == [
        ("at:x", [2], [0.7]), ("kd", [1, 2], [0.3, 0.2])]
