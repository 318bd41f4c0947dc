"""Wall time of ``kdtune --help`` and ``kdtune list losses``: median of 5 fresh processes.

    .venv/bin/python benchmarks/cli_startup.py                  # this checkout
    .venv/bin/python benchmarks/cli_startup.py --src /tmp/old/src  # another checkout's src/ (e.g. main)

Each sample is a new interpreter running the ``kdtune`` console-script entry point
(``kdtune.cli:main``), so it includes every import the command triggers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ENTRY = "import sys; from kdtune.cli import main; sys.exit(main())"


def wall_seconds(args: list[str], src: str | None, repeats: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if src:
        env["PYTHONPATH"] = src
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", ENTRY, *args], env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", help="put this src/ directory first on PYTHONPATH (measure another checkout)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    for cmd in (["--help"], ["list", "losses"]):
        t = wall_seconds(cmd, a.src, a.repeats)
        print(f"kdtune {' '.join(cmd):12s} median {statistics.median(t):.2f} s  "
              f"(runs: {', '.join(f'{x:.2f}' for x in t)})", flush=True)


if __name__ == "__main__":
    main()
