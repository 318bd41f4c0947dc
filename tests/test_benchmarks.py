"""The benchmark tables (benchmarks/run.py) are hours of training: check their wiring without training.

Every row must name a config that loads with its overrides (a typo in an override key would only
surface after the rows before it trained), every ``@table/label`` reference must resolve, and the
files that fresh clones replay (DistPro process, Auto-KD specs) must be committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kdtune.config import load_config

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
