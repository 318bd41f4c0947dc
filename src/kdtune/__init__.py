"""kdtune: automated knowledge distillation for any ``nn.Module``.

The public entry points; everything else lives in its seam's module (``kdtune.capture``,
``kdtune.transforms``, ``kdtune.distances``, ``kdtune.losses``, ``kdtune.weighting``).
"""

from kdtune.config import RunConfig, TrainConfig, load_config
from kdtune.distiller import Distiller, LogitLoss, TeacherOutput
from kdtune.models import create_model, list_models, register_model
from kdtune.pathways import Pathway
from kdtune.trainer import Callback, Trainer

__version__ = "0.1.0"

__all__ = [
    "Callback", "Distiller", "LogitLoss", "Pathway", "RunConfig", "TeacherOutput", "TrainConfig", "Trainer",
    "create_model", "list_models", "load_config", "register_model",
]
