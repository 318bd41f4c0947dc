"""kdtune.rundir: a refused run's directory is removed only when nothing but its lock is in it."""

from __future__ import annotations

from kdtune.rundir import LOCK_FILE, create_run_dir, remove_if_unused, run_lock


def test_an_unused_run_directory_is_removed(tmp_path):
    run = create_run_dir(tmp_path / "kd-s0-20261202-000000")
    with run_lock(run):
        pass  # the lock file stays behind, as after a run refused on bad input
    assert (run / LOCK_FILE).exists()
    assert remove_if_unused(run) is True
    assert not run.exists()


def test_a_run_directory_with_any_file_is_kept(tmp_path):
    run = create_run_dir(tmp_path / "kd-s0-20261202-000000")
    (run / "config.yaml").write_text("seed: 0\n")
    assert remove_if_unused(run) is False
    assert (run / "config.yaml").read_text() == "seed: 0\n"
    assert remove_if_unused(tmp_path / "missing") is False
