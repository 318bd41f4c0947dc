"""Training cost of self-distillation: DSN, SD and MD (MetaDistiller) relative to plain training.

    python benchmarks/selfdistill_cost.py                           # FMNIST-5k, resnet8 + wrn_16_1, 10 epochs
    python benchmarks/selfdistill_cost.py --models resnet8 --epochs 2 --per-class 10 --meta-every 1 --no-write

Each (model, method) is trained once with ``configs/fmnist/selfdistill.yaml`` (the FMNIST-5k
protocol, no teacher) for ``--epochs`` epochs; the cost is the training time of those epochs
(the Trainer's per-epoch ``seconds``: forward, backward, optimiser and, for MD, the meta steps
that run after the training steps of every M-th epoch; evaluation excluded). MD's meta epochs
are reported apart: an MD run costs ``(E - E/M) * normal + (E/M) * meta`` epochs. With
``--epochs`` a multiple of M the share of meta epochs is that of a full run. Timings need a
quiet machine: anything else running inflates them unevenly. The table goes between
``<!-- table:selfdistill_cost -->`` markers in RESULTS.md (not with ``--no-write``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import write_section  # noqa: E402  (benchmarks/run.py, next to this file)

from kdtune.config import load_config  # noqa: E402
from kdtune.recipe import run  # noqa: E402

CONFIG = ROOT / "configs" / "fmnist" / "selfdistill.yaml"
#: (label, override selecting the method)
METHODS = [("plain", "selfdistill=null"), ("DSN", "method=dsn"), ("SD", "method=sd"), ("MD", "method=md")]


def epoch_seconds(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["seconds"] for r in rows]


def measure(model: str, override: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Train one run; its total training seconds and mean seconds of normal and meta epochs."""
    overrides = [override, f"student.name={model}", f"epochs={args.epochs}", f"seed={args.seed}",
                 f"data.train_per_class={args.per_class}", f"selfdistill.meta_every={args.meta_every}",
                 f"output_dir={out}", f"name={model}-{override.split('=')[-1]}", "train.progress=false",
                 "train.log_every=0", f"train.threads={args.threads}"]
    if override == "selfdistill=null":  # the section is gone: no meta_every to set
        overrides = [o for o in overrides if not o.startswith("selfdistill.")]
    run_dir, _summary = run(load_config(CONFIG, overrides))
    secs = epoch_seconds(run_dir)
    meta = [s for e, s in enumerate(secs) if override == "method=md" and e % args.meta_every == 0]
    normal = [s for e, s in enumerate(secs) if not (override == "method=md" and e % args.meta_every == 0)]
    return {"total": sum(secs), "normal": statistics.mean(normal) if normal else float("nan"),
            "meta": statistics.mean(meta) if meta else float("nan")}


def _num(value: float) -> str:
    return "—" if value != value else f"{value:.1f}"  # NaN: no such epochs


def table(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace, command: str) -> str:
    lines = [f"### Self-distillation training cost (Fashion-MNIST, {args.per_class * 10} training images, "
             f"{args.epochs} epochs, M = {args.meta_every})", "",
             f"Command: `{command}` — {datetime.date.today().isoformat()}, {platform.machine()}, "
             f"{os.cpu_count()} cores, {args.threads} torch thread(s), one run each (seed {args.seed}). Training "
             "seconds summed over epochs (evaluation excluded); relative to plain training of the same model. "
             "MD: mean seconds of a normal epoch and of a meta epoch (a meta step after every training step).", "",
             "| model | method | train s | × plain | s / epoch | s / meta epoch |", "|---|---|---:|---:|---:|---:|"]
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
    args = p.parse_args()

    out = Path(args.out)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for model in args.models:
        results[model] = {}
        for label, override in METHODS:
            results[model][label] = r = measure(model, override, args, out)
            print(f"{model:10s} {label:6s} {r['total']:8.1f} s", flush=True)
    command = "python benchmarks/selfdistill_cost.py " + " ".join(sys.argv[1:])
    body = table(results, args, command.strip())
    if not args.no_write:
        write_section("selfdistill_cost", body)
    print(body)


if __name__ == "__main__":
    main()
