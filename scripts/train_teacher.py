"""Train a benchmark teacher on a whole training set (default: Fashion-MNIST's 60,000 images) and ship it.

    python scripts/train_teacher.py resnet56 --epochs 15
    python scripts/train_teacher.py wrn_40_2 --epochs 8
    python scripts/train_teacher.py wrn_40_2 --epochs 4 --lr 0.05 --init-shipped   # continue the shipped one
    python scripts/train_teacher.py own_teacher --plugin benchmarks.own_pair_models --dataset mnist \
        --epochs 1 --out benchmarks/data                # a user's registered model on MNIST (`own_pair` table)

Writes ``src/kdtune/zoo/<model>_<dataset>.pt`` (fp16 state dict, small enough to ship) and
``<same>.json`` (the training record: per-epoch loss/accuracy/time, final test accuracy measured
*after* the fp16 round trip, the command, seed, versions). Recipe: SGD momentum 0.9 Nesterov,
weight decay 5e-4, batch 128, lr 0.1 cosine, crop(pad 2) + the dataset's flip default (none for
MNIST) — the FMNIST-5k protocol's recipe on the full training set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdtune.data import BatchLoader, ImageDataset, dataset_augment, load_dataset, load_fashion_mnist
from kdtune.models import create_model
from kdtune.plugins import import_plugins

ZOO = Path(__file__).resolve().parents[1] / "src" / "kdtune" / "zoo"


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, loader: BatchLoader) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / len(loader.ds)


def first_500_accuracy(model: torch.nn.Module, test: ImageDataset) -> float:
    """Accuracy on the first 500 test images: the figure tests/test_zoo.py re-measures (quick on any machine)."""
    return test_accuracy(model, BatchLoader(test.subset(torch.arange(500)), 500, shuffle=False, channels_last=True))


def evaluate_shipped(model_name: str, out: Path) -> None:
    """Recompute ``test_acc``, ``test_acc_first_2000`` and ``test_acc_first_500`` of a shipped teacher's record."""
    from kdtune.zoo import load_teacher

    stem = out / f"{model_name}_fashion_mnist"
    record = json.loads(stem.with_suffix(".json").read_text())
    model = load_teacher(stem.name).to(memory_format=torch.channels_last)
    test = load_fashion_mnist("test")
    record["test_acc"] = test_accuracy(model, BatchLoader(test, 500, shuffle=False, channels_last=True))
    first = BatchLoader(test.subset(torch.arange(2000)), 500, shuffle=False, channels_last=True)
    record["test_acc_first_2000"] = test_accuracy(model, first)
    record["test_acc_first_500"] = first_500_accuracy(model, test)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{stem.name}: test_acc={record['test_acc']:.4f} first_2000={record['test_acc_first_2000']:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="fashion_mnist", help="a registered dataset (`kdtune list datasets`)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module first (it registers the model); repeatable")
    p.add_argument("--out", type=Path, default=ZOO)
    p.add_argument("--init-shipped", action="store_true",
                   help="start from the shipped teacher's weights (a warm restart: a new cosine schedule from "
                        "--lr); its record keeps the earlier training under 'previous'")
    p.add_argument("--evaluate-only", action="store_true",
                   help="re-measure a shipped teacher's test accuracies into its record (no training)")
    args = p.parse_args()
    if args.evaluate_only:
        evaluate_shipped(args.model, args.out)
        return

    import_plugins(args.plugin)
    torch.manual_seed(args.seed)
    train, test = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    model = create_model(args.model, in_channels=train.in_channels, num_classes=train.num_classes)
    model = model.to(memory_format=torch.channels_last)
    stem = args.out / f"{args.model}_{args.dataset}"
    previous = None
    if args.init_shipped:  # continue training the shipped weights instead of starting from scratch
        from kdtune.zoo import load_teacher

        model.load_state_dict(load_teacher(stem.name).state_dict())
        previous = json.loads(stem.with_suffix(".json").read_text())
    loader = BatchLoader(train, 128, shuffle=True, augment=dataset_augment(args.dataset, 2, None), seed=args.seed,
                         channels_last=True)
    test_loader = BatchLoader(test, 500, shuffle=False, channels_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(loader))
    record = {"model": args.model, "dataset": args.dataset, "in_channels": train.in_channels,
              "num_classes": train.num_classes,
              "command": " ".join(["python", *sys.argv]), "seed": args.seed, "epochs": [],
              "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "date": datetime.date.today().isoformat()}
    if previous is not None:
        record["previous"] = previous
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        loader.set_epoch(epoch)
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
        acc = test_accuracy(model, test_loader)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "test_acc": acc, "seconds": time.time() - t0}
        record["epochs"].append(row)
        print(json.dumps(row), flush=True)

    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    record["test_acc"] = test_accuracy(model, test_loader)  # after the fp16 round trip actually shipped
    first = BatchLoader(test.subset(torch.arange(2000)), 500, shuffle=False, channels_last=True)
    record["test_acc_first_2000"] = test_accuracy(model, first)
    record["test_acc_first_500"] = first_500_accuracy(model, test)  # what tests/test_zoo.py re-measures
    record["train_seconds"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(stem.with_suffix(".pt"))
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {stem}.pt  test_acc={record['test_acc']:.4f}")


if __name__ == "__main__":
    main()
