"""kdtune: automated knowledge distillation for any ``nn.Module``.

The public entry points; everything else lives in its seam's module (``kdtune.capture``,
``kdtune.transforms``, ``kdtune.distances``, ``kdtune.losses``, ``kdtune.weighting``).

They are imported on first use (PEP 562 ``__getattr__``): ``import kdtune`` alone does not import
torch, so the command line answers ``kdtune --help`` without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdtune.config import RunConfig, TrainConfig, load_config
    from kdtune.distiller import Distiller, LogitLoss, TeacherOutput
    from kdtune.models import create_model, list_models, register_model
    from kdtune.pathways import Pathway
    from kdtune.trainer import Callback, Trainer

__version__ = "0.1.0"

_HOME = {
    "RunConfig": "kdtune.config", "TrainConfig": "kdtune.config", "load_config": "kdtune.config",
    "Distiller": "kdtune.distiller", "LogitLoss": "kdtune.distiller", "TeacherOutput": "kdtune.distiller",
    "create_model": "kdtune.models", "list_models": "kdtune.models", "register_model": "kdtune.models",
    "Pathway": "kdtune.pathways",
    "Callback": "kdtune.trainer", "Trainer": "kdtune.trainer",
}

__all__ = [
    "Callback", "Distiller", "LogitLoss", "Pathway", "RunConfig", "TeacherOutput", "TrainConfig", "Trainer",
    "create_model", "list_models", "load_config", "register_model",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'kdtune' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
