"""DistPro pathway dropping: threshold τ vs pathways kept in retraining (DistPro appendix D, Table 3).

    python benchmarks/distpro_dropping.py                     # the committed FMNIST-5k process
    python benchmarks/distpro_dropping.py --process runs/<search>/process.json --retrain-epochs 30

A pathway whose α̃ ≤ τ at a retrain step is not computed (its transform's forward and its loss
are skipped). From a process file alone — no training — this reports, for each τ, over the
process stretched to the retrain length:

* pathway-steps kept: the share of (step, pathway) pairs computed (the issue's "≤ 60 % of the
  pathway losses at τ = 0.5");
* transform MACs kept: the same share weighted by each pathway's transform cost (multiply-adds of
  its convs and linears, counted with forward hooks at the FMNIST 28×28 input), since a 64-channel
  3×3 adapter at 28×28 costs ~100× a 1×1 adapter at 7×7;
* pathways kept at the last step.

It also gives the transforms' share of a retrain step's forward MACs (student + teacher +
transforms), the ceiling on what dropping can save. The paper's Table 3 also lists accuracy per
τ: that needs one 30-epoch retrain per τ and is not run by this script.
Writes between ``<!-- table:distpro_dropping -->`` markers in RESULTS.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import DISTPRO_PROCESS, write_section  # noqa: E402

from kdtune.distiller import Distiller  # noqa: E402
from kdtune.models import create_model  # noqa: E402
from kdtune.search.distpro import pathways_from_process  # noqa: E402
from kdtune.weighting.process import Process  # noqa: E402

SHAPE = (1, 28, 28)
THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 1.0)  # the paper's Table 3 uses 0.3, 0.5, 0.6, 0.7


def layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-adds of one conv / linear call for one sample: output elements x inputs per output."""
    per_sample = out[0].numel()
    if isinstance(module, nn.Conv2d):
        k_h, k_w = module.kernel_size
        return per_sample * (module.in_channels // module.groups) * k_h * k_w
    assert isinstance(module, nn.Linear)
    return per_sample * module.in_features


def count_macs(d: Distiller, x: torch.Tensor) -> dict[str, int]:
    """MACs per sample of one forward, bucketed: ``student``, ``teacher`` and each pathway's name."""
    counts: dict[str, int] = {}
    owners = [("student", d.student), ("teacher", d.teacher)] + [(p.name, p) for p in d.pathways]
    handles = []
    for owner, root in owners:
        counts[owner] = 0
        for m in root.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                def hook(mod, _inp, out, owner=owner):
                    counts[owner] += layer_macs(mod, out)
                handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            d.eval()
            d(x, torch.zeros(len(x), dtype=torch.long), 0)
    finally:
        for h in handles:
            h.remove()
    return counts


def process_macs(process: Process, transform_kwargs: dict[str, dict] | None = None) -> dict[str, int]:
    """:func:`count_macs` of ResNet-56 -> ResNet-8 with the process's pathways (their transforms
    rebuilt with ``transform_kwargs`` per transform name when given). Untrained models: MACs only."""
    teacher = create_model("resnet56", in_channels=1, num_classes=10)
    student = create_model("resnet8", in_channels=1, num_classes=10)
    pathways = pathways_from_process(process, teacher, student, SHAPE)
    for p in pathways:
        p.transform_kwargs = {**p.transform_kwargs, **(transform_kwargs or {}).get(str(p.transform), {})}
    d = Distiller(student, teacher, pathways, weighting="equal", input_shape=SHAPE)
    return count_macs(d, torch.zeros(2, *SHAPE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--process", default=str(ROOT / DISTPRO_PROCESS))
    p.add_argument("--retrain-epochs", type=int, default=30)
    p.add_argument("--images", type=int, default=5000, help="retrain training images (FMNIST-5k: 5000)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    args = p.parse_args()

    process = Process.load(args.process)
    macs = process_macs(process)
    path_macs = torch.tensor([float(macs[n]) for n in process.names])  # (P,)
    model_macs = macs["student"] + macs["teacher"]
    # The same pathways with the 3x3 adapters in Fig. 4's order and pooling first (distpro.transform_kwargs).
    order_totals = {
        pool_first: sum(m for n, m in process_macs(process, {"conv3x3": {"pool_first": pool_first},
                                                               "distpro": {"pool_first": pool_first}}).items()
                        if n in process.names)
        for pool_first in (False, True)}
    searched_with = "pool_first" if float(path_macs.sum()) == order_totals[True] else "Fig. 4 order"

    steps = args.retrain_epochs * -(-args.images // args.batch)
    _, tilde = process.stretch(steps)  # (T', P) α̃ per retrain step
    rows = []
    for tau in THRESHOLDS:
        kept = (tilde > tau).float()  # (T', P)
        rows.append((tau, 100 * float(kept.mean()), 100 * float((kept * path_macs).sum(1).mean() / path_macs.sum()),
                     int(kept[-1].sum())))

    top = sorted(zip(process.names, path_macs.tolist(), strict=True), key=lambda r: -r[1])[:4]
    rel = Path(args.process).resolve()
    shown = rel.relative_to(ROOT) if rel.is_relative_to(ROOT) else rel
    lines = [
        f"### DistPro pathway dropping: τ vs pathways kept ({len(process.names)} pathways, retrain "
        f"{args.retrain_epochs} epochs = {steps} steps)", "",
        f"Command: `python benchmarks/distpro_dropping.py` — {datetime.date.today().isoformat()}; process "
        f"`{shown}` stretched to the retrain length; MACs per sample of each pathway's transform at 28×28.", "",
        "| τ | pathway-steps kept % | transform MACs kept % | kept at last step |",
        "|---:|---:|---:|---:|",
        *(f"| {tau:g} | {steps_kept:.1f} | {macs_kept:.1f} | {last} / {len(process.names)} |"
          for tau, steps_kept, macs_kept, last in rows),
        "",
        f"- Forward MACs per sample: student {macs['student'] / 1e6:.1f} M, teacher {macs['teacher'] / 1e6:.1f} M, "
        f"all {len(process.names)} transforms {float(path_macs.sum()) / 1e6:.1f} M "
        f"({100 * float(path_macs.sum()) / (model_macs + float(path_macs.sum())):.0f} % of a step's forward MACs; "
        "the teacher runs without backward).",
        "- Costliest transforms (M MACs): " + ", ".join(f"{n} {m / 1e6:.1f}" for n, m in top) + ".",
        f"- All {len(process.names)} transforms with the conv3x3 / distpro adapters in Fig. 4's order (3x3 convs "
        f"at the student's resolution): {order_totals[False] / 1e6:.1f} M; with `pool_first` "
        f"(`distpro.transform_kwargs`): {order_totals[True] / 1e6:.1f} M. This process: {searched_with}.",
    ]
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_write:
        write_section("distpro_dropping", body)


if __name__ == "__main__":
    main()
