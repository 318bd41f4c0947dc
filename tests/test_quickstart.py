"""`kdtune quickstart` (make demo's job) at a toy budget: every row trains and lands in the table."""

from __future__ import annotations

import json
from pathlib import Path

from kdtune.config import load_config
from kdtune.quickstart import ROWS, SEARCH_ROWS, autokd_rows, distpro_rows, main


def test_quickstart_trains_every_row_in_two_workers_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(str(out), epochs=1, per_class=3, jobs=2, test_images=40) == 0
    printed = capsys.readouterr().out
    labels = [label for label, _ in [*ROWS, *distpro_rows(str(out)), *autokd_rows()]]
    table = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    shown = [label + " (search)" if label in SEARCH_ROWS else label for label in labels]
    assert [line.split(" | ")[0][2:] for line in table] == shown  # every row, in ROWS order, searches marked
    # A newcomer's questions answered under the table; the rows' own logs (trials, Optuna) kept out.
    for explained in ("agreement err %:", "time s:", "2x the wall time", "(search) DistPro search:",
                      "below zero by design", "Plots: ", "curves.png"):
        assert explained in printed
    assert "trial 0:" not in printed and "run directory:" not in printed
    run_dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(run_dirs) == len(labels)
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert 0.0 <= summary["test_acc"] <= 1.0
        assert load_config(run_dir / "config.yaml").data.test_limit == 40
    # The retrain replays the process its search wrote; the self-distillation row has no teacher.
    (retrain,) = [p for p in run_dirs if p.name.startswith("distpro_retrain")]
    assert load_config(retrain / "config.yaml").distill.weighting.kwargs["file"] == str(out / "distpro_process.json")
    assert Path(out / "distpro_process.json").exists()
    # The Auto-KD row searched (4 proxy trials) and then trained its best spec.
    (autokd,) = [p for p in run_dirs if p.name.startswith("auto-kd_mcts")]
    info = json.loads((autokd / "autokd.json").read_text())
    assert info["complete_trials"] == 4 and (autokd / "best.yaml").exists()
    assert json.loads((autokd / "summary.json").read_text())["autokd"]["best_reward"] == info["best_reward"]
    (md,) = [p for p in run_dirs if p.name.startswith("self-distill_md")]
    assert load_config(md / "config.yaml").teacher is None


def test_test_limit_keeps_the_first_test_images():
    from kdtune.config import RunConfig, from_dict
    from kdtune.data import load_fashion_mnist
    from kdtune.recipe import load_splits

    cfg = from_dict(RunConfig, {"data": {"train_per_class": 2, "test_limit": 7}, "student": {"name": "resnet8"}})
    splits = load_splits(cfg)
    full = load_fashion_mnist("test")
    assert len(splits.test) == 7 and len(splits.train) == 20
    assert splits.test.images.equal(full.images[:7]) and splits.test.labels.equal(full.labels[:7])
