"""When MetaDistiller's label generator learns: a Trainer callback running Alg. 1, lines 8–19.

Every M epochs (``epoch % M == 0``, 0-based, so the generator also learns in the first epoch) the
training set D is split at random into two disjoint halves D_train and D_test (line 10); then,
after each real training step of that epoch (lines 4–7, the Trainer's), the generator takes one
meta step (lines 12–19): a batch of D_train for the look-ahead θ_s⁺ (eq. 7), a batch of D_test for
L_val(θ_s⁺), and Adam on ∇θ_g L_val (eq. 8) — :meth:`SelfDistiller.meta_step`. The condition of
line 9 sits inside the per-iteration loop of Alg. 1, hence a meta step per iteration of the
meta epochs; ``steps`` caps their number per epoch (cheaper, not the paper's).

The inner learning rate ζ is the main model's current learning rate (§4.1). The generator's Adam
rate follows the main schedule too: ``generator_lr × (current lr / initial lr)`` — §4.1 gives both
optimisers "initial learning rates" of 0.1 and one decay schedule ("multiply the learning rate
by 0.1 at epoch 80 and 140"); we read it as applying to both. The split and the
meta batches depend only on (seed, epoch), so a resumed run redraws them exactly; the generator's
Adam state is in the distiller's checkpoint. Every rank draws the same meta batches, so under DDP
all ranks take the same generator step (the model's parameters are identical on all ranks and
BatchNorm uses batch statistics).

Written per meta epoch to ``<run>/meta.jsonl``: ``{"epoch", "meta_steps", "meta_val_ce",
"meta_val_ce_first", "meta_val_ce_last"}`` (L_val of the look-ahead model before each step: the summed
CE of the final output and the exits, or of the final output alone, as ``meta_objective`` says).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from kdtune import jsonutil
from kdtune.data import Augment, Images, make_loader
from kdtune.selfdistill.selfdistiller import SelfDistiller
from kdtune.trainer import Callback, Trainer

__all__ = ["MetaStep"]


class MetaStep(Callback):
    """Trains a :class:`SelfDistiller`'s label generator every ``every`` epochs (Alg. 1, lines 8–19).

    Args:
        distiller: a SelfDistiller with ``method="md"``.
        train: the training set D (un-normalised images, in memory or on disk).
        every: M, epochs between meta epochs (5 in the paper, §3.5).
        steps: meta steps per meta epoch; None: one after every training step (Alg. 1).
        batch_size: size of each of the two meta batches.
        augment: augmentation of the meta batches (the training loader's, normally).
        seed: seeds the splits and meta batches together with the epoch.
    """

    def __init__(self, distiller: SelfDistiller, train: Images, every: int = 5, steps: int | None = None,
                 batch_size: int = 128, augment: Augment | None = None, seed: int = 0) -> None:
        if distiller.generator is None:
            raise ValueError(f"MetaStep needs a SelfDistiller with method='md', got method={distiller.method!r}")
        if every < 1:
            raise ValueError(f"every (M) must be >= 1, got {every}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1 or None (after every training step), got {steps}")
        if len(train) < 2:
            raise ValueError(f"the meta step splits the training set in two halves; it has {len(train)} image(s)")
        self.distiller, self.train, self.every, self.steps = distiller, train, every, steps
        self.batch_size, self.augment, self.seed = batch_size, augment, seed
        self._losses: list[float] = []
        self._active = False
        self._batches: tuple[Iterator[tuple[Tensor, Tensor]], Iterator[tuple[Tensor, Tensor]]] | None = None

    # ------------------------------------------------------------------ callback hooks

    def on_fit_start(self, trainer: Trainer) -> None:
        # A resumed run redoes the epochs after its checkpoint: drop their rows.
        path = trainer.run_dir / "meta.jsonl" if trainer.run_dir else None
        if path is None or not trainer.dist.is_main:
            return
        rows = path.read_text().splitlines() if path.exists() else []
        kept = [r for r in rows if r.strip() and json.loads(r)["epoch"] <= trainer.epoch]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(r + "\n" for r in kept))

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._losses = []
        self._active = epoch % self.every == 0  # Alg. 1, line 9
        if not self._active:
            self._batches = None
            return
        # Alg. 1, line 10: a new random split of D into two disjoint halves of equal size.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train), generator=g)
        half = len(self.train) // 2
        self._batches = (self._stream(order[:half], epoch, 0, trainer),
                         self._stream(order[half:2 * half], epoch, 1, trainer))

    def on_batch_end(self, trainer: Trainer, out: dict[str, Tensor]) -> None:
        if not self._active or (self.steps is not None and len(self._losses) >= self.steps):
            return
        x_train, y_train = next(self._batches[0])  # Alg. 1, line 12
        x_val, y_val = next(self._batches[1])  # line 15
        group = trainer.optimizer.param_groups[0]
        zeta = group["lr"]  # ζ = the main model's learning rate (§4.1)
        factor = zeta / group["initial_lr"] if group.get("initial_lr") else 1.0  # the schedule's factor now
        self._losses.append(self.distiller.meta_step(x_train, y_train, x_val, y_val, zeta, factor))

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if not self._losses or trainer.run_dir is None or not trainer.dist.is_main:
            return
        row = {"epoch": metrics["epoch"], "meta_steps": len(self._losses),
               "meta_val_ce": sum(self._losses) / len(self._losses),
               "meta_val_ce_first": self._losses[0], "meta_val_ce_last": self._losses[-1]}
        with open(trainer.run_dir / "meta.jsonl", "a") as f:
            f.write(jsonutil.dumps(row) + "\n")

    # ------------------------------------------------------------------ batches

    def _stream(self, indices: Tensor, epoch: int, part: int, trainer: Trainer) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless shuffled, augmented, normalised batches of one half (reshuffled at each pass)."""
        loader = make_loader(self.train.subset(indices), min(self.batch_size, len(indices)), shuffle=True,
                             augment=self.augment, seed=(self.seed * 1_000_003 + epoch) * 2 + part)
        passes = 0
        while True:
            loader.set_epoch(passes)
            for batch in loader:
                yield trainer.prepare_batch(*batch)  # the model's memory format and device
            passes += 1
