"""Run directories: each run gets its own, created exclusively, and locked while a process uses it.

Two ``kdtune run`` started in the same second with the same name and seed must not share a
directory, so a new one is made with ``mkdir`` *without* ``exist_ok`` — the file system lets
exactly one process create a given name — and a taken name moves on to the next suffix.

A process that trains in a directory (a new run, ``--resume``, a search) holds an exclusive
``fcntl.flock`` on ``<run>/.lock`` for as long as it works there; the lock file holds its pid, so a
second process refuses with the holder's pid. The kernel drops the lock when the holder exits,
however it exits (SIGKILL included), so a crashed run never leaves a stale lock. ``flock`` is
advisory and local: it does not protect a directory on a network file system shared by machines.
"""

from __future__ import annotations

import fcntl
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdtune.errors import KdtuneError

LOCK_FILE = ".lock"


class RunLockedError(KdtuneError, RuntimeError):
    """Another process is training in this run directory."""


def create_run_dir(base: str | os.PathLike[str]) -> Path:
    """Create and return a new, empty directory ``base`` (or ``base-1``, ``base-2`` ... if taken).

    The creation is exclusive: of several processes asking for the same ``base`` at once, each gets
    a different directory.
    """
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in itertools.count():
        path = base if i == 0 else Path(f"{base}-{i}")
        try:
            path.mkdir()  # no exist_ok: fails if another process got this name first
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def remove_if_unused(run_dir: str | os.PathLike[str]) -> bool:
    """Remove ``run_dir`` if nothing but its lock file is in it (a run that failed before writing
    anything); a directory holding any other file is kept. Returns whether it was removed."""
    path = Path(run_dir)
    if not path.is_dir() or any(p.name != LOCK_FILE for p in path.iterdir()):
        return False
    (path / LOCK_FILE).unlink(missing_ok=True)
    path.rmdir()
    return True


@contextmanager
def run_lock(run_dir: str | os.PathLike[str], wait: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of ``run_dir`` for the ``with`` block.

    Args:
        run_dir: an existing run directory.
        wait: block until the holder is done (a search re-running a trial) instead of refusing.

    Raises:
        RunLockedError: ``run_dir`` is locked by another process (only when ``wait`` is False).
    """
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RunLockedError(
                f"{run_dir} is in use by process {_holder(path)} (lock file {path}); wait for it to finish "
                f"or stop it, then retry — two processes training in one run directory would mix their "
                f"metrics and checkpoints") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # still locked: nobody reads a pid of a process that is gone
    finally:
        os.close(fd)  # releases the lock


def _holder(lock_path: Path) -> str:
    """The pid written in a lock file (``unknown`` while its holder has not written it yet)."""
    try:
        return lock_path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"
