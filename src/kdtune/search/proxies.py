"""Auto-KD's search-acceleration proxies (papers/auto-kd.txt §2.3, Table 2), each switchable.

* **Offline teacher** (:class:`TeacherCache`, :class:`CachedTeacher`): the teacher's logits and
  features for every training batch of every proxy epoch are computed once, stored on disk and
  read back by every trial instead of running the teacher. The batches are *replayed*: a
  :class:`~kdtune.data.BatchLoader`'s or :class:`~kdtune.data.DatasetLoader`'s order and per-sample
  crops/flips of epoch e depend only on ``(seed, e)`` (and, with workers, the worker count), so
  iterating the same loader again yields the very augmented images the student
  sees, and the cached features match the student's view (§2.3: "apply the same data
  augmentation ... to ensure spatial alignment").
* **Sparse student** (:class:`SparseStudent`): a random mask holds ``sparsity`` of every conv /
  linear weight at zero (Liu et al. [50]); every ``regrow_every`` steps the smallest-magnitude
  active weights are pruned and as many inactive ones regrown at random (SET-style dynamic
  sparsity, [15]). On a CPU with dense kernels this saves no time — it is the paper's proxy for
  memory/FLOPs, and changes what a trial's student can learn.
* **Data subset** (:func:`proxy_subset`) and **early stop** (:func:`proxy_epochs`): 20 % of the
  training data and 20 % of the epochs by default, raised by :func:`proxy_budget` when they would
  give a trial fewer than ``autokd.min_steps`` optimiser steps (a 4-step proxy ranks noise). The
  default 150: plain KD (ResNet-56 -> ResNet-8, Fashion-MNIST, 6 epochs, 1 seed) reaches 44.3 %
  test accuracy after 42 steps -- what the default 0.2 x 0.2 proxy of FMNIST-5k's 80 % split gets --
  and 78.1 % after 150 (``kdtune run configs/fmnist/kd.yaml data.train_per_class=80|320
  train.epochs=6 data.test_limit=2000``): at 42 steps a trial measures how fast a design starts,
  at 150 where it is heading, for about a minute of one core per trial.
* **Fidelity** (:func:`spearman`): the rank correlation between proxy rewards and full-training
  accuracies of the same candidates (``autokd.fidelity_check``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdtune.checkpoint import load_checkpoint, save_atomic
from kdtune.data import BatchLoader, DatasetLoader, Images, train_val_split
from kdtune.distiller import Distiller, TeacherOutput
from kdtune.trainer import Callback, Trainer

# --------------------------------------------------------------------------- subset / early stop


def proxy_subset(ds: Images, fraction: float, seed: int = 0) -> Images:
    """A stratified ``fraction`` of ``ds`` (each class keeps the same share), drawn with ``seed``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subset fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return ds
    return train_val_split(ds, fraction, seed)[1]


def proxy_epochs(epochs: int, fraction: float) -> int:
    """Early stop: ``max(1, round(fraction * epochs))`` epochs (the LR schedule spans this length)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"epoch fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * epochs))


def proxy_budget(train_images: int, batch_size: int, epochs: int, subset: float, epoch_fraction: float,
                 min_steps: int) -> tuple[float, int, str | None]:
    """The proxy's (subset, epochs), raised so that a trial trains at least ``min_steps`` optimiser steps.

    steps = proxy_epochs * ceil(subset * train_images / batch_size). When that is below ``min_steps``,
    the subset is raised first (more distinct images beat repeating a few), up to all the data, then
    the epochs, up to ``epochs`` (a proxy never trains longer than the full run: if even that is
    short of ``min_steps``, the proxy is the full run).

    Returns:
        (subset, proxy epochs, message saying what was raised and why, or None when nothing was).
    """
    def steps(fraction: float, n_epochs: int) -> int:
        return n_epochs * -(-max(1, round(fraction * train_images)) // batch_size)

    p_epochs = proxy_epochs(epochs, epoch_fraction)
    before = steps(subset, p_epochs)
    if before >= min_steps:
        return subset, p_epochs, None
    per_epoch_needed = -(-min_steps // p_epochs)  # batches per epoch the current epoch count needs
    new_subset = min(1.0, per_epoch_needed * batch_size / train_images)
    new_epochs = p_epochs
    if steps(new_subset, p_epochs) < min_steps:
        new_epochs = min(epochs, -(-min_steps // steps(new_subset, 1)))
    after = steps(new_subset, new_epochs)
    start = (f"autokd proxy: subset {subset:g} x {p_epochs} epoch(s) of {train_images} images at batch {batch_size} "
             f"= {before} optimiser steps < autokd.min_steps {min_steps}")
    if (new_subset, new_epochs) == (subset, p_epochs):
        return subset, p_epochs, f"{start}; the proxy already is the full run (raise train.epochs for longer trials)"
    capped = " -- the full run: a proxy never trains longer than it" if after < min_steps else ""
    message = (f"{start}; raised subset to {new_subset:.3g} and epochs to {new_epochs} -> {after} steps{capped} "
               f"(a proxy of a few steps ranks noise)")
    return new_subset, new_epochs, message


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation rho: the Pearson correlation of the ranks (ties: mean rank).

    ``nan`` when fewer than 2 pairs or a constant sequence (no ranking to compare).
    """
    if len(x) != len(y):
        raise ValueError(f"spearman needs paired values, got {len(x)} and {len(y)}")

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


# --------------------------------------------------------------------------- offline teacher


class TeacherCache:
    """Teacher logits + features of every batch of epochs ``0 .. epochs-1`` of a loader, on disk.

    Files: ``<directory>/epoch_<e>.pt`` holding, per batch, ``labels`` (B,), ``logits`` (B, K) and
    one (B, ...) tensor per captured teacher module; ``meta.json`` with the loader's fingerprint.
    Building is idempotent and atomic per file (several workers may build it at once).

    Args:
        directory: where the files live.
        loader: the *training* loader of the trials (same dataset, batch size, seed, augmentation);
            one whose epochs are seeded and that has a ``fingerprint()`` (kdtune's loaders).
        epochs: how many epochs to store (the proxy's epoch count).
    """

    def __init__(self, directory: str | Path, loader: BatchLoader | DatasetLoader, epochs: int) -> None:
        if not hasattr(loader, "fingerprint"):
            raise ValueError(f"the teacher cache replays a loader's batches, so its order must be seeded: use a "
                             f"kdtune BatchLoader or DatasetLoader, not a {type(loader).__name__} (or autokd.cache: "
                             f"false)")
        self.directory, self.loader, self.epochs = Path(directory), loader, int(epochs)
        self._epoch: int | None = None
        self._data: dict[str, Any] | None = None

    def fingerprint(self) -> str:
        """Hash of what the cached batches depend on: images, labels, batch size, seed, augmentation."""
        return hashlib.sha256(f"{self.loader.fingerprint()}|{self.epochs}".encode()).hexdigest()[:16]

    def build(self, distiller: Distiller) -> float:
        """Run the teacher once over every proxy epoch and store its outputs; returns seconds spent.

        A cache whose fingerprint matches is kept (0 seconds).
        """
        import time

        meta_path = self.directory / "meta.json"
        fp = self.fingerprint()
        if meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == fp and all(
                (self.directory / f"epoch_{e}.pt").exists() for e in range(self.epochs)):
            return 0.0
        t0 = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        for e in range(self.epochs):
            self.loader.set_epoch(e)
            batches = []
            for x, y in self.loader:
                out = distiller.teacher_forward(x)
                batches.append({"labels": y, "logits": out.logits,
                                "features": {k: v.contiguous() for k, v in out.features.items()}})
            save_atomic({"batches": batches}, self.directory / f"epoch_{e}.pt")
        meta_path.write_text(json.dumps({"fingerprint": fp, "epochs": self.epochs}) + "\n")
        return time.perf_counter() - t0

    def batch(self, epoch: int, index: int) -> dict[str, Any]:
        """The stored outputs of batch ``index`` of ``epoch`` (one epoch file held in memory)."""
        if epoch >= self.epochs:
            raise IndexError(f"the teacher cache holds epochs 0..{self.epochs - 1}, not {epoch}; "
                             f"rebuild it for the proxy's epoch count")
        if self._epoch != epoch:
            self._data = load_checkpoint(self.directory / f"epoch_{epoch}.pt")
            self._epoch = epoch
        assert self._data is not None
        return self._data["batches"][index]


class CachedTeacher(Callback):
    """Hands the cached teacher output of each training batch to the distiller (no teacher forward).

    Uses :meth:`Distiller.reuse_teacher_output`; the labels of every batch are checked against the
    cache, so a cache built for other data or another seed fails loudly instead of teaching garbage.
    """

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache
        self._index = 0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._index = 0

    def on_batch_start(self, trainer: Trainer, x: Tensor, y: Tensor) -> None:
        stored = self.cache.batch(trainer.epoch, self._index)
        self._index += 1
        if not torch.equal(stored["labels"], y):
            raise RuntimeError(f"teacher cache {self.cache.directory}: batch {self._index - 1} of epoch "
                               f"{trainer.epoch} has other labels than the training batch; the cache was "
                               f"built for other data, batch size or seed: delete it to rebuild")
        # The cache lives on the CPU; the distiller may train on a GPU.
        out = TeacherOutput(stored["logits"].to(x.device),
                            {k: v.to(x.device) for k, v in stored["features"].items()})
        trainer.distiller.reuse_teacher_output(x, out)


# --------------------------------------------------------------------------- sparse student


def prunable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Weights of every conv and linear layer (biases and BN stay dense)."""
    return [(f"{name}.weight" if name else "weight", m.weight) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


class SparseStudent(Callback):
    """Trains the student with a fraction of its weights held at zero (Auto-KD §2.3, Table 2).

    Per layer, a random mask keeps ``1 - sparsity`` of the weights (uniform layer-wise sparsity,
    [50]). After every optimiser step the masked weights are zeroed again. Every ``regrow_every``
    steps, in each layer, the ``regrow_fraction`` of active weights with the smallest magnitude are
    pruned and as many inactive positions are regrown at random, starting at zero (dynamic sparse
    training, [15]); the sparsity stays constant.

    Args:
        sparsity: fraction of zero weights per layer, in [0, 1).
        regrow_every: steps between prune/regrow updates.
        regrow_fraction: share of active weights moved each update.
        seed: seed of the initial masks and the regrowth.
    """

    def __init__(self, sparsity: float = 0.5, regrow_every: int = 50, regrow_fraction: float = 0.2,
                 seed: int = 0) -> None:
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        self.sparsity, self.regrow_every, self.regrow_fraction = sparsity, regrow_every, regrow_fraction
        self.g = torch.Generator().manual_seed(seed)
        self.masks: dict[str, Tensor] = {}
        self._params: dict[str, nn.Parameter] = {}

    def on_fit_start(self, trainer: Trainer) -> None:
        for name, w in prunable(trainer.distiller.student):
            k = int(round(self.sparsity * w.numel()))
            mask = torch.ones(w.numel(), dtype=torch.bool)
            mask[torch.randperm(w.numel(), generator=self.g)[:k]] = False
            self.masks[name], self._params[name] = mask.view_as(w), w
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for name, w in self._params.items():
            w.mul_(self.masks[name].to(w.dtype))

    def on_batch_end(self, trainer: Trainer, out: dict[str, Tensor]) -> None:
        if trainer.global_step % self.regrow_every == 0:
            self.prune_and_regrow()
        self.apply()

    @torch.no_grad()
    def prune_and_regrow(self) -> None:
        """Move ``regrow_fraction`` of each layer's active weights: drop the smallest, regrow at random."""
        for name, w in self._params.items():
            mask = self.masks[name].flatten()
            active, inactive = mask.nonzero().flatten(), (~mask).nonzero().flatten()
            k = min(int(self.regrow_fraction * len(active)), len(inactive))
            if k == 0:
                continue
            drop = active[w.flatten()[active].abs().argsort()[:k]]
            grow = inactive[torch.randperm(len(inactive), generator=self.g)[:k]]
            mask[drop], mask[grow] = False, True
            grown = torch.zeros_like(mask)
            grown[grow] = True
            # Regrown weights start from zero (SET). Through a mask of w's shape, not w.view(-1): a
            # channels-last weight has no flat view in logical order.
            w.masked_fill_(grown.view_as(w), 0.0)
            self.masks[name] = mask.view_as(w)

    def density(self) -> float:
        """Fraction of non-zero prunable weights (for reports)."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)


def check_sparsity(model: nn.Module, expected: float, tol: float = 0.02) -> None:
    """Raise unless the prunable weights of ``model`` have ``expected`` sparsity (for tests)."""
    ws: Sequence[Tensor] = [w for _, w in prunable(model)]
    zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    if abs(zeros - expected) > tol:
        raise AssertionError(f"sparsity {zeros:.3f}, expected {expected:.3f}")
