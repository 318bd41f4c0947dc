"""``kdtune quickstart`` / ``make demo``: distill a ResNet-8 from a shipped teacher, print a table.

On a Fashion-MNIST training subset (``per_class`` images per class, seed 0) and the full test
set, it trains the same student several ways and prints accuracy, agreement error with the
teacher, and wall time. Each row is a config dict, so a new method is one more entry of ROWS.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdtune.config import RunConfig, from_dict
from kdtune.recipe import run

TEACHER = "resnet56_fashion_mnist"

#: (label, the part of the config that differs from the common base below)
ROWS: list[tuple[str, dict[str, Any]]] = [
    ("student alone", {"distill": {}}),  # teacher kept only to measure agreement
    ("KD", {"distill": {"logit_losses": [{"name": "kd"}]}}),
    ("FitNets + KD", {"distill": {"logit_losses": [{"name": "kd"}],
                                  "pathways": [{"teacher": "layer2", "student": "layer2", "method": "fitnets"}]}}),
]


def base_config(name: str, epochs: int, per_class: int, out: str) -> dict[str, Any]:
    return {
        "name": name, "seed": 0, "output_dir": out,
        "data": {"dataset": "fashion_mnist", "train_per_class": per_class},
        "student": {"name": "resnet8"},
        "teacher": {"name": "resnet56", "checkpoint": f"zoo:{TEACHER}"},
        "train": {"epochs": epochs, "progress": False, "log_every": 0},
    }


def main(out: str = "runs/quickstart", epochs: int = 8, per_class: int = 200) -> int:
    from kdtune.zoo import teacher_record

    record = teacher_record(TEACHER)
    print(f"teacher: {TEACHER} (test accuracy {100 * record['test_acc']:.2f}%, shipped in kdtune.zoo)")
    print(f"student: resnet8, Fashion-MNIST {per_class * 10} training images, {epochs} epochs, "
          f"evaluated on the 10,000 test images\n")
    results = []
    for label, part in ROWS:
        name = label.lower().replace(" + ", "_").replace(" ", "_")
        cfg_dict = {**base_config(name, epochs, per_class, out), **part}
        cfg = from_dict(RunConfig, cfg_dict)
        t0 = time.perf_counter()
        run_dir, summary = run(cfg)
        seconds = time.perf_counter() - t0
        results.append((label, summary, seconds, run_dir))
        print(f"  {label:16s} test acc {100 * summary['test_acc']:.2f}%  ({seconds:.0f} s)", flush=True)
    print()
    print("| method | test acc % | agreement err % | time s | run |")
    print("|---|---:|---:|---:|---|")
    for label, s, seconds, run_dir in results:
        agree = "—" if s.get("agreement_error") is None else f"{100 * s['agreement_error']:.2f}"
        print(f"| {label} | {100 * s['test_acc']:.2f} | {agree} | {seconds:.0f} | {Path(run_dir)} |")
    print("\nOne seed on a small subset: differences of a point or two are within seed noise here "
          "(benchmarks/RESULTS.md has mean ± std over 3 seeds).")
    return 0
