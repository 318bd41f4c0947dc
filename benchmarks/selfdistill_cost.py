"""Training cost of self-distillation: DSN, SD and MD (MetaDistiller) relative to plain training.

    python benchmarks/selfdistill_cost.py                           # FMNIST-5k, resnet8 + wrn_16_1, 10 epochs
    python benchmarks/selfdistill_cost.py --models resnet8 --epochs 2 --per-class 10 --meta-every 1 --no-write
    python benchmarks/selfdistill_cost.py --cpu --threads 1 --models resnet8 --epochs 5 --against de0cf31 --no-write

Each (model, method) is trained once with ``configs/fmnist/selfdistill.yaml`` (the FMNIST-5k
protocol, no teacher) for ``--epochs`` epochs; the cost is the training time of those epochs
(the Trainer's per-epoch ``seconds``: forward, backward, optimiser and, for MD, the meta steps
that run after the training steps of every M-th epoch; evaluation excluded). MD's meta epochs
are reported apart: an MD run costs ``(E - E/M) * normal + (E/M) * meta`` epochs. With
``--epochs`` a multiple of M the share of meta epochs is that of a full run. Timings need a
quiet machine: anything else running inflates them unevenly. The table goes between
``<!-- table:selfdistill_cost -->`` markers in RESULTS.md (not with ``--no-write``).

``--cpu`` times each training epoch (``Trainer.train_epoch``) by the process's CPU time instead, which
other jobs on a shared machine inflate far less than wall-clock seconds. ``--against REV`` adds an MD
run whose SelfDistiller is ``src/kdtune/selfdistill/selfdistiller.py`` at git revision REV, right
before this tree's MD run (an A/B of a change to MD's cost).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import write_section  # noqa: E402  (benchmarks/run.py, next to this file)
from selfdistill_step_cost import _old_class  # noqa: E402

import kdtune.selfdistill.build as build  # noqa: E402
from kdtune.config import load_config  # noqa: E402
from kdtune.recipe import run  # noqa: E402
from kdtune.selfdistill import SelfDistiller  # noqa: E402
from kdtune.trainer import Trainer  # noqa: E402

CONFIG = ROOT / "configs" / "fmnist" / "selfdistill.yaml"
#: label -> the override selecting the method ("MD @REV" runs MD too).
OVERRIDES = {"plain": "selfdistill=null", "DSN": "method=dsn", "SD": "method=sd", "MD": "method=md"}


#: Process-CPU seconds of each training epoch of the current run (``--cpu``), filled by :func:`time_cpu`.
EPOCH_CPU: list[float] = []


def time_cpu() -> None:
    """Record ``time.process_time`` around every ``Trainer.train_epoch`` (steps and meta steps only)."""
    train_epoch = Trainer.train_epoch

    def timed(self: Trainer) -> dict:
        t0 = time.process_time()
        row = train_epoch(self)
        EPOCH_CPU.append(time.process_time() - t0)
        return row

    Trainer.train_epoch = timed


def epoch_seconds(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["seconds"] for r in rows]


def measure(model: str, label: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Train one run; its total training seconds and mean seconds of normal and meta epochs."""
    override = OVERRIDES[label.split()[0]]
    overrides = [override, f"student.name={model}", f"epochs={args.epochs}", f"seed={args.seed}",
                 f"data.train_per_class={args.per_class}", f"selfdistill.meta_every={args.meta_every}",
                 f"output_dir={out}", f"name={model}-{label.split()[0].lower()}", "train.progress=false",
                 "train.log_every=0", f"train.threads={args.threads}"]
    if override == "selfdistill=null":  # the section is gone: no meta_every to set
        overrides = [o for o in overrides if not o.startswith("selfdistill.")]
    EPOCH_CPU.clear()
    run_dir, _summary = run(load_config(CONFIG, overrides))
    secs = list(EPOCH_CPU) if args.cpu else epoch_seconds(run_dir)
    is_meta = [override == "method=md" and e % args.meta_every == 0 for e in range(len(secs))]
    meta = [s for s, m in zip(secs, is_meta, strict=True) if m]
    normal = [s for s, m in zip(secs, is_meta, strict=True) if not m]
    return {"total": sum(secs), "normal": statistics.mean(normal) if normal else float("nan"),
            "meta": statistics.mean(meta) if meta else float("nan")}


def _num(value: float) -> str:
    return "—" if value != value else f"{value:.1f}"  # NaN: no such epochs


def table(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace, command: str) -> str:
    unit = "CPU s" if args.cpu else "s"
    lines = [f"### Self-distillation training cost (Fashion-MNIST, {args.per_class * 10} training images, "
             f"{args.epochs} epochs, M = {args.meta_every})", "",
             f"Command: `{command}` — {datetime.date.today().isoformat()}, {platform.machine()}, "
             f"{os.cpu_count()} cores, {args.threads} torch thread(s), one run each (seed {args.seed}). Training "
             f"{'process-CPU ' if args.cpu else ''}seconds summed over epochs (evaluation excluded); relative to "
             "plain training of the same model. MD: mean seconds of a normal epoch and of a meta epoch (a meta step "
             "after every training step).", "",
             f"| model | method | train {unit} | × plain | {unit} / epoch | {unit} / meta epoch |",
             "|---|---|---:|---:|---:|---:|"]
    for model, rows in results.items():
        base = rows["plain"]["total"]
        for label, r in rows.items():
            lines.append(f"| {model} | {label} | {r['total']:.1f} | {r['total'] / base:.2f} | {_num(r['normal'])} | "
                         f"{_num(r['meta'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet8", "wrn_16_1"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--meta-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "selfdistill_cost"))
    p.add_argument("--no-write", action="store_true", help="print the table only (smoke tests)")
    p.add_argument("--cpu", action="store_true", help="time epochs by process-CPU time, not wall-clock seconds")
    p.add_argument("--against", default=None, help="a git revision whose MD runs beside this tree's")
    args = p.parse_args()

    if args.cpu:
        time_cpu()
    old = _old_class(args.against) if args.against else None
    out = Path(args.out)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for model in args.models:
        results[model] = {}
        for label in ["plain", "DSN", "SD", *([f"MD @{args.against}"] if old else []), "MD"]:
            build.SelfDistiller = old if label.startswith("MD @") else SelfDistiller
            results[model][label] = r = measure(model, label, args, out)
            print(f"{model:10s} {label:6s} {r['total']:8.1f} s", flush=True)
    build.SelfDistiller = SelfDistiller
    command = "python benchmarks/selfdistill_cost.py " + " ".join(sys.argv[1:])
    body = table(results, args, command.strip())
    if not args.no_write:
        write_section("selfdistill_cost", body)
    print(body)


if __name__ == "__main__":
    main()
