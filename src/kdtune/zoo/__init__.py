"""Shipped teachers: checkpoints trained by ``scripts/train_teacher.py``, with their records.

    teacher = load_teacher("resnet56_fashion_mnist")     # frozen-ready nn.Module, eval mode
    teacher_record("resnet56_fashion_mnist")["test_acc"]  # measured after the fp16 round trip

Weights are stored in fp16 to keep the package small and loaded back to fp32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdtune.registry import closest

if TYPE_CHECKING:
    from torch import nn

ZOO_DIR = Path(__file__).resolve().parent
ZOO_PREFIX = "zoo:"


def list_teachers() -> list[str]:
    """Names of the shipped teachers (``<model>_<dataset>``)."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.pt") if p.with_suffix(".json").exists())


def teacher_record(name: str) -> dict[str, Any]:
    """The training record of a shipped teacher (command, per-epoch metrics, test accuracy)."""
    return json.loads(_path(name, ".json").read_text())


def _path(name: str, suffix: str) -> Path:
    path = ZOO_DIR / f"{name}{suffix}"
    if not path.exists():
        names = list_teachers()
        near = closest(name, names)
        raise KeyError(f"no shipped teacher {name!r}" + (f"; did you mean {', '.join(near)}?" if near else "")
                       + f" Shipped: {', '.join(names) or 'none (run scripts/train_teacher.py)'}")
    return path


def load_teacher(name: str) -> nn.Module:
    """Build the teacher's architecture and load its shipped weights (eval mode)."""
    # torch-heavy imports here: `kdtune list teachers` reads only the records.
    from kdtune.checkpoint import load_checkpoint, load_state_strict
    from kdtune.models import create_model

    name = name.removeprefix(ZOO_PREFIX)
    record = teacher_record(name)
    model = create_model(record["model"], in_channels=record["in_channels"], num_classes=record["num_classes"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_checkpoint(_path(name, ".pt")).items()}
    load_state_strict(model, state, f"teacher {name}")
    return model.eval()
