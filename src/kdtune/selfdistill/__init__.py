"""Teacher-free self-distillation: exits on early stages, DSN / SD / MetaDistiller (SPEC § MetaDistiller).

    kdtune run configs/fmnist/selfdistill.yaml method=md        # also dsn, sd
    kdtune export runs/<run> student.pt                         # the plain model; exits and generator dropped

In Python, with any model::

    sd = SelfDistiller(model, input_shape=(1, 28, 28), method="md")      # exits found automatically
    trainer = Trainer(sd, train_loader, test_loader, cfg, callbacks=[MetaStep(sd, train_set)])
    trainer.fit()       # test_acc (final output), test_acc/exit<k>, test_acc/ensemble

Modules: :mod:`~kdtune.selfdistill.heads` (exit bottlenecks), :mod:`~kdtune.selfdistill.generator`
(top-down label generator, eq. 5), :mod:`~kdtune.selfdistill.selfdistiller` (losses eq. 3–4, the
functional look-ahead and meta-gradient eq. 6–8), :mod:`~kdtune.selfdistill.meta` (Alg. 1's
schedule of meta steps), :mod:`~kdtune.selfdistill.build` (from a run config).
"""

from kdtune.selfdistill.build import from_config
from kdtune.selfdistill.generator import TopDownLabelGenerator
from kdtune.selfdistill.heads import ExitHead
from kdtune.selfdistill.meta import MetaStep
from kdtune.selfdistill.selfdistiller import METHODS, SelfDistiller

__all__ = ["METHODS", "ExitHead", "MetaStep", "SelfDistiller", "TopDownLabelGenerator", "from_config"]
