"""Step time of bf16 autocast vs fp32 on this machine's CPU, for one KD step.

    python benchmarks/precision.py [--teacher resnet56] [--student resnet8] [--reps 5] [--steps 5]

The step is ``Trainer.train_step`` of a KD distiller (teacher forward under no_grad, student
forward, CE + KD with tau=4, backward, SGD step) on one batch of 128 x 1 x 28 x 28, channels-last,
one thread. Two trainers with identical initial weights differ only in ``train.precision``; blocks
of ``--steps`` steps alternate between them (interleaved, so machine noise hits both), ``--reps``
times, after one warm-up block each. Prints the per-step medians and the median of the
per-repetition ratios bf16 / fp32 (< 1: bf16 is faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from timing import seconds_per_call

from kdtune.config import TrainConfig
from kdtune.data import BatchLoader, from_arrays
from kdtune.distiller import Distiller
from kdtune.models import create_model
from kdtune.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8)
    data = from_arrays(x, torch.arange(128) % 10, num_classes=10)
    student, teacher = create_model(args.student, 1, 10), create_model(args.teacher, 1, 10)
    trainers = {}
    for precision in ("fp32", "bf16"):
        d = Distiller(copy.deepcopy(student), copy.deepcopy(teacher), logit_losses=["kd"], input_shape=(1, 28, 28))
        trainers[precision] = Trainer(d, BatchLoader(data, 128), None, TrainConfig(epochs=1, progress=False,
                                                                                  precision=precision))
    batch = {k: t.prepare_batch(*next(iter(t.train_loader))) for k, t in trainers.items()}
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for rep in range(args.reps + 1):
        for k, t in trainers.items():
            s = seconds_per_call(lambda t=t, k=k: t.train_step(*batch[k]), args.steps)
            if rep > 0:  # the first block of each is the warm-up
                times[k].append(s)
    ratios = [b / f for b, f in zip(times["bf16"], times["fp32"], strict=True)]
    for k, v in times.items():
        print(f"{k}: {1000 * statistics.median(v):.0f} ms/step (median of {args.reps} blocks of {args.steps})")
    print(f"bf16 / fp32 step time: {statistics.median(ratios):.2f} (per-block ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
