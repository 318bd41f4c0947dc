"""Helpers of the fault-injection tests: tiny run configs, a killable ``kdtune`` subprocess, waits on states."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

#: A student-only run on 20 Fashion-MNIST images: 2 steps an epoch, seconds in all.
TINY_RUN: dict[str, Any] = {
    "seed": 0, "name": "tiny",
    "data": {"dataset": "fashion_mnist", "train_per_class": 2, "test_limit": 50, "batch_size": 10},
    "student": {"name": "resnet8"},
    "train": {"epochs": 3, "progress": False, "log_every": 1},
}

#: Timing keys of a metrics row: the only ones a resumed run may change.
TIMING = ("seconds", "img_per_s")


def write_config(path: Path, config: dict[str, Any], output_dir: Path) -> Path:
    path.write_text(yaml.safe_dump({**config, "output_dir": str(output_dir)}))
    return path


def start_kdtune(argv: list[str], prelude: str = "", **env: str) -> subprocess.Popen[str]:
    """``kdtune <argv>`` in a new interpreter, after running ``prelude`` (which may patch kdtune)."""
    code = textwrap.dedent(prelude) + "\nimport sys\nfrom kdtune.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *argv], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 300.0) -> Any:
    """Poll ``condition`` until it returns something truthy (a state, not a guessed duration)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` parsed strictly (a torn line or a bare NaN fails the test)."""
    def refuse(c: str) -> None:
        raise AssertionError(f"non-standard JSON constant {c}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
