"""Calibrated term weights: each distillation term's gradient set to a fraction of the task gradient's.

Catalogue weights (FitNets 100, AT 1000, SP 3000, PKT 30000 ...) are constants tuned for CIFAR
ResNets; on another pair they can make a term's gradient 100x larger or smaller than the label
gradient. Calibration measures instead. On the first B training batches, with theta the student's
trainable parameters, g_task = d CE / d theta and g_i = d term_i / d theta (term i unweighted):

    c_i = r * mean_b ||g_task,b|| / mean_b ||g_i,b||

so that at the start of training ||c_i g_i|| = r ||g_task|| (on average over the B batches) for
every term i. c_i replaces the catalogue weight; a weight given explicitly (a config's ``weight``,
a search's W_f / W_p or v) multiplies it. Every weighting strategy starts from the calibrated
weights (:attr:`kdtune.weighting.base.Weighting.scales`).

Default r = 1: every term, at weight 1, pulls on the student as hard as the labels do at the start.
Measured at the start of training (ResNet-56 -> resnet8, Fashion-MNIST, 50 images per class, 4 batches;
``python scripts/calibration_report.py``): the settings known to work put a term between 0.5 and 2 --
plain KD at weight 1 (Hinton's sum, the robust default) is at 2.0, FitNets at weight 1 (89.9 % on a
user's pair) at 0.46 -- while the catalogue's CIFAR constants put FitNets at 46 and the last AT stage
at 20 (FitNets at 100 gave that user 72.8 %). r = 1 is the middle of the working range on a log
scale, and it is a statement about the pair-independent quantity (gradient shares), not about a
loss's units.

The measurement changes nothing in the run: batch-norm running statistics are restored and the
random state is forked, so a calibrated run draws exactly what the uncalibrated run would. The
measured weights are written to the run's ``config.yaml`` (``distill.calibrate.weights``): a
resumed run reads them there and does not measure again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.weighting.gradients import path_gradients

if TYPE_CHECKING:
    from kdtune.config import CalibrateConfig
    from kdtune.distiller import Distiller


@dataclass
class Calibration:
    """What a calibration measured and set.

    Attributes:
        ratio: r, the target ||c_i g_i|| / ||g_task||.
        batches: how many batches the norms are averaged over.
        grad_norms: mean gradient norm of ``task`` and of every unweighted term.
        weights: c_i per calibrated term (a term with a zero gradient keeps its weight and is absent).
    """

    ratio: float
    batches: int
    grad_norms: dict[str, float]
    weights: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gradient_norms(distiller: Distiller, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[dict[str, float], int]:
    """Mean over ``batches`` of ||d CE / d theta|| (``task``) and of ||d term_i / d theta|| per term.

    theta: the student's trainable parameters; terms are unweighted, as :meth:`Distiller.distill_terms`
    returns them at step 0, with the student (and adapters) in training mode as in a real step.
    Running statistics of every buffer are restored afterwards and the global RNG is forked, so the
    run that follows is unchanged.

    Returns:
        (norms, number of batches used).
    """
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    saved = {name: b.detach().clone() for name, b in distiller.named_buffers()}
    was_training = distiller.training
    sums: dict[str, float] = {}
    n = 0
    with torch.random.fork_rng(devices=[]):
        distiller.train()
        try:
            device = params[0].device if params else torch.device("cpu")
            for x, y in batches:
                x, y = x.to(device), y.to(device)  # loaders yield CPU batches; the model may be on a GPU
                teacher = distiller.teacher_forward(x)
                logits = distiller.student_logits(x)  # the logits of a tuple / dict output (student_output)
                terms = distiller.distill_terms(logits, y, teacher, step=0)
                losses = {"task": F.cross_entropy(logits, y), **terms}
                norms = path_gradients(list(losses.values()), params).norm(dim=1).tolist()
                for name, value in zip(losses, norms, strict=True):
                    sums[name] = sums.get(name, 0.0) + value
                n += 1
        finally:
            with torch.no_grad():
                for name, b in distiller.named_buffers():
                    b.copy_(saved[name])
            distiller.train(was_training)
    if n == 0:
        raise ValueError("calibration got no batch: the training loader is empty")
    return {k: v / n for k, v in sums.items()}, n


def calibrated_weights(norms: Mapping[str, float], ratio: float) -> dict[str, float]:
    """c_i = ratio * norms["task"] / norms[i] for every term with a non-zero gradient."""
    task = norms["task"]
    if not task > 0:
        raise ValueError(f"calibration: the task gradient's norm is {task}; nothing to calibrate against")
    return {name: ratio * task / g for name, g in norms.items() if name != "task" and g > 0}


def calibrate_from_config(distiller: Distiller, loader: Any, cc: CalibrateConfig) -> Calibration | None:
    """What a run does with ``distill.calibrate``: reuse the recorded weights (resume), else measure
    on the first ``cc.batches`` batches of epoch 0 of ``loader`` and record them in ``cc``.

    Returns None (nothing to do) for a distiller without distillation terms.
    """
    if not distiller.has_terms:
        return None
    if cc.weights:
        return distiller.set_calibration(cc.weights, Calibration(cc.ratio, cc.batches, dict(cc.grad_norms),
                                                                 dict(cc.weights)))
    loader.set_epoch(0)  # the loader's order depends on (seed, epoch) only: the run's epoch 0 is unchanged
    result = distiller.calibrate(islice(iter(loader), cc.batches), cc.ratio)
    cc.weights, cc.grad_norms = dict(result.weights), dict(result.grad_norms)
    return result
