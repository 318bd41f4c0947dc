"""Calibrated vs catalogue weights of a run config's terms (default: KD + FitNets + AT x3, ResNet-56 -> resnet8).

    python scripts/calibration_report.py                 # Fashion-MNIST, 50 images per class, ratio 1
    python scripts/calibration_report.py --ratio 0.5 --per-class 500
    python scripts/calibration_report.py --config configs/fmnist2k/feature.yaml \
        --set distill.pathways.0.method=nst distill.pathways.0.transform=match_spatial   # any config + overrides

Prints each term's measured gradient norm, the weight it runs with uncalibrated (the config's, else the
catalogue's), the gradient ratio that weight
gives (||w g_i|| / ||g_task||) and the calibrated weight (:mod:`kdtune.calibration`).
"""

from __future__ import annotations

import argparse

import torch

from kdtune.build import build_pathways
from kdtune.config import load_config
from kdtune.losses import LOSSES
from kdtune.recipe import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--config", default=None,
                        help="a run config (its own data size, seed 0); default: FitNets + KD + AT x3 on FMNIST")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --config")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.config is None:
        config = "configs/fmnist/fitnets_kd.yaml"
        overrides = [f"data.train_per_class={args.per_class}",
                     *[f"distill.pathways.{i + 1}={{teacher: 'stage:{i}', student: 'stage:{i}', method: at}}"
                       for i in range(3)]]
    else:
        config, overrides = args.config, list(args.set)
    overrides += ["train.progress=false", f"distill.calibrate.ratio={args.ratio}",
                  f"distill.calibrate.batches={args.batches}"]
    cfg = load_config(config, overrides)
    distiller = prepare(cfg, None).distiller
    record = distiller.calibration
    assert record is not None
    task = record.grad_norms["task"]
    print(f"task (CE) gradient norm {task:.4g}, ratio {args.ratio:g}, {record.batches} batches")
    # The weight each term runs with uncalibrated: the config's, else the catalogue's (as the pathway resolves it).
    # (The distiller names a pathway by the module its stage:<i> found, so pair them in config order.)
    configured = {term.name: p.resolved().weight
                  for term, p in zip(distiller.pathways, build_pathways(cfg.distill.pathways), strict=True)}
    configured.update({ll.name: LOSSES.get(ll.name).weight if ll.weight is None else ll.weight
                       for ll in cfg.distill.logit_losses})
    print(f"{'term':24s} {'grad norm':>10s} {'weight':>12s} {'ratio at it':>12s} {'calibrated w':>13s}")
    for name, weight in record.weights.items():
        w, g = configured[name], record.grad_norms[name]
        print(f"{name:24s} {g:10.4g} {w:12g} {w * g / task:12.3g} {weight:13.4g}")


if __name__ == "__main__":
    main()
