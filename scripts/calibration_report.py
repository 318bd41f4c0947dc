"""Calibrated vs catalogue weights on one pair: KD + FitNets (layer2) + AT (3 stages), ResNet-56 -> resnet8.

    python scripts/calibration_report.py                 # Fashion-MNIST, 50 images per class, ratio 1
    python scripts/calibration_report.py --ratio 0.5 --per-class 500

Prints each term's measured gradient norm, its catalogue weight, the gradient ratio that weight
gives (||w g_i|| / ||g_task||) and the calibrated weight (:mod:`kdtune.calibration`).
"""

from __future__ import annotations

import argparse

import torch

from kdtune.config import load_config
from kdtune.losses import LOSSES
from kdtune.recipe import prepare
from kdtune.weighting.paths import path_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = [f"data.train_per_class={args.per_class}", "train.progress=false",
                 *[f"distill.pathways.{i + 1}={{teacher: 'stage:{i}', student: 'stage:{i}', method: at}}"
                   for i in range(3)],
                 f"distill.calibrate.ratio={args.ratio}", f"distill.calibrate.batches={args.batches}"]
    cfg = load_config("configs/fmnist/fitnets_kd.yaml", overrides)
    record = prepare(cfg, None).distiller.calibration
    assert record is not None
    task = record.grad_norms["task"]
    print(f"task (CE) gradient norm {task:.4g}, ratio {args.ratio:g}, {record.batches} batches")
    print(f"{'term':24s} {'grad norm':>10s} {'catalogue w':>12s} {'ratio at it':>12s} {'calibrated w':>13s}")
    for name, weight in record.weights.items():
        catalogue = LOSSES.get(path_of(name)).weight
        g = record.grad_norms[name]
        print(f"{name:24s} {g:10.4g} {catalogue:12g} {catalogue * g / task:12.3g} {weight:13.4g}")


if __name__ == "__main__":
    main()
