"""SIGKILL at the worst moments: halfway through writing a checkpoint, halfway through appending a
metrics row. The previous checkpoint still loads, ``--resume`` finishes the run, and the resumed
run's metrics, checkpoint and results are those of a run that was never interrupted.

The kill is made deterministic by a patch in the child process (no sleeps): ``torch.save`` writes
half of the epoch-2 checkpoint then kills its own process; ``Trainer._write`` does the same with
half of the epoch-2 metrics row.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from faultlib import TINY_RUN, metrics_rows, start_kdtune, without_timing, write_config

from kdtune.checkpoint import load_checkpoint
from kdtune.cli import main

KILL_IN_CHECKPOINT = """
    import io, os, signal, torch
    real_save = torch.save
    def torn_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:  # the second checkpoint: half of it, then die
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = torn_save
"""

KILL_IN_METRICS = """
    import os, signal
    from kdtune.trainer import Trainer
    real_write = Trainer._write
    def torn_write(self, name, text, mode="a"):
        if name == "metrics.jsonl" and mode == "a" and self.epoch == 2:  # epoch 2's row: half of it, then die
            real_write(self, name, text[: len(text) // 2], mode)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(self, name, text, mode)
    Trainer._write = torn_write
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    assert main(["run", str(write_config(root / "tiny.yaml", TINY_RUN, root / "runs"))]) == 0
    (run_dir,) = (root / "runs").iterdir()
    return run_dir


# An epoch's checkpoint is written before its metrics row: killed in the epoch-2 checkpoint, the run
# has the epoch-1 checkpoint and row; killed in the epoch-2 row, it has the epoch-2 checkpoint.
@pytest.mark.parametrize("prelude,saved_epoch", [(KILL_IN_CHECKPOINT, 1), (KILL_IN_METRICS, 2)],
                         ids=["during-checkpoint-write", "during-metrics-append"])
def test_sigkill_mid_write_resumes_to_the_uninterrupted_result(tmp_path, reference, prelude, saved_epoch):
    config = write_config(tmp_path / "tiny.yaml", TINY_RUN, tmp_path / "runs")
    child = start_kdtune(["run", str(config)], prelude)
    out, err = child.communicate(timeout=600)
    assert child.returncode == -signal.SIGKILL, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"run directory: {run_dir}" in out  # said at the start, so a crash still says where to look

    # The previous checkpoint is intact and loads; the torn write is only a temporary file or a torn line.
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == saved_epoch
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if line.endswith("}")]) == 1  # epoch 2's row never landed whole

    assert main(["run", "--resume", str(run_dir)]) == 0
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    rows = metrics_rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # every epoch once: nothing lost, nothing twice
    assert without_timing(rows) == without_timing(json.loads(ckpt["history"]))  # metrics agree with checkpoint
    assert without_timing(rows) == without_timing(metrics_rows(reference))  # as if never interrupted
    steps = [json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == list(range(1, 7))
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # the torn temporary file was cleaned up
