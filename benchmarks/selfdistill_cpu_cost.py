"""Process-CPU training cost of self-distillation runs: plain, DSN, SD, MD (and MD at another revision).

    OMP_NUM_THREADS=1 python benchmarks/selfdistill_cpu_cost.py --models resnet8 --epochs 5 --against de0cf31

The runs of ``benchmarks/selfdistill_cost.py`` (``configs/fmnist/selfdistill.yaml``, FMNIST-5k), one
after the other in this process, but timed by ``time.process_time`` around each training epoch
(``Trainer.train_epoch``: steps and, for MD, the meta steps of a meta epoch; evaluation excluded), which
other jobs on a shared machine inflate far less than the wall-clock seconds of ``selfdistill_cost.py``.
``--against REV`` adds an MD run whose SelfDistiller is ``src/kdtune/selfdistill/selfdistiller.py`` at
git revision REV, right before this tree's MD run. With E epochs and M = ``--meta-every`` the run has
E - E/M normal and E/M meta epochs; the per-epoch means give the cost of any other length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from selfdistill_step_cost import _old_class  # noqa: E402  (benchmarks/, next to this file)

import kdtune.selfdistill.build as build  # noqa: E402
from kdtune.config import load_config  # noqa: E402
from kdtune.recipe import run  # noqa: E402
from kdtune.selfdistill import SelfDistiller  # noqa: E402
from kdtune.trainer import Trainer  # noqa: E402

CONFIG = ROOT / "configs" / "fmnist" / "selfdistill.yaml"
OVERRIDES = {"plain": "selfdistill=null", "DSN": "method=dsn", "SD": "method=sd", "MD": "method=md"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet8"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--meta-every", type=int, default=5)
    p.add_argument("--against", default=None, help="a git revision whose MD runs beside this tree's")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "selfdistill_cpu_cost"))
    args = p.parse_args()

    cpu: list[float] = []
    train_epoch = Trainer.train_epoch

    def timed(self: Trainer) -> dict:
        t0 = time.process_time()
        row = train_epoch(self)
        cpu.append(time.process_time() - t0)
        return row

    Trainer.train_epoch = timed
    old = _old_class(args.against) if args.against else None
    rows = []
    for model in args.models:
        labels = ["plain", "DSN", "SD", *([f"MD @{args.against}"] if old else []), "MD"]
        base = None
        for label in labels:
            build.SelfDistiller = old if label.startswith("MD @") else SelfDistiller
            overrides = [OVERRIDES[label.split()[0]], f"student.name={model}", f"epochs={args.epochs}",
                         f"output_dir={args.out}", f"name={model}-{label.split()[0].lower()}", "train.progress=false",
                         "train.log_every=0", "train.threads=1"]
            if label != "plain":
                overrides.append(f"selfdistill.meta_every={args.meta_every}")
            cpu.clear()
            run(load_config(CONFIG, overrides))
            is_meta = [label.startswith("MD") and e % args.meta_every == 0 for e in range(len(cpu))]
            normal = [c for c, m in zip(cpu, is_meta, strict=True) if not m]
            meta = [c for c, m in zip(cpu, is_meta, strict=True) if m]
            total = sum(cpu)
            base = total if label == "plain" else base
            rows.append(f"| {model} | {label} | {total:.1f} | {total / base:.2f} | {statistics.mean(normal):.2f} | "
                        + (f"{statistics.mean(meta):.2f} |" if meta else "— |"))
            print(rows[-1], flush=True)
    build.SelfDistiller = SelfDistiller
    print("| model | method | train CPU s | × plain | CPU s / epoch | CPU s / meta epoch |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
