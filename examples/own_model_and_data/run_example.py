"""Bring your own model and data, end to end, with the kdtune command line only.

    cd examples/own_model_and_data
    python run_example.py                      # 100 images per class, 3 epochs per run
    python run_example.py --per-class 500 --epochs 10

1. writes a Fashion-MNIST subset as PNG files: data/fmnist_png/{train,test}/<class>/<n>.png
   (stands in for your own image folder);
2. ``kdtune run teacher.yaml`` trains the teacher of my_models.py (listed under ``plugins:``);
3. ``kdtune run --plugin my_models distill.yaml`` trains the student alone, then with KD + a
   FitNets pathway from that teacher's checkpoint;
4. ``kdtune report`` compares the two student runs.

Every step is a plain ``kdtune`` command, printed before it runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from kdtune.data import balanced_subset, load_fashion_mnist
from kdtune.imagefolder import write_image_folder

HERE = Path(__file__).resolve().parent
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def write_pngs(root: Path, per_class: int, test_images: int) -> None:
    """The Fashion-MNIST subset as an image folder (skipped if it is already there)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return
    train = balanced_subset(load_fashion_mnist("train"), per_class, seed=0)
    test = load_fashion_mnist("test").subset(torch.arange(test_images))
    write_image_folder(train.images, train.labels, root / "train", CLASSES)
    write_image_folder(test.images, test.labels, root / "test", CLASSES)
    print(f"wrote {len(train)} training and {len(test)} test PNGs under {root}")


def kdtune(*args: str) -> str:
    """Run ``kdtune <args>`` (from this directory, where my_models.py lives); return its output."""
    print("$ kdtune " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "kdtune.cli", *args], cwd=HERE, capture_output=True, text=True)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        sys.exit(f"kdtune {args[0]} failed (exit {proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def run_dir(output: str) -> str:
    return next(line.removeprefix("run: ") for line in output.splitlines() if line.startswith("run: "))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=100, help="training images per class")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="runs", help="run directory root (relative to this directory)")
    args = p.parse_args(argv)

    data = HERE / args.out / "fmnist_png"
    write_pngs(data, args.per_class, args.test_images)
    common = [f"data.root={data}", f"output_dir={args.out}", f"train.epochs={args.epochs}"]
    teacher = run_dir(kdtune("run", "teacher.yaml", *common))
    checkpoint = f"teacher.checkpoint={HERE / teacher / 'checkpoints' / 'last.pt'}"
    alone = run_dir(kdtune("run", "--plugin", "my_models", "distill.yaml", *common, "name=own_student_alone",
                           "teacher=null", "distill.logit_losses=[]", "distill.pathways=[]"))
    kd = run_dir(kdtune("run", "--plugin", "my_models", "distill.yaml", *common, checkpoint))
    kdtune("report", alone, kd, teacher)
    return 0


if __name__ == "__main__":
    sys.exit(main())
