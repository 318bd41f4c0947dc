"""Two processes on one run directory: runs started in the same second get their own directories;
a second process on a directory in use refuses with the holder's pid; a killed holder leaves no lock."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from faultlib import TINY_RUN, metrics_rows, start_kdtune, wait_for, write_config

from kdtune.checkpoint import load_checkpoint
from kdtune.cli import main
from kdtune.rundir import LOCK_FILE, create_run_dir

#: Every ``kdtune run`` in this process sees the same second, as two runs started together do.
SAME_SECOND = """
    import datetime as _dt
    import kdtune.recipe
    class FrozenClock(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0)
    kdtune.recipe.datetime = FrozenClock
"""


def test_runs_created_at_once_get_distinct_directories(tmp_path):
    made: list[Path] = []
    barrier = threading.Barrier(8)

    def make() -> None:
        barrier.wait()  # all threads ask for the same name at the same moment
        made.append(create_run_dir(tmp_path / "kd-s0-20260101-120000"))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)


def test_two_runs_with_one_name_and_seed_in_the_same_second_write_two_directories(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", {**TINY_RUN, "train": {**TINY_RUN["train"], "epochs": 2}},
                          tmp_path / "runs")
    children = [start_kdtune(["run", str(config)], SAME_SECOND) for _ in range(2)]
    for child in children:
        _, err = child.communicate(timeout=600)
        assert child.returncode == 0, err
    dirs = sorted((tmp_path / "runs").iterdir())
    assert [d.name for d in dirs] == ["tiny-s0-20260101-120000", "tiny-s0-20260101-120000-1"]
    for d in dirs:  # each a complete run of its own: no interleaved rows, its own checkpoint
        assert [r["epoch"] for r in metrics_rows(d)] == [1, 2]
        assert load_checkpoint(d / "checkpoints" / "last.pt")["epoch"] == 2


def test_a_directory_in_use_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    long_run = {**TINY_RUN, "train": {**TINY_RUN["train"], "epochs": 1000}}
    holder = start_kdtune(["run", str(write_config(tmp_path / "long.yaml", long_run, tmp_path / "runs"))])
    run_dir = wait_for(lambda: next((tmp_path / "runs").glob("*"), None), "the run directory")
    # The holder has its lock (its pid in the lock file) and a checkpoint to resume from.
    wait_for(lambda: (run_dir / LOCK_FILE).exists() and (run_dir / LOCK_FILE).read_text().strip()
             == str(holder.pid) and (run_dir / "checkpoints" / "last.pt").exists(), "the holder's first checkpoint")

    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"in use by process {holder.pid}" in err and "Traceback" not in err
    assert holder.poll() is None  # the holder was not disturbed

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # The kernel released the killed holder's lock: a resume runs (for one more epoch; the config said 1000).
    epoch = load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"]
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(config.replace("epochs: 1000", f"epochs: {epoch + 1}"))
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert [r["epoch"] for r in metrics_rows(run_dir)] == list(range(1, epoch + 2))
