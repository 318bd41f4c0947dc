"""What keeping freed memory in the process (``train.keep_freed_memory``, :mod:`kdtune.allocator`) saves
in real runs: ``kdtune run`` with it off and on, alternately.

    OMP_NUM_THREADS=1 python benchmarks/allocator.py                  # writes its RESULTS.md section
    OMP_NUM_THREADS=1 python benchmarks/allocator.py --epochs 1 --rounds 1 --configs configs/fmnist/kd.yaml \
        --test-limit 100 --no-write                                   # smoke

Each config (FMNIST-5k's protocol by default: student alone, KD, DSN) runs ``--epochs`` epochs, one
torch thread, evaluation on the first ``--test-limit`` test images, once with
``train.keep_freed_memory=false`` (glibc malloc's defaults) and once with ``true``, the order reversed
every other round. Measured per run from the child process's ``getrusage``: CPU seconds (user + system)
and minor page faults; and the run's own ``train_seconds`` (summary.json). The table gives medians over
rounds and the median of the per-round CPU ratios (kept / defaults). Runs go to a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/fmnist/student.yaml", "configs/fmnist/kd.yaml",
           "configs/fmnist/selfdistill.yaml method=dsn"]


def one_run(config: str, keep: bool, epochs: int, test_limit: int, out: Path, tag: str) -> dict[str, float]:
    """Run ``kdtune run`` in a child process; its CPU seconds, minor faults and train_seconds."""
    path, *overrides = config.split()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "kdtune.cli", "run", str(ROOT / path), *overrides, f"epochs={epochs}",
                    f"train.keep_freed_memory={str(keep).lower()}", "train.threads=1", "train.progress=false",
                    f"data.test_limit={test_limit}", f"output_dir={out}", f"name={tag}"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (run_dir,) = out.glob(f"{tag}-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "sys_s": after.ru_stime - before.ru_stime, "faults": after.ru_minflt - before.ru_minflt,
            "train_s": summary["train_seconds"]}


def measure(configs: list[str], epochs: int, rounds: int, test_limit: int) -> dict[str, dict[str, dict]]:
    """{config: {"false" | "true": medians, "ratio": median per-round CPU ratio kept / defaults}}."""
    out = Path(tempfile.mkdtemp(prefix="kdtune-allocator-"))
    table: dict[str, dict[str, dict]] = {}
    for c, config in enumerate(configs):
        per_round = []
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            per_round.append({keep: one_run(config, keep, epochs, test_limit, out, f"c{c}r{r}{keep}")
                              for keep in order})
        table[config] = {str(keep).lower(): {k: statistics.median(b[keep][k] for b in per_round)
                                              for k in per_round[0][keep]} for keep in (False, True)}
        table[config]["ratio"] = {"cpu": statistics.median(b[True]["cpu_s"] / b[False]["cpu_s"] for b in per_round),
                                  "train": statistics.median(b[True]["train_s"] / b[False]["train_s"]
                                                             for b in per_round)}
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=CONFIGS, help="config paths, each with its overrides")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from timing import load_note

    table = measure(args.configs, args.epochs, args.rounds, args.test_limit)
    command = "OMP_NUM_THREADS=1 python benchmarks/allocator.py " + " ".join(sys.argv[1:])
    lines = [
        "### `train.keep_freed_memory`: whole runs with malloc's defaults vs freed memory kept (issue 16)", "",
        f"Command: `{command.strip()}` — {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, "
        f"{load_note()} at the end. FMNIST-5k protocol, {args.epochs} epochs, one torch thread, test on "
        f"{args.test_limit} images; {args.rounds} rounds, off/on alternately; medians; ratio: median of per-round "
        "ratios (kept / defaults). CPU = user + system seconds of the whole `kdtune run` process.", "",
        "| config | CPU s, defaults | CPU s, kept | system s, defaults → kept | minor faults, defaults → kept "
        "| train s, defaults → kept | CPU ratio | train-time ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| `{config}` | {t['false']['cpu_s']:.1f} | {t['true']['cpu_s']:.1f} | {t['false']['sys_s']:.2f} → "
          f"{t['true']['sys_s']:.2f} | {t['false']['faults']:,.0f} → {t['true']['faults']:,.0f} | "
          f"{t['false']['train_s']:.1f} → {t['true']['train_s']:.1f} | {t['ratio']['cpu']:.3f}× | "
          f"{t['ratio']['train']:.3f}× |" for config, t in table.items()], "",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        from run import write_section

        write_section("allocator", body)


if __name__ == "__main__":
    main()
