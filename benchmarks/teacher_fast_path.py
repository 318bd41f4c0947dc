"""The frozen-teacher fast path (kdtune.teacher) against the teacher's own hooked forward.

    python benchmarks/teacher_fast_path.py                        # writes its RESULTS.md section
    python benchmarks/teacher_fast_path.py --steps 2 --rounds 1 --test-limit 256 --no-write   # smoke

Shipped ResNet-56 teacher -> ResNet-8 student, batch 128 of Fashion-MNIST 28x28, one torch thread,
models and batch channels-last (as the Trainer runs them by default).

1. **teacher forward** (logits + the three stage outputs captured): reference = the teacher's own
   forward with hooks (kdtune before the fast path); fast fp32; fast bf16.
2. **KD step** (teacher forward + student forward/backward + CE + KD, SGD step), the same three
   ways, from identical weights; the first step's losses are compared before any timing.
3. **prediction agreement** of fp32 and bf16 with the reference on the whole FMNIST test set.

Blocks of ``--steps`` calls alternate (order reversed every other round), ``--rounds`` times;
medians of process CPU time (robust to the machine's load) and of wall time, and the medians of
the per-round ratios to the reference.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch
from timing import interleaved, load_note

from kdtune.data import BatchLoader, load_fashion_mnist
from kdtune.distiller import Distiller, freeze
from kdtune.models import create_model
from kdtune.teacher import TeacherRunner
from kdtune.zoo import load_teacher

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["layer1", "layer2", "layer3"]
WAYS = {"reference (hooked forward)": {"fast_teacher": False}, "fast fp32": {},
        "fast bf16": {"teacher_precision": "bf16"}}


def kd_step(d: Distiller, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    out = d(x, y)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return {k: float(out[k]) for k in ("loss", "task", "kd")}


def agreement(teacher: torch.nn.Module, limit: int | None) -> dict[str, float]:
    """Test-set prediction agreement of fp32 / bf16 fast paths with the reference, and accuracies."""
    test = load_fashion_mnist("test")
    runners = {"ref": TeacherRunner(teacher, STAGES, fast=False), "fp32": TeacherRunner(teacher, STAGES),
               "bf16": TeacherRunner(teacher, STAGES, precision="bf16")}
    preds: dict[str, list[torch.Tensor]] = {k: [] for k in runners}
    labels, seen = [], 0
    for x, y in BatchLoader(test, 500, shuffle=False):
        if limit is not None and seen >= limit:
            break
        for k, r in runners.items():
            preds[k].append(r(x)[0].argmax(1))
        labels.append(y)
        seen += len(y)
    p = {k: torch.cat(v) for k, v in preds.items()}
    lab = torch.cat(labels)
    return {"n": len(lab), **{f"agree_{k}": float((p[k] == p["ref"]).float().mean()) for k in ("fp32", "bf16")},
            **{f"acc_{k}": float((p[k] == lab).float().mean()) for k in p}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="calls per timed block")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--test-limit", type=int, default=None, help="test images for the agreement (default all)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    teacher = freeze(load_teacher("resnet56_fashion_mnist"))
    # Channels-last, as the Trainer puts the distiller and the batches (train.channels_last: true).
    x, y = next(iter(BatchLoader(load_fashion_mnist("train"), 128, shuffle=True, seed=0, channels_last=True)))
    teacher.to(memory_format=torch.channels_last)

    runners = {name: TeacherRunner(teacher, STAGES, **({"fast": False} if "reference" in name else
                                                      {"precision": "bf16"} if "bf16" in name else {}))
               for name in WAYS}
    forward = interleaved({name: (lambda r=r: r(x)) for name, r in runners.items()}, args.steps, args.rounds)

    torch.manual_seed(0)
    student = create_model("resnet8", in_channels=1, num_classes=10)
    steps, first = {}, {}
    for name, kwargs in WAYS.items():
        d = Distiller(copy.deepcopy(student), teacher, logit_losses=["kd"], **kwargs)
        d.to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        first[name] = kd_step(d, opt, x, y)  # from identical weights: the losses must agree
        steps[name] = lambda d=d, opt=opt: kd_step(d, opt, x, y)
    ref_first = first["reference (hooked forward)"]
    assert all(abs(v[k] - ref_first[k]) <= 1e-4 * abs(ref_first[k]) for v in list(first.values())[:2] for k in v), first
    step = interleaved(steps, args.steps, args.rounds)
    agree = agreement(teacher, args.test_limit)

    def rows(table: dict[str, dict[str, float]]) -> list[str]:
        return [f"| {name} | {t['cpu_ms']:.0f} | {t['wall_ms']:.0f} | {t.get('cpu_ratio', 1.0):.2f}× | "
                f"{t.get('wall_ratio', 1.0):.2f}× |" for name, t in table.items()]

    head = "| way | CPU ms | wall ms | CPU ratio | wall ratio |\n|---|---:|---:|---:|---:|"
    command = "python benchmarks/teacher_fast_path.py " + " ".join(sys.argv[1:])
    body = "\n".join([
        "### Teacher fast path (shipped ResNet-56 -> ResNet-8, batch 128, Fashion-MNIST 28×28)", "",
        f"Command: `OMP_NUM_THREADS=1 {command.strip()}` — {datetime.datetime.now():%Y-%m-%d %H:%M}, "
        f"1 torch thread, {load_note()} at the end (a shared machine: read the CPU columns); "
        f"interleaved blocks of {args.steps} calls, medians of {args.rounds} rounds; ratios to the reference "
        "(the teacher's own forward with hooks, kdtune before this change).", "",
        "Teacher forward (logits + 3 stage outputs):", "", head, *rows(forward), "",
        "KD step (teacher + student forward/backward + CE + KD + SGD):", "", head, *rows(step), "",
        "First-step losses from identical weights: "
        + "; ".join(f"{name}: loss {v['loss']:.6f}, KD {v['kd']:.6f}" for name, v in first.items()) + ".", "",
        f"Prediction agreement with the reference on {agree['n']} FMNIST test images: fp32 "
        f"**{100 * agree['agree_fp32']:.2f} %**, bf16 **{100 * agree['agree_bf16']:.2f} %** (teacher test accuracy: "
        f"reference {100 * agree['acc_ref']:.2f} %, fp32 {100 * agree['acc_fp32']:.2f} %, "
        f"bf16 {100 * agree['acc_bf16']:.2f} %).", ""])
    print(body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from run import write_section

        write_section("teacher_fast_path", body)


if __name__ == "__main__":
    main()
