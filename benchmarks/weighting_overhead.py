"""Per-iteration cost of the path-aggregation strategies (Adaptive Distillation Table 9).

    python benchmarks/weighting_overhead.py                                  # full measurement
    python benchmarks/weighting_overhead.py --steps 1 --reps 1 --batch 8 --no-write      # smoke test

One training iteration = ``Trainer.train_step``: teacher forward (no_grad), student forward, every
path's loss, the weighting, backward and the SGD step, on the FMNIST-5k pair (ResNet-56 teacher ->
ResNet-8 student; random weights: the cost does not depend on them), batch 128 of 1x28x28.

* 2 paths (paper Table 2): AT on the three stage outputs (one path) + ST (KD, tau = 4).
* 4 paths (paper Table 3): AT, NST (each on the three stage outputs), ST and l2-logit.

Strategies: ``equal``, ``fixed``, ``adaptive`` (eq. 5-6: a few extra scalar ops, z trained by the
same optimiser) and ``mgda`` (eq. 4: one extra backward pass per path to get the path gradients,
then the min-norm solve). Blocks of ``--steps`` steps of each strategy alternate ``--reps`` times
(machine noise hits all of them, the order rotates); per-iteration times are medians over blocks,
and each strategy's ratio to ``equal`` is the median of its per-block ratios. The issue's bound:
adaptive <= 1.05x equal; mgda is reported as a ratio. Writes the table between
``<!-- table:weighting_overhead -->`` markers in benchmarks/RESULTS.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
from timing import seconds_per_call

from kdtune.config import TrainConfig
from kdtune.data import BatchLoader, from_arrays
from kdtune.distiller import Distiller, LogitLoss
from kdtune.models import create_model
from kdtune.pathways import Pathway
from kdtune.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 28, 28)
STRATEGIES = ["equal", "fixed", "adaptive", "mgda"]


def path_sets() -> dict[int, tuple[list[LogitLoss], list[Pathway]]]:
    """Number of paths -> (logit losses, pathways) of that setting."""
    at = [Pathway(f"stage:{i}", f"stage:{i}", method="at") for i in range(3)]
    nst = [Pathway(f"stage:{i}", f"stage:{i}", method="nst") for i in range(3)]
    return {
        2: ([LogitLoss("kd")], at),
        4: ([LogitLoss("kd"), LogitLoss("l2_logit", kwargs={"squared": False})], at + nst),
    }


def timed(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Seconds per iteration over ``steps`` training steps on the same batch."""
    return seconds_per_call(lambda: trainer.train_step(x, y), steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--reps", type=int, default=7, help="timed blocks per strategy")
    p.add_argument("--paths", type=int, nargs="+", default=[2, 4], choices=[2, 4])
    p.add_argument("--no-write", action="store_true", help="print only; do not touch benchmarks/RESULTS.md")
    args = p.parse_args()

    torch.manual_seed(0)
    teacher = create_model(args.teacher, SHAPE[0], 10)
    student = create_model(args.student, SHAPE[0], 10)
    x = torch.randn(args.batch, *SHAPE).contiguous(memory_format=torch.channels_last)
    y = torch.arange(args.batch) % 10
    data = from_arrays(torch.zeros(args.batch, *SHAPE, dtype=torch.uint8), y)
    cfg = TrainConfig(epochs=1, progress=False)

    rows = []
    for n_paths in args.paths:
        logit_losses, pathways = path_sets()[n_paths]
        trainers = {}
        for name in STRATEGIES:
            # Same initial weights for every strategy: each gets copies of the same models.
            distiller = Distiller(copy.deepcopy(student), copy.deepcopy(teacher), pathways=pathways,
                                  logit_losses=logit_losses, weighting=name, input_shape=SHAPE)
            trainers[name] = Trainer(distiller, BatchLoader(data, args.batch), None, cfg)
        if n_paths == 2:
            assert trainers["mgda"].distiller.weighting.path_names == ["kd", "at"]
        else:
            assert trainers["mgda"].distiller.weighting.path_names == ["kd", "l2_logit", "at", "nst"]

        for name in STRATEGIES:  # warm-up (allocator, oneDNN primitive caches)
            timed(trainers[name], x, y, args.steps)
        times: dict[str, list[float]] = {n: [] for n in STRATEGIES}
        ratios: dict[str, list[float]] = {n: [] for n in STRATEGIES}
        for rep in range(args.reps):
            order = STRATEGIES[rep % len(STRATEGIES):] + STRATEGIES[:rep % len(STRATEGIES)]
            block = {n: timed(trainers[n], x, y, args.steps) for n in order}
            for n in STRATEGIES:
                times[n].append(block[n])
                ratios[n].append(block[n] / block["equal"])
        for n in STRATEGIES:
            rows.append((n_paths, n, 1000 * statistics.median(times[n]), statistics.median(ratios[n])))
            print(f"{n_paths} paths  {n:9s} {rows[-1][2]:8.1f} ms/iter  {rows[-1][3]:.3f}x equal", flush=True)

    command = "python benchmarks/weighting_overhead.py " + " ".join(sys.argv[1:])
    lines = ["### Weighting overhead (Adaptive Distillation Table 9)", "",
             f"Command: `{command.strip()}` — {datetime.date.today().isoformat()}, {platform.machine()}, "
             f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
             f"One `Trainer.train_step` ({args.teacher} teacher -> {args.student} student, batch {args.batch}, "
             f"1x28x28), median over {args.reps} blocks of {args.steps} steps; ratio = median per-block "
             "time / equal's. 2 paths: AT (3 stages, one path) + ST; 4 paths: AT, NST, ST, l2-logit.", "",
             "| paths | strategy | ms / iteration | × equal |", "|---:|---|---:|---:|"]
    lines += [f"| {k} | {n} | {ms:.1f} | {r:.3f} |" for k, n, ms, r in rows]
    body = "\n".join(lines) + "\n"
    print()
    print(body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from run import write_section

        write_section("weighting_overhead", body)


if __name__ == "__main__":
    main()
