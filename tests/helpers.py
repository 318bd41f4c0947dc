"""Test helpers importable from any test module (``from helpers import TinyNet``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn


class TinyNet(nn.Module):
    """A user's own model: two conv stages in ``blocks``, a linear ``head``. Input (N,1,8,8)+."""

    def __init__(self, width: int = 4, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU()),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))



class PairStage(nn.Module):
    """A block returning (feature map (N, C, H, W), pooled (N, C)), as transformer blocks return tuples."""

    def __init__(self, blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(x)
        return h, h.mean((2, 3))


class DictNet(nn.Module):
    """A user's model returning ``{"pooled": (N, C), "logits": (N, K)}``; its ``stage`` returns a tuple.

    Its ``net`` is a :class:`TinyNet` and it has no other parameter: built from the same seed,
    ``DictNet(width=w).net`` and ``TinyNet(w)`` are the same model, one with a dict output.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.net = TinyNet(width, in_channels, num_classes)
        self.stage = PairStage(self.net.blocks)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _, pooled = self.stage(x)
        return {"pooled": pooled, "logits": self.net.head(pooled)}


def tiny_autokd(name: str, epochs: int = 1, data: dict[str, Any] | None = None, **autokd: Any) -> dict[str, Any]:
    """A seconds-long Auto-KD search config on 100 real Fashion-MNIST images (50/50 train/val split),
    tested on the first 500 test images.

    The teacher is an untrained ResNet-8: enough for the plumbing, not for accuracy. Every proxy
    is off except those given in ``autokd`` (e.g. ``layer_weights="train_free"``), and so are the
    KD incumbent and the minimum proxy length.
    """
    return {
        "seed": 0, "name": name,
        "data": {"dataset": "fashion_mnist", "train_per_class": 10, "val_fraction": 0.5, "eval_batch_size": 1000,
                 "test_limit": 500, **(data or {})},
        "student": {"name": "resnet8"},
        "teacher": {"name": "resnet8"},
        "train": {"epochs": epochs, "progress": False},
        # The search's own mechanics: no KD incumbent, no minimum proxy length (tests of those set them).
        "autokd": {"subset": 1.0, "epoch_fraction": 1.0, "heartbeat": 1, "kd_incumbent": False, "min_steps": 1,
                   **autokd},
    }


def kdtune_run(config: dict[str, Any], out: Path, *overrides: str) -> Path:
    """``kdtune run`` a config dict (written as YAML beside ``out``) into ``out``; the one run directory."""
    from kdtune.cli import main

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump({**config, "output_dir": str(out)}))
    assert main(["run", str(path), *overrides]) == 0
    (run_dir,) = out.iterdir()
    return run_dir
