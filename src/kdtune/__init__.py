"""kdtune: automated knowledge distillation for any ``nn.Module``."""

__version__ = "0.1.0"
