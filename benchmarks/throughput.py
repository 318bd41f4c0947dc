"""Time one KD step in kdtune against a minimal hand-written PyTorch loop of the same computation.

    python benchmarks/throughput.py [--teacher resnet56] [--student resnet8] [--reps 7] [--steps 10]

The step: teacher forward (no_grad) + student forward + CE + KD (tau=4) + one FitNets pathway
(teacher layer2 -> student layer2 through a 1x1 conv + BN adapter, MSE) + backward + SGD step.
kdtune runs it through ``Trainer.train_step`` (Distiller, hooks, weighting, loss dict); the
hand-written loop calls the stages explicitly. Both use the same batch (128 x 1 x 28 x 28),
channels-last, identical initial weights; blocks of ``--steps`` steps alternate between the two
(interleaved, so machine noise hits both), ``--reps`` times. Prints per-step medians and the
median of the per-repetition ratios kdtune / hand-written.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics

import torch
import torch.nn.functional as F
from timing import seconds_per_call
from torch import nn

from kdtune.config import TrainConfig
from kdtune.data import BatchLoader, from_arrays
from kdtune.distiller import Distiller
from kdtune.models import create_model
from kdtune.pathways import Pathway
from kdtune.trainer import Trainer


def resnet_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer2 output, logits) of a CIFAR ResNet, by calling its stages explicitly."""
    h = model.relu(model.bn1(model.conv1(x)))
    mid = model.layer2(model.layer1(h))
    out = model.layer3(mid)
    return mid, model.fc(model.pool(out).flatten(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()

    torch.manual_seed(0)
    teacher = create_model(args.teacher, 1, 10)
    student = create_model(args.student, 1, 10)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))

    # Copies for the hand-written loop are taken before kdtune registers its capture hooks.
    h_student, h_teacher = copy.deepcopy(student), copy.deepcopy(teacher).eval()
    for m in (h_student, h_teacher):
        m.to(memory_format=torch.channels_last)
        assert not any(mod._forward_hooks for mod in m.modules())
    distiller = Distiller(copy.deepcopy(student), copy.deepcopy(teacher), logit_losses=["kd"],
                          pathways=[Pathway("layer2", "layer2", method="fitnets")], input_shape=(1, 28, 28))
    data = from_arrays(torch.zeros(128, 1, 28, 28, dtype=torch.uint8), y)
    trainer = Trainer(distiller, BatchLoader(data, 128), None, TrainConfig(epochs=1, progress=False))
    fitnets_weight = distiller.weighting.base_weights[distiller.pathways[0].name]

    # The hand-written loop: same initial weights, the same adapter, same optimiser settings.
    for p_ in h_teacher.parameters():
        p_.requires_grad_(False)
    h_adapter = copy.deepcopy(distiller.pathways[0].transform)
    params = list(h_student.parameters()) + list(h_adapter.parameters())
    h_opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    h_student.train()
    h_adapter.train()

    def hand_step() -> None:
        with torch.no_grad():
            t_mid, t_logits = resnet_features(h_teacher, x)
        s_mid, s_logits = resnet_features(h_student, x)
        ce = F.cross_entropy(s_logits, y)
        kd = F.kl_div(F.log_softmax(s_logits / 4, 1), F.log_softmax(t_logits / 4, 1), reduction="batchmean",
                      log_target=True) * 16
        a, b = h_adapter(s_mid, t_mid)
        loss = ce + kd + fitnets_weight * F.mse_loss(a, b)
        h_opt.zero_grad(set_to_none=True)
        loss.backward()
        h_opt.step()

    def kdtune_step() -> None:
        trainer.train_step(x, y)

    def timed(step) -> float:
        return seconds_per_call(step, args.steps)

    for step in (hand_step, kdtune_step):  # warm-up (allocator, oneDNN primitive caches)
        timed(step)
    hand, kd, ratios = [], [], []
    for rep in range(args.reps):
        order = (hand_step, kdtune_step) if rep % 2 == 0 else (kdtune_step, hand_step)
        times = {f: timed(f) for f in order}
        hand.append(times[hand_step])
        kd.append(times[kdtune_step])
        ratios.append(times[kdtune_step] / times[hand_step])
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "teacher": args.teacher, "student": args.student, "batch": 128, "reps": args.reps, "steps": args.steps,
        "hand_ms": 1000 * statistics.median(hand), "kdtune_ms": 1000 * statistics.median(kd),
        "median_ratio": statistics.median(ratios), "ratios": [round(r, 4) for r in ratios],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
