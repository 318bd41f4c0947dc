"""Time a KD step in kdtune against a hand-written PyTorch loop of the same computation, and how both scale.

    python benchmarks/throughput.py                    # writes its RESULTS.md section (a few CPU-minutes)
    python benchmarks/throughput.py --steps 2 --rounds 1 --batches 16 --pathways 1 3 --no-write   # smoke

The step: teacher forward + student forward + CE + KD (tau=4) + pathways (teacher stage i -> student
stage j through an adapter, MSE) + backward + SGD step. kdtune runs it through ``Trainer.train_step``
(Distiller, hooks, weighting, loss dict); the hand-written loop calls the networks' stages explicitly
and the same adapter modules (copies, identical initial weights). Models and batch channels-last,
as the Trainer runs them, one torch thread.

1. **overhead**: ResNet-56 -> ResNet-8, one FitNets pathway (layer2 -> layer2, 1x1 conv + BN), batch
   128: hand-written vs kdtune with the teacher's own forward (the same computation: the framework's
   overhead) vs kdtune by default (the teacher fast path, :mod:`kdtune.teacher`).
2. **scaling**: hand-written vs kdtune (default) against the batch size (``--batches``, 1 pathway)
   and the number of pathways (``--pathways`` at batch 128: 1 = layer2 -> layer2; 3 = stage i -> i;
   9 = every stage pair, 1x1 adapters; 27 = every pair x {1x1, 3x3, DistPro block}, the 3x3 ones
   pooling first).

Before any timing, each pair of loops computes its first loss from identical weights on the same
batch, and the losses must agree (to float rounding). Blocks of ``--steps`` steps alternate
(interleaved; order reversed every other round), ``--rounds`` rounds (``--scale-rounds`` for the
scaling table); process CPU time (robust to a shared machine's load) and wall time are recorded,
ratios are medians of the per-round CPU ratios.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import interleaved, load_note
from torch import Tensor, nn

from kdtune.config import TrainConfig
from kdtune.data import BatchLoader, from_arrays
from kdtune.distiller import Distiller
from kdtune.models import create_model
from kdtune.pathways import Pathway
from kdtune.trainer import Trainer
from kdtune.zoo import load_teacher

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("layer1", "layer2", "layer3")


def resnet_stages(model: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """([layer1, layer2, layer3 outputs], logits) of a CIFAR ResNet, by calling its stages explicitly."""
    h = model.relu(model.bn1(model.conv1(x)))
    feats = []
    for stage in (model.layer1, model.layer2, model.layer3):
        h = stage(h)
        feats.append(h)
    return feats, model.fc(model.pool(h).flatten(1))


def pathway_set(n: int) -> list[Pathway]:
    """The scaling table's pathways: 1, 3, 9 or 27 (see the module docstring)."""
    if n == 1:
        return [Pathway("layer2", "layer2", transform="conv1x1", distance="mse", name="p")]
    pairs = [(i, i) for i in range(3)] if n == 3 else [(i, j) for i in range(3) for j in range(3)]
    if n in (3, 9):
        return [Pathway(STAGES[i], STAGES[j], transform="conv1x1", distance="mse", name=f"t{i}-s{j}")
                for i, j in pairs]
    if n == 27:
        kinds = [("conv1x1", {}), ("conv3x3", {"pool_first": True}), ("distpro", {"pool_first": True})]
        return [Pathway(STAGES[i], STAGES[j], transform=tf, distance="mse", name=f"t{i}-s{j}:{tf}",
                        transform_kwargs=kw) for i, j in pairs for tf, kw in kinds]
    raise ValueError(f"--pathways: choose among 1, 3, 9, 27 (got {n})")


class Loops:
    """A kdtune trainer and the hand-written loop of the same step, from identical weights."""

    def __init__(self, teacher: nn.Module, pathways: list[Pathway], batch: int, fast_teacher: bool = True) -> None:
        torch.manual_seed(0)
        student = create_model("resnet8", 1, 10)
        self.x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (batch,))
        self.h_student, self.h_teacher = copy.deepcopy(student), copy.deepcopy(teacher).eval()
        for m in (self.h_student, self.h_teacher):
            m.to(memory_format=torch.channels_last)
        for p in self.h_teacher.parameters():
            p.requires_grad_(False)
        d = Distiller(copy.deepcopy(student), teacher, logit_losses=["kd"], pathways=pathways,
                      input_shape=(1, 28, 28), fast_teacher=fast_teacher)
        data = from_arrays(torch.zeros(batch, 1, 28, 28, dtype=torch.uint8), self.y)
        self.trainer = Trainer(d, BatchLoader(data, batch), None, TrainConfig(epochs=1, progress=False))
        # The hand-written loop: the same adapters (copies), weights and optimiser settings.
        self.paths = [(STAGES.index(p.teacher), STAGES.index(p.student), copy.deepcopy(built.transform),
                       d.weighting.base_weights[built.name]) for p, built in zip(pathways, d.pathways, strict=True)]
        for _, _, adapter, _ in self.paths:
            adapter.to(memory_format=torch.channels_last).train()
        params = list(self.h_student.parameters()) + [q for *_, a, _ in self.paths for q in a.parameters()]
        self.h_opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.h_student.train()

    def hand_loss(self) -> Tensor:
        with torch.no_grad():
            t_feats, t_logits = resnet_stages(self.h_teacher, self.x)
        s_feats, s_logits = resnet_stages(self.h_student, self.x)
        loss = F.cross_entropy(s_logits, self.y) + 16 * F.kl_div(
            F.log_softmax(s_logits / 4, 1), F.log_softmax(t_logits / 4, 1), reduction="batchmean", log_target=True)
        for i, j, adapter, weight in self.paths:
            a, b = adapter(s_feats[j], t_feats[i])
            loss = loss + weight * F.mse_loss(a, b)
        return loss

    def hand_step(self) -> None:
        loss = self.hand_loss()
        self.h_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.h_opt.step()

    def kdtune_step(self) -> None:
        self.trainer.train_step(self.x, self.y)

    def check_same_loss(self) -> tuple[float, float]:
        """The first losses of both loops (identical weights, same batch); they must agree."""
        hand = float(self.hand_loss())
        ours = float(self.trainer.model(self.x, self.y)["loss"])
        if abs(hand - ours) > 1e-4 * max(1.0, abs(hand)):
            raise AssertionError(f"the loops compute different losses: hand-written {hand}, kdtune {ours}")
        return hand, ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the overhead comparison")
    p.add_argument("--scale-rounds", type=int, default=1, help="interleaved rounds per scaling row")
    p.add_argument("--batches", type=int, nargs="*", default=[32, 128, 512])
    p.add_argument("--pathways", type=int, nargs="*", default=[1, 3, 9, 27])
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    teacher = load_teacher("resnet56_fashion_mnist")

    same = Loops(teacher, pathway_set(1), 128, fast_teacher=False)
    fast = Loops(teacher, pathway_set(1), 128)
    first = {"reference teacher": same.check_same_loss(), "fast teacher": fast.check_same_loss()}
    overhead = interleaved({"hand-written": same.hand_step, "kdtune, teacher's own forward": same.kdtune_step,
                        "kdtune (default: fast teacher)": fast.kdtune_step}, args.steps, args.rounds)

    scaling: list[tuple[str, dict[str, dict[str, float]]]] = []
    for batch in args.batches:
        loops = Loops(teacher, pathway_set(1), batch)
        loops.check_same_loss()
        scaling.append((f"batch {batch}, 1 pathway", interleaved(
            {"hand": loops.hand_step, "kdtune": loops.kdtune_step}, args.steps, args.scale_rounds)))
    for n in args.pathways:
        loops = Loops(teacher, pathway_set(n), 128)
        loops.check_same_loss()
        scaling.append((f"batch 128, {n} pathway{'s' * (n > 1)}", interleaved(
            {"hand": loops.hand_step, "kdtune": loops.kdtune_step}, args.steps, args.scale_rounds)))

    command = "OMP_NUM_THREADS=1 python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    lines = [
        "### Throughput: kdtune vs a hand-written loop (ResNet-56 -> ResNet-8, Fashion-MNIST 28×28)", "",
        f"Command: `{command.strip()}` — {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, "
        f"torch {torch.__version__}, 1 thread, {load_note()} at the end (a shared machine: read the CPU "
        f"columns). Interleaved blocks of {args.steps} steps; {args.rounds} rounds (overhead), "
        f"{args.scale_rounds} per scaling row; ratios: medians of per-round CPU-time ratios.", "",
        "Step: teacher + student + CE + KD + one FitNets pathway (layer2 -> layer2), batch 128. First losses "
        "from identical weights (hand-written, kdtune): " + "; ".join(
            f"{k} {a:.6f}, {b:.6f}" for k, (a, b) in first.items()) + ".", "",
        "| loop | CPU ms | wall ms | CPU ratio to hand-written | wall ratio |", "|---|---:|---:|---:|---:|",
        *[f"| {k} | {t['cpu_ms']:.0f} | {t['wall_ms']:.0f} | {t.get('cpu_ratio', 1.0):.2f}× | "
          f"{t.get('wall_ratio', 1.0):.2f}× |" for k, t in overhead.items()], "",
        "Scaling (kdtune by default, i.e. with the teacher fast path; the hand-written loop runs the teacher's "
        "own forward):", "",
        "| setting | hand CPU ms | kdtune CPU ms | kdtune / hand (CPU) | hand wall ms | kdtune wall ms |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {label} | {t['hand']['cpu_ms']:.0f} | {t['kdtune']['cpu_ms']:.0f} | {t['kdtune']['cpu_ratio']:.2f}× | "
          f"{t['hand']['wall_ms']:.0f} | {t['kdtune']['wall_ms']:.0f} |" for label, t in scaling], "",
    ]
    body = "\n".join(lines)
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps({"overhead": overhead, "scaling": dict(scaling), "first": first},
                                              indent=2))
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from run import write_section

        write_section("throughput", body)


if __name__ == "__main__":
    main()
