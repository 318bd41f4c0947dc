"""``kdtune quickstart`` / ``make demo``: distill a ResNet-8 from a shipped teacher, print a table.

On a Fashion-MNIST training subset (``per_class`` images per class, seed 0) and the full test
set, it trains the same student several ways and prints accuracy, agreement error with the
teacher, and wall time. Each row is a config dict, so a new method is one more entry of ROWS.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
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
                                      "pathways": [{"teacher": f"stage:{i}", "student": f"stage:{i}", "method": "at",
                                                    "weight": 1000.0}  # as the demo's table was measured
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


def autokd_rows() -> list[tuple[str, dict[str, Any]]]:
    """Auto-KD at a demo budget: MCTS over Table 1's distillers with 4 proxy trials (half of the 80 %
    split, a quarter of the epochs, 50 %-sparse student, cached teacher), then the best spec on all
    images (the benchmark searches 40 trials: configs/fmnist/autokd_search.yaml)."""
    search = {"data": {"val_fraction": 0.2},
              # A demo budget: the trials keep their short proxy (autokd.min_steps would make each ~7x longer);
              # plain KD is scored beside them as the floor.
              "autokd": {"trials": 4, "subset": 0.5, "epoch_fraction": 0.25, "min_steps": 1}}
    return [("Auto-KD MCTS", search)]


def _merge(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """``part`` over ``base``; nested sections merge (a row may change one key of ``train``)."""
    out = dict(base)
    for k, v in part.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def base_config(name: str, epochs: int, per_class: int, out: str, test_images: int | None = None) -> dict[str, Any]:
    return {
        "name": name, "seed": 0, "output_dir": out,
        "data": {"dataset": "fashion_mnist", "train_per_class": per_class, "test_limit": test_images},
        "student": {"name": "resnet8"},
        "teacher": {"name": "resnet56", "checkpoint": f"zoo:{TEACHER}"},
        "train": {"epochs": epochs, "progress": False, "log_every": 0, "eval_every": epochs},  # test once, at the end
    }


def row_name(label: str) -> str:
    return label.lower().replace(" + ", "_").replace(" ", "_")


Chain = list[tuple[str, dict[str, Any]]]


def chains(out: str) -> list[Chain]:
    """The rows as independent chains (a chain's rows run in order: DistPro's retrain reads its
    search's process file), longest first so two workers finish together."""
    return [distpro_rows(out), autokd_rows(), *([row] for row in ROWS)]


#: Rows that are searches, and what their accuracy is (so a search row does not read as a failed method).
SEARCH_ROWS = {
    "DistPro search": "search only: its 1-epoch model on 80 % of the images; the retrain row is the result",
    "Auto-KD MCTS": "4 proxy trials, then the best distiller trained in full: the accuracy is that final run's",
}


def run_chain(chain: Chain, base: dict[str, Any], threads: int,
              verbose: bool = False) -> list[tuple[str, dict[str, Any], float, str]]:
    """Train a chain's rows one after the other (in a worker process with ``threads`` torch threads).

    Unless ``verbose``, a row's own output (per-trial lines of the searches, Optuna's INFO log) is
    kept out of the demo's output; warnings still go to stderr.
    """
    import optuna
    import torch

    torch.set_num_threads(threads)
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = []
    for label, part in chain:
        cfg = from_dict(RunConfig, _merge({**base, "name": row_name(label)}, part))
        t0 = time.perf_counter()
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
            run_dir, summary = run(cfg)
        seconds = time.perf_counter() - t0
        print(f"  {label:16s} test acc {100 * summary['test_acc']:.2f}%  ({seconds:.0f} s)", flush=True)
        results.append((label, summary, seconds, str(run_dir)))
    return results


def main(out: str = "runs/quickstart", epochs: int = 8, per_class: int = 200, jobs: int = 2,
         test_images: int | None = None, verbose: bool = False) -> int:
    """Train every row and print the table.

    ``jobs`` single-threaded worker processes train the rows side by side (longest chain first);
    ``jobs=1`` trains them one after the other in this process with torch's threads. Rows of one
    worker share the teacher's test predictions (``Trainer(teacher_key=...)``). Timing of the
    default: benchmarks/RESULTS.md, ``make demo`` section.
    """
    from kdtune.zoo import teacher_record

    record = teacher_record(TEACHER)
    n_test = "10,000" if test_images is None else f"first {test_images}"
    print(f"teacher: {TEACHER} (test accuracy {100 * record['test_acc']:.2f}%, shipped in kdtune.zoo)")
    print(f"student: resnet8, Fashion-MNIST {per_class * 10} training images, {epochs} epochs, "
          f"evaluated on the {n_test} test images; {jobs} worker(s)\n")
    base = base_config("", epochs, per_class, out, test_images)
    t0 = time.perf_counter()
    if jobs <= 1:
        import torch

        done = [run_chain(chain, base, torch.get_num_threads(), verbose) for chain in chains(out)]
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            todo = chains(out)
            done = list(pool.map(run_chain, todo, [base] * len(todo), [1] * len(todo), [verbose] * len(todo)))
    total = time.perf_counter() - t0
    by_label = {row[0]: row for chain_rows in done for row in chain_rows}
    print()
    print("| method | test acc % | agreement err % | time s | run |")
    print("|---|---:|---:|---:|---|")
    for label, _ in [*ROWS, *distpro_rows(out), *autokd_rows()]:
        _, s, seconds, run_dir = by_label[label]
        agree = "—" if s.get("agreement_error") is None else f"{100 * s['agreement_error']:.2f}"
        shown = f"{label} (search)" if label in SEARCH_ROWS else label
        print(f"| {shown} | {100 * s['test_acc']:.2f} | {agree} | {seconds:.0f} | {Path(run_dir)} |")
    print(legend(jobs, total))
    print(plots_note(out))
    return 0


def legend(jobs: int, wall_seconds: float) -> str:
    """What the table's columns and rows mean, for a reader who has not read the papers."""
    lines = [
        "",
        "test acc %: top-1 accuracy on the test images.",
        "agreement err %: share of test images on which the student's top-1 class differs from the teacher's",
        "  (Adaptive Distillation eq. 7): lower = the student mimics the teacher more closely.",
        f"time s: each row's own time inside its worker; {jobs} worker(s) trained rows side by side, so the column",
        f"  sums to about {jobs}x the wall time. All rows: {wall_seconds:.0f} s wall.",
        *(f"(search) {label}: {note}." for label, note in SEARCH_ROWS.items()),
        "Adaptive AT + KD: its training loss in metrics.jsonl goes below zero by design: the learned weights",
        "  v = exp(-z) come with a regulariser sum(z) (eq. 5-6) that is negative once a term's loss is below 1.",
        "One seed on a small subset: differences of a point or two are within seed noise here",
        "  (benchmarks/RESULTS.md has mean ± std over 3 seeds). `kdtune quickstart -v` shows every row's log.",
    ]
    return "\n".join(lines)


def plots_note(out: str) -> str:
    """Where the demo's plots are (each run directory has its own)."""
    pngs = sorted(Path(out).rglob("*.png"))
    if not pngs:
        return ""
    kinds = sorted({p.name for p in pngs})
    return (f"\nPlots: {len(pngs)} PNG files in the run directories under {out}/ ({', '.join(kinds)}): "
            f"curves.png is each run's loss and accuracy per epoch. Compare runs in one plot with "
            f"`kdtune report {out}/<run> {out}/<run> ...`.")
