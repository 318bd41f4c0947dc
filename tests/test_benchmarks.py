"""The benchmark tables (benchmarks/run.py) are hours of training: check their wiring without training.

Every row must name a config that loads with its overrides (a typo in an override key would only
surface after the rows before it trained), every ``@table/label`` reference must resolve, and the
files that fresh clones replay (DistPro process, Auto-KD specs) must be committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kdtune.build import build_model
from kdtune.capture import find_stage_outputs
from kdtune.config import load_config
from kdtune.models import MODELS
from kdtune.plugins import import_plugins

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import run  # noqa: E402

ROWS = [(table, row) for table, (_title, rows) in run.TABLES.items() for row in rows]


@pytest.mark.parametrize(("table", "row"), ROWS, ids=[f"{t}/{r[0]}" for t, r in ROWS])
def test_every_row_loads_with_its_overrides(table, row, tmp_path):
    out, label, config, overrides = run.resolve_row(tmp_path / table, *row)
    cfg = load_config(ROOT / config, ["seed=0", f"name={run.slug(label)}", f"output_dir={out}",
                                      "train.progress=false", *overrides])
    assert cfg.seed == 0


def test_replayed_files_are_committed():
    assert (ROOT / run.DISTPRO_PROCESS).is_file()
    assert all((ROOT / spec).is_file() for spec in run.AUTOKD_SPECS.values())
    own = load_config(ROOT / "configs" / "mnist_own" / "protocol.yaml", [])
    assert all((ROOT / f).is_file() for f in (run.DISTPRO_PROCESS_OWN, run.AUTOKD_SPEC_OWN, own.teacher.checkpoint))


def test_own_pair_plugin_models_load_from_the_repository_root_and_have_three_stages(monkeypatch):
    """MNIST-3k-own's pair as benchmarks/run.py's runs see it (cwd = repository root): the plugin imports, the
    committed teacher checkpoint loads strictly, and stage finding picks blocks out of the nested containers."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(MODELS, "_items", dict(MODELS._items))  # the plugin's models are gone after the test
    cfg = load_config(ROOT / "configs" / "mnist_own" / "protocol.yaml", [])
    import_plugins(cfg.plugins)
    teacher = build_model(cfg.teacher, in_channels=1, num_classes=10)
    student = build_model(cfg.student, in_channels=1, num_classes=10)
    x = torch.zeros(2, 1, 28, 28)
    assert find_stage_outputs(teacher, x) == ["body.low.1", "body.high.0", "body.high.3"]
    assert find_stage_outputs(student, x) == ["units.a", "units.c", "units"]
    assert 300_000 <= sum(p.numel() for p in teacher.parameters()) <= 1_000_000
    assert 30_000 <= sum(p.numel() for p in student.parameters()) <= 60_000


def test_references_resolve_to_a_row_of_their_table(tmp_path):
    out, label, config, _ = run.resolve_row(tmp_path / "distpro_fast", "process, 30 epochs",
                                            "@distpro/DistPro process", [])
    assert (out.name, label, config) == ("distpro", "DistPro process", "configs/fmnist/distpro_retrain.yaml")
    with pytest.raises(KeyError, match="its rows"):
        run.resolve_row(tmp_path / "x", "y", "@core/no such row", [])


def test_labels_are_unique_within_a_table():
    for table, (_title, rows) in run.TABLES.items():
        slugs = [run.slug(label) for label, *_ in rows]
        assert len(slugs) == len(set(slugs)), table


def test_search_rows_measured_with_the_raw_hypergradient_keep_it():
    """The default undoes the lr decay since 2026-12-06; every DistPro search row resolves to the form it ran
    with: the raw hypergradient unless the row asks for the undone one."""
    searches = [(label, overrides) for _table, (_title, rows) in run.TABLES.items()
                for label, config, overrides in rows if config.endswith("distpro_search.yaml")]
    assert searches
    for label, overrides in searches:
        cfg = load_config(ROOT / "configs" / "fmnist" / "distpro_search.yaml", [o for o in overrides
                                                                                if o.startswith("distpro.undo")])
        assert cfg.distpro.undo_lr_decay == ("lr decay undone" in label), label
