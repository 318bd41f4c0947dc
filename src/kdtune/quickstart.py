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
    # Adaptive Distillation (eq. 5-6): AT on every stage (one path) + KD, weights v = exp(-z) learned.
    ("Adaptive AT + KD", {"distill": {"logit_losses": [{"name": "kd"}],
                                      "pathways": [{"teacher": f"stage:{i}", "student": f"stage:{i}", "method": "at"}
                                                   for i in range(3)],
                                      "weighting": {"name": "adaptive"}}}),
    # MetaDistiller (kdtune.selfdistill): no teacher, exits + label generator. A few meta steps per
    # meta epoch keep the demo cheap (the paper steps the generator after every training step).
    ("self-distill MD", {"teacher": None, "distill": {}, "selfdistill": {"method": "md", "meta_steps": 4}}),
]


def distpro_rows(out: str) -> list[tuple[str, dict[str, Any]]]:
    """DistPro (search, then retrain) at a demo budget: a 1-epoch search on an 80/20 split of the
    subset over 3 same-stage connections x the 1x1 adapter (the full space is 27 pathways: see
    configs/fmnist/distpro_search.yaml), then all images, replaying the process stretched to the run."""
    process = str(Path(out) / "distpro_process.json")
    search = {"data": {"val_fraction": 0.2}, "train": {"epochs": 1},
              "distpro": {"connections": "same", "transforms": ["conv1x1"], "export": process}}
    retrain = {"distill": {"weighting": {"name": "process", "kwargs": {"file": process}}}}
    return [("DistPro search", search), ("DistPro retrain", retrain)]


def _merge(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """``part`` over ``base``; nested sections merge (a row may change one key of ``train``)."""
    out = dict(base)
    for k, v in part.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def base_config(name: str, epochs: int, per_class: int, out: str) -> dict[str, Any]:
    return {
        "name": name, "seed": 0, "output_dir": out,
        "data": {"dataset": "fashion_mnist", "train_per_class": per_class},
        "student": {"name": "resnet8"},
        "teacher": {"name": "resnet56", "checkpoint": f"zoo:{TEACHER}"},
        "train": {"epochs": epochs, "progress": False, "log_every": 0, "eval_every": epochs},  # test once, at the end
    }


def main(out: str = "runs/quickstart", epochs: int = 8, per_class: int = 200) -> int:
    from kdtune.zoo import teacher_record

    record = teacher_record(TEACHER)
    print(f"teacher: {TEACHER} (test accuracy {100 * record['test_acc']:.2f}%, shipped in kdtune.zoo)")
    print(f"student: resnet8, Fashion-MNIST {per_class * 10} training images, {epochs} epochs, "
          f"evaluated on the 10,000 test images\n")
    results = []
    for label, part in [*ROWS, *distpro_rows(out)]:
        name = label.lower().replace(" + ", "_").replace(" ", "_")
        cfg_dict = _merge(base_config(name, epochs, per_class, out), part)
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
