"""The `make demo` setting (kdtune quickstart: FMNIST, 200 images per class, ResNet-56 -> ResNet-8, 8 epochs) for
its "Adaptive AT + KD" row with several seeds: adaptive with KD fixed (the default), the paper's form (KD a learned
path too, ``fixed: []``), and plain KD. One run per call, so seeds and modes can run side by side:

    OMP_NUM_THREADS=1 python benchmarks/quickstart_adaptive.py <seed> default|paper|kd

Prints ``<seed> <mode> <test acc %>``; runs go to /tmp/kdtune_quickstart_adaptive/.
"""

from __future__ import annotations

import contextlib
import io
import sys

import torch

from kdtune import quickstart
from kdtune.config import RunConfig, from_dict
from kdtune.recipe import run


def main(seed: int, mode: str) -> float:
    _, part = next(row for row in quickstart.ROWS if row[0] == "Adaptive AT + KD")
    cfg = quickstart._merge(quickstart.base_config(f"adaptive_{mode}", 8, 200, "/tmp/kdtune_quickstart_adaptive"), part)
    cfg["seed"] = seed
    if mode == "paper":
        cfg["distill"]["weighting"]["kwargs"] = {"fixed": []}
    elif mode == "kd":
        cfg["distill"] = {"logit_losses": [{"name": "kd"}]}
    elif mode != "default":
        raise SystemExit(f"mode must be default, paper or kd, got {mode!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        _, summary = run(from_dict(RunConfig, cfg))
    return 100 * summary["final"]["test_acc"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    seed, mode = int(sys.argv[1]), sys.argv[2]
    print(seed, mode, f"{main(seed, mode):.2f}", flush=True)
