"""Train a table's configs x seeds and write its mean ± std table into benchmarks/RESULTS.md.

    python benchmarks/run.py core                  # FMNIST-5k: student alone, KD, FitNets+KD, AT+KD
    python benchmarks/run.py core --seeds 0 1 2 --jobs 2 --threads 1
    python benchmarks/run.py core --write-only     # rebuild the table from finished runs

Each run is ``kdtune run <config> seed=<s>`` in ``runs/bench/<table>/``; a run with a
``summary.json`` is not trained again, so an interrupted benchmark continues where it stopped.
``--jobs 2 --threads 1`` (two single-threaded runs side by side) uses 2 cores better than one
2-threaded run. The table lands between ``<!-- table:<name> -->`` markers in RESULTS.md, with
the command, date and machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

#: table name -> (title, [(row label, config path, extra overrides)])
TABLES: dict[str, tuple[str, list[tuple[str, str, list[str]]]]] = {
    "core": ("FMNIST-5k, ResNet-56 teacher -> ResNet-8 student, 30 epochs", [
        ("student alone", "configs/fmnist/student.yaml", []),
        ("KD", "configs/fmnist/kd.yaml", []),
        ("FitNets + KD", "configs/fmnist/fitnets_kd.yaml", []),
        ("AT + KD", "configs/fmnist/at_kd.yaml", []),
    ]),
}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def finished_run(out: Path, name: str, seed: int) -> Path | None:
    done = sorted(p for p in out.glob(f"{name}-s{seed}-*") if (p / "summary.json").exists())
    return done[-1] if done else None


def train(out: Path, label: str, config: str, overrides: list[str], seed: int, threads: int) -> Path:
    name = slug(label)
    done = finished_run(out, name, seed)
    if done is not None:
        return done
    cmd = [sys.executable, "-m", "kdtune.cli", "run", str(ROOT / config), f"seed={seed}", f"name={name}",
           f"output_dir={out}", "train.progress=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    done = finished_run(out, name, seed)
    assert done is not None, f"{name} seed {seed} finished without a summary"
    return done


def mean_std(values: list[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def table_markdown(name: str, seeds: list[int], out: Path, command: str) -> str:
    title, rows = TABLES[name]
    lines = [f"### {title}", "",
             f"Command: `{command}` — {datetime.date.today().isoformat()}, {platform.machine()}, "
             f"{os.cpu_count()} cores. Seeds {', '.join(map(str, seeds))}; final-epoch test accuracy on the "
             "10,000 test images and top-1 agreement error with the teacher, mean ± std over seeds.", "",
             "| method | test acc % | agreement err % | time / run (s) | seeds |", "|---|---:|---:|---:|---:|"]
    for label, _config, _ in rows:
        runs = [finished_run(out, slug(label), s) for s in seeds]
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs if r is not None]
        if not summaries:
            lines.append(f"| {label} | not run | | | 0 |")
            continue
        acc = mean_std([s["test_acc"] for s in summaries])
        agree = ([s["agreement_error"] for s in summaries if s.get("agreement_error") is not None])
        secs = statistics.mean(s["train_seconds"] for s in summaries)
        lines.append(f"| {label} | {acc} | {mean_std(agree) if agree else '—'} | {secs:.0f} | {len(summaries)} |")
    return "\n".join(lines) + "\n"


def write_section(name: str, body: str) -> None:
    start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{start}\n{body}{end}"
    if start in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)), help="torch threads per run")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--write-only", action="store_true", help="only rebuild the table from finished runs")
    args = p.parse_args()

    out = Path(args.out) / args.table
    _title, rows = TABLES[args.table]
    if not args.write_only:
        jobs = [(label, cfg, ov, s) for s in args.seeds for label, cfg, ov in rows]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda j: train(out, *j, threads=args.threads), jobs))
    command = f"python benchmarks/run.py {args.table} --seeds {' '.join(map(str, args.seeds))}"
    body = table_markdown(args.table, args.seeds, out, command)
    write_section(args.table, body)
    print(body)


if __name__ == "__main__":
    main()
