"""Trainer: runs any :class:`~kdtune.distiller.Distiller` — fit, evaluate, checkpoint, resume.

One training step reads top to bottom in :meth:`Trainer.train_step`::

    out = model(x, y, step)            # teacher once (no_grad), student, every term, weighting
    loss.backward(); optimizer.step(); scheduler.step()

Training data is any iterable of ``(x, y)`` batches with a length: kdtune's
:class:`~kdtune.data.BatchLoader` (in memory, the fast path) or :class:`~kdtune.data.DatasetLoader`,
a ``torch.utils.data.DataLoader``, or a map-style ``Dataset`` (wrapped in a DatasetLoader).

Everything a step draws at random depends on (seed, epoch) — batch order and augmentation come
from kdtune's loaders — or on the RNG state saved in the checkpoint, so a run resumed from its
last checkpoint reproduces the uninterrupted run exactly. A user's ``DataLoader`` resumes exactly
too when its order and augmentation come from torch's RNG or a seeded generator (its
``sampler.set_epoch`` is called every epoch); one reading state outside them (a stream, a file that
changes, an unseeded NumPy RNG in the main process) resumes with other batches.

Run directory (when ``run_dir`` is given): ``metrics.jsonl`` (a row per epoch), ``steps.jsonl``
(loss, terms and weights every ``log_every`` steps), ``checkpoints/last.pt``, ``summary.json``,
``curves.png`` and ``weights.png`` (the terms' weights over training, when any were logged).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdtune import jsonutil
from kdtune.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_strict,
    rng_state,
    save_atomic,
    set_rng_state,
)
from kdtune.config import TrainConfig
from kdtune.data import BatchLoader, DatasetLoader, ImageDataset
from kdtune.distiller import Distiller
from kdtune.distributed import DistInfo, barrier, init_distributed, resolve_device
from kdtune.errors import KdtuneError
from kdtune.pathways import full_precision


class NonFiniteLossError(KdtuneError, RuntimeError):
    """The loss became NaN/inf; training stopped, leaving the run's files as they were before that step."""


#: A run has diverged when its epoch-mean training loss is this many times its first step's (in magnitude).
DIVERGENCE_FACTOR = 100.0


class Callback:
    """Hooks into :meth:`Trainer.fit`. Override what you need; all default to no-ops.

    ``on_batch_start`` runs before the real step on the same batch — DistPro updates its
    pathway weights there; ``on_batch_end`` sees the step's output dict.

    A callback with state that a resumed run needs (e.g. DistPro's recorded process) returns it
    from :meth:`state_dict` (tensors and plain values only: checkpoints load with
    ``weights_only=True``); it is saved in the trainer's checkpoint, atomically with the model,
    under the callback's class name, and handed back to :meth:`load_state_dict` on resume.
    """

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...
    def on_batch_start(self, trainer: Trainer, x: Tensor, y: Tensor) -> None: ...
    def on_batch_end(self, trainer: Trainer, out: dict[str, Tensor]) -> None: ...
    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None: ...


def parameter_groups(module: nn.Module, params: Sequence[nn.Parameter]) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: ``params`` in one group with the run's settings, except those a
    submodule of ``module`` gives settings of its own through ``optimizer_groups()`` (a list of
    ``{"params": [...], "lr": ..., ...}``; e.g. Adaptive Distillation's z at the paper's rate).

    The run's group comes first, so ``param_groups[0]`` is always the student's (its lr is what is logged).
    """
    wanted = {id(p) for p in params}
    own: list[dict[str, Any]] = []
    for sub in module.modules():
        declare = getattr(sub, "optimizer_groups", None)
        if callable(declare):
            own += [{**g, "params": [p for p in g["params"] if id(p) in wanted]} for g in declare()]
    own = [g for g in own if g["params"]]
    taken = {id(p) for g in own for p in g["params"]}
    return [{"params": [p for p in params if id(p) not in taken]}, *own]


def build_optimizer(params: Sequence[nn.Parameter] | Sequence[dict[str, Any]],
                    cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW with the run's settings over ``params`` (parameters, or groups with settings of their own)."""
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at a given optimiser step (schedules are stepped per batch).

    cosine: 0.5 (1 + cos(pi t / T)) over all steps; step: gamma^floor(epoch / step_size);
    multistep: gamma^(#milestones passed; ``milestone_fractions`` f count at step f * total steps);
    constant: 1. Optional linear warm-up first.
    """
    s = cfg.schedule
    warm = s.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    epoch = step // steps_per_epoch
    if s.name == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, total) / total))
    if s.name == "step":
        return s.gamma ** (epoch // s.step_size)
    if s.name == "multistep" and s.milestone_fractions:
        return s.gamma ** sum(step >= f * cfg.epochs * steps_per_epoch for f in s.milestone_fractions)
    if s.name == "multistep":
        return s.gamma ** sum(epoch >= m for m in s.milestones)
    return 1.0


#: What the trainer takes as data: any iterable of (x, y) batches with a length, or a dataset.
Batches = Iterable[tuple[Tensor, Tensor]] | ImageDataset | torch.utils.data.Dataset


def as_batches(data: Batches, train: bool, seed: int) -> Iterable[tuple[Tensor, Tensor]]:
    """A loader for ``data``: an :class:`ImageDataset` -> :class:`BatchLoader` and a map-style
    ``Dataset`` -> :class:`DatasetLoader` (batch 128 shuffled for training, 500 in order for
    evaluation; a training tail smaller than half a batch is dropped, :func:`kdtune.data.drops_tail`);
    an iterable of batches is used as it is."""
    size, drop_last = (128, None) if train else (500, False)
    if isinstance(data, ImageDataset):
        return BatchLoader(data, batch_size=size, shuffle=train, seed=seed, drop_last=drop_last)
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return DatasetLoader(data, batch_size=size, shuffle=train, seed=seed, drop_last=drop_last)
    if not hasattr(data, "__iter__") or not hasattr(data, "__len__"):
        raise TypeError(f"training data must be an iterable of (x, y) batches with len() (the lr schedule needs "
                        f"the steps per epoch), e.g. a DataLoader, or a map-style Dataset; got {type(data).__name__}")
    return data


def _shard(loader: Iterable[tuple[Tensor, Tensor]], dist: DistInfo, role: str) -> None:
    """Give each rank its own share of the batches under torchrun."""
    shard = getattr(loader, "shard", None)
    if shard is not None:
        shard(dist.rank, dist.world_size)
    elif dist.enabled and not isinstance(getattr(loader, "sampler", None), torch.utils.data.DistributedSampler):
        raise ValueError(f"under torchrun the {role} DataLoader needs sampler=DistributedSampler(dataset) so each "
                         f"rank reads its own shard (or pass the Dataset itself and kdtune adds one)")


def _first_batch(loader: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One batch of a loader without starting worker processes where the samples can be read directly."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(loader, DatasetLoader) and len(dataset) > 0:
        samples = [dataset[i] for i in range(min(2, len(dataset)))]
        return torch.utils.data.default_collate(samples)
    try:
        return next(iter(loader))
    except StopIteration:
        raise ValueError("the training data yields no batches (empty dataset, or drop_last with fewer samples "
                         "than a batch)") from None


def small_tail(loader: Iterable[tuple[Tensor, Tensor]]) -> tuple[int, int] | None:
    """(tail, batch size) when a ``torch.utils.data.DataLoader`` keeps a last batch of fewer than
    half a batch (``drop_last=False``); None otherwise, or when its sizes are not known.

    kdtune's own loaders drop such a tail by default (:func:`kdtune.data.drops_tail` says why); a
    user's DataLoader is used as it is, so the trainer only says so."""
    if not isinstance(loader, torch.utils.data.DataLoader) or loader.drop_last or loader.batch_size is None:
        return None
    try:
        n = len(loader.sampler)
    except TypeError:  # an iterable-style dataset or a sampler without a length
        return None
    tail = n % loader.batch_size
    return (tail, loader.batch_size) if n >= loader.batch_size and 0 < tail < loader.batch_size / 2 else None


def _warn_small_tail(loader: Iterable[tuple[Tensor, Tensor]]) -> None:
    found = small_tail(loader)
    if found is not None:
        tail, size = found
        print(f"warning: the training DataLoader's last batch holds {tail} of {size} samples; it takes a full step "
              f"on them (noisy BatchNorm statistics, batch-relation losses weigh it more). Pass "
              f"DataLoader(..., drop_last=True) to drop it.", file=sys.stderr, flush=True)


def set_loader_epoch(loader: Iterable[tuple[Tensor, Tensor]], epoch: int) -> None:
    """Tell a loader (or its sampler) which epoch starts: its order and augmentation follow it."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None),
                                                                 "sampler", None)):
        set_epoch = getattr(obj, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
            return


#: Teacher predictions on a test set, shared by the runs of one process that pass the same
#: ``teacher_key`` (a frozen teacher's test predictions do not change between runs).
_TEACHER_TEST_PREDS: dict[Hashable, Tensor] = {}


class Trainer:
    """Trains a distiller's student (and its adapters / learned weights).

    Args:
        distiller: the model to train; ``Distiller(student)`` trains the student alone.
        train: training batches: any iterable of ``(x, y)`` with a length (a :class:`BatchLoader`,
            ``DataLoader`` ...), or a dataset (:class:`ImageDataset` or map-style ``Dataset``:
            batch 128, shuffled).
        test: evaluation batches (same kinds; a dataset is read in batches of 500), evaluated after
            every epoch (top-1 accuracy, and top-1 agreement error with the teacher when there is one).
        config: optimiser, schedule, epochs ... (:class:`~kdtune.config.TrainConfig`).
        run_dir: where metrics, checkpoints and the summary go (``None``: nothing written).
        callbacks: :class:`Callback` objects.
        seed: seeds the training RNG at the start of :meth:`fit`.
        teacher_key: identity of the (frozen) teacher's weights *and* the test set; runs in one
            process given the same key compute the teacher's test predictions once (``kdtune
            quickstart`` trains several rows against one shipped teacher). ``None``: not shared.
    """

    def __init__(self, distiller: Distiller, train: Batches,
                 test: Batches | None = None, config: TrainConfig | None = None,
                 run_dir: str | Path | None = None, callbacks: Sequence[Callback] = (), seed: int = 0,
                 teacher_key: Hashable | None = None) -> None:
        self.cfg = config or TrainConfig()
        self.device = resolve_device(self.cfg.device)
        self.dist: DistInfo = init_distributed(cuda=self.device.type == "cuda")
        self.distiller, self.seed = distiller, seed
        distiller.to(self.device)  # the teacher moves with it (Distiller._apply)
        self.train_loader = as_batches(train, True, seed)
        self.test_loader = as_batches(test, False, seed) if test is not None else None
        _shard(self.train_loader, self.dist, "training")
        if self.dist.is_main:
            _warn_small_tail(self.train_loader)
        for loader in (self.train_loader, self.test_loader):
            if self.device.type == "cuda" and hasattr(loader, "pin_memory"):
                loader.pin_memory = True  # page-locked batches: the copies below overlap with compute
        if self.cfg.channels_last:
            distiller.to(memory_format=torch.channels_last)
        check_input = getattr(distiller, "check_input", None)
        if check_input is not None:  # a student that cannot take the real data fails now, not at step 1
            # (the teacher is checked when the Distiller is built; cached-teacher runs never run it)
            check_input(self.prepare_batch(*_first_batch(self.train_loader))[0][:2], roles=("student",))
        self.model: nn.Module = distiller
        if self.dist.enabled:
            # Pathways that a strategy may skip (DistPro's dropping) leave parameters unused.
            self.model = DistributedDataParallel(distiller, find_unused_parameters=True,
                                                 device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # A module may keep parameters out of this optimiser by listing the rest in
        # trainable_parameters() (MetaDistiller's label generator has its own Adam on a meta-gradient).
        select = getattr(distiller, "trainable_parameters", None)
        params = list(select()) if select is not None else [p for p in distiller.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(parameter_groups(distiller, params), self.cfg)
        steps = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, steps, self.cfg))
        # A weighting that follows the step (DistPro's replayed process, Auto-KD's warm-up / early stop)
        # needs the run's length before the first step.
        set_total_steps = getattr(getattr(distiller, "weighting", None), "set_total_steps", None)
        if set_total_steps is not None:
            set_total_steps(self.cfg.epochs * steps)
        self.callbacks = list(callbacks)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.nan_steps = 0
        self.first_loss: float | None = None  # the first finite step's loss: the scale divergence is judged by
        self.saved_epoch: int | None = None  # epoch of the checkpoint on disk (None: none written yet)
        self.history: list[dict[str, Any]] = []
        self.teacher_key = teacher_key
        self._num_classes: int | None = None  # from the logits' width, for "accuracy at chance"
        self._teacher_test_preds: Tensor | None = (_TEACHER_TEST_PREDS.get(teacher_key)
                                                     if teacher_key is not None else None)

    # ------------------------------------------------------------------ files

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / "checkpoints" / "last.pt" if self.run_dir else None

    def _write(self, name: str, text: str, mode: str = "a") -> None:
        if self.run_dir is not None and self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                with open(self.run_dir / name, mode) as f:
                    f.write(text)
            except OSError as err:  # disk full, quota ...: a torn last line is rewritten on resume
                raise CheckpointError(f"could not write {self.run_dir / name}: {err.strerror or err}; "
                                      f"{self._kept_state()}. Free space and resume") from err

    def state_dict(self) -> dict[str, Any]:
        return {
            "kdtune_checkpoint": 1,
            "distiller": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "first_loss": self.first_loss,
            "rng": rng_state(),
            "history": jsonutil.dumps(self.history),
            "callbacks": self._callback_states(),
        }

    def _callback_states(self) -> dict[str, dict[str, Any]]:
        states: dict[str, dict[str, Any]] = {}
        for cb in self.callbacks:
            state = cb.state_dict()
            if state is None:
                continue
            name = type(cb).__name__
            if name in states:  # the class name is the key that finds the state again on resume
                raise ValueError(f"two {name} callbacks both have state to checkpoint; use one")
            states[name] = state
        return states

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is not None and self.dist.is_main:
            save_atomic(self.state_dict(), self.checkpoint_path)
            self.saved_epoch = self.epoch
        barrier(self.dist)

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Restore everything needed to continue exactly where the checkpoint was written."""
        path = Path(path) if path else self.checkpoint_path
        if path is None:
            raise ValueError("no run_dir and no checkpoint path given")
        ckpt = load_checkpoint(path)
        if ckpt.get("kdtune_checkpoint") != 1:
            raise ValueError(f"{path} is not a kdtune training checkpoint (keys: {sorted(ckpt)[:8]})")
        load_state_strict(self.distiller, ckpt["distiller"], "distiller")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        self.saved_epoch, self.first_loss = self.epoch, ckpt.get("first_loss")  # absent in older checkpoints
        self.history = json.loads(ckpt["history"])
        set_rng_state(ckpt["rng"])
        states = ckpt.get("callbacks", {})  # absent in checkpoints written before callbacks had state
        for cb in self.callbacks:
            if type(cb).__name__ in states:
                cb.load_state_dict(states[type(cb).__name__])
        # Rows logged after this checkpoint belong to work that is about to be redone.
        self._write("metrics.jsonl", "".join(jsonutil.dumps(r) + "\n" for r in self.history), mode="w")
        self._truncate_steps_log()

    def _truncate_steps_log(self) -> None:
        path = self.run_dir / "steps.jsonl" if self.run_dir else None
        if path is None or not path.exists() or not self.dist.is_main:
            return
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= self.global_step]
        self._write("steps.jsonl", "".join(line + "\n" for line in kept), mode="w")

    # ------------------------------------------------------------------ training

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """A loader's batch as the model takes it: on its device, in its memory format."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def autocast(self) -> torch.autocast:
        """The forward's precision context: bfloat16 autocast with ``precision: bf16``, else off."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """One optimiser step on a batch; returns the distiller's output dict."""
        for cb in self.callbacks:
            cb.on_batch_start(self, x, y)
        with self.autocast():
            out = self.model(x, y, self.global_step)
        loss = out["loss"]
        if not torch.isfinite(loss):
            self._non_finite(out)
            return out
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        return out

    def _non_finite(self, out: dict[str, Tensor]) -> None:
        self.nan_steps += 1
        if self.nan_steps > self.cfg.max_nan_steps:
            terms = {k: float(v.detach()) for k, v in out.items() if v.ndim == 0}
            raise NonFiniteLossError(
                f"loss is {float(out['loss'].detach())} at epoch {self.epoch + 1}, step {self.global_step} "
                f"(terms: {terms}); {self._kept_state()}. Lower the learning rate or a term's weight.")

    def _kept_state(self) -> str:
        """What is on disk after a failed step, stated as it is (the bad step was never applied)."""
        if self.run_dir is None:
            return "nothing was written (no run_dir)"
        if self.saved_epoch is not None and self.checkpoint_path is not None and self.checkpoint_path.exists():
            return (f"the checkpoint of epoch {self.saved_epoch} is kept at {self.checkpoint_path} "
                    f"(metrics.jsonl has {len(self.history)} epoch(s))")
        return f"no checkpoint was written yet (metrics.jsonl has {len(self.history)} epoch(s))"

    def train_epoch(self) -> dict[str, Any]:
        """One pass over the training loader; returns mean loss / terms / weights and speed."""
        self.distiller.train()
        set_loader_epoch(self.train_loader, self.epoch)
        sums: dict[str, Tensor] = {}
        correct, seen, t0 = torch.zeros((), dtype=torch.long, device=self.device), 0, time.perf_counter()
        with self._progress(len(self.train_loader)) as advance:
            for batch in self.train_loader:
                x, y = self.prepare_batch(*batch)
                out = self.train_step(x, y)
                if self.first_loss is None and torch.isfinite(out["loss"]):
                    self.first_loss = float(out["loss"].detach())
                for k, v in out.items():
                    if v.ndim == 0:
                        sums[k] = sums.get(k, 0.0) + v.detach()
                correct += (out["logits"].detach().argmax(1) == y).sum()
                self._num_classes = out["logits"].shape[1]
                seen += len(y)
                self._log_step(out)
                for cb in self.callbacks:
                    cb.on_batch_end(self, out)
                advance(len(y), float(out["loss"].detach()), float(correct) / seen)
        n = max(1, len(self.train_loader))
        seconds = time.perf_counter() - t0
        row = {f"train_{k}": float(v) / n for k, v in sums.items() if not k.startswith("w/")}
        row.update({k: float(v) / n for k, v in sums.items() if k.startswith("w/")})
        row.update(train_acc=float(correct) / max(1, seen), seconds=seconds, img_per_s=seen / seconds)
        if self.device.type == "cuda":  # peak memory of the epoch's steps
            row["gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        return row

    def _log_step(self, out: dict[str, Tensor]) -> None:
        every = self.cfg.log_every
        if self.run_dir is None or not every or self.global_step % every:
            return
        row = {"step": self.global_step, "epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        row.update({k: float(v.detach()) for k, v in out.items() if v.ndim == 0})
        self._write("steps.jsonl", jsonutil.dumps(row) + "\n")

    def _progress(self, total: int):
        """A context giving ``advance(n_images, loss, acc)``: a rich bar on a terminal, else a line
        every ~10 % of the epoch (a log file still shows that a long epoch is moving)."""
        from contextlib import contextmanager

        @contextmanager
        def bar():
            if not (self.cfg.progress and self.dist.is_main):
                yield lambda *a: None
                return
            if not sys.stdout.isatty():
                yield self._progress_lines(total)
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            t0 = time.perf_counter()
            seen = [0]
            with Progress(TextColumn(f"epoch {self.epoch + 1}/{self.cfg.epochs}"), BarColumn(),
                          MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                          transient=True) as progress:
                task = progress.add_task("train", total=total, stats="")

                def advance(n: int, loss: float, acc: float) -> None:
                    seen[0] += n
                    speed = seen[0] / (time.perf_counter() - t0)
                    progress.update(task, advance=1, stats=f"loss {loss:.3f} acc {acc:.3f} {speed:.0f} img/s")

                yield advance

        return bar()

    def _progress_lines(self, total: int):
        """``advance`` printing one plain line each time another tenth of the epoch's batches is done."""
        t0, state = time.perf_counter(), {"batches": 0, "images": 0, "tenth": 0}

        def advance(n: int, loss: float, acc: float) -> None:
            state["batches"] += 1
            state["images"] += n
            tenth = 10 * state["batches"] // max(1, total)
            if tenth > state["tenth"] and state["batches"] < total:  # the epoch's own line reports 100 %
                state["tenth"] = tenth
                speed = state["images"] / max(1e-9, time.perf_counter() - t0)
                print(f"epoch {self.epoch + 1}/{self.cfg.epochs}  {100 * state['batches'] // total:3d}%  "
                      f"batch {state['batches']}/{total}  loss {loss:.4f}  acc {acc:.4f}  {speed:.0f} img/s",
                      flush=True)

        return advance

    def _sync_buffers(self) -> None:
        """Average BN running statistics over ranks (each rank saw different batches), so that
        every rank evaluates and checkpoints the same model."""
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        for buf in self.distiller.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(self.dist.world_size)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, loader: Iterable[tuple[Tensor, Tensor]] | None = None) -> dict[str, float]:
        """Top-1 accuracy, CE loss and (with a teacher) top-1 agreement error on ``loader``.

        Agreement error (Adaptive Distillation, eq. 7) is the fraction of samples where the
        student's top-1 class differs from the teacher's. The teacher is frozen, so its
        predictions on the test set are computed once and cached.
        """
        loader = loader or self.test_loader
        if loader is None:
            return {}
        student = self.distiller.student
        was_training = student.training
        student.eval()
        # A distiller may report more predictions per batch (e.g. self-distillation exits and
        # their ensemble): ``eval_logits(x) -> {name: logits}`` gives ``test_acc/<name>``.
        extra_fn = getattr(self.distiller, "eval_logits", None)
        preds, labels, loss_sum = [], [], 0.0
        extra_correct: dict[str, int] = {}
        for batch in loader:
            x, y = self.prepare_batch(*batch)
            with self.autocast():
                logits = full_precision(self._logits("student", student(x)))
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(1))
            labels.append(y)
            with self.autocast():
                extras = extra_fn(x) if extra_fn else {}
            for name, extra in extras.items():
                extra_correct[name] = extra_correct.get(name, 0) + int((extra.argmax(1) == y).sum())
        student.train(was_training)
        pred, label = torch.cat(preds), torch.cat(labels)
        metrics = {"test_acc": float((pred == label).float().mean()), "test_loss": loss_sum / len(label)}
        metrics.update({f"test_acc/{k}": v / len(label) for k, v in extra_correct.items()})
        teacher = self.distiller.teacher
        if teacher is not None:
            cached = self._teacher_test_preds
            if cached is None or loader is not self.test_loader or len(cached) != len(label):
                # The Distiller's prepared teacher (kdtune.teacher fast path) where there is one.
                forward = getattr(self.distiller, "teacher_forward", None)
                with self.autocast():
                    inputs = (self.prepare_batch(*batch)[0] for batch in loader)
                    t_pred = torch.cat([(forward(x).logits if forward else self._logits("teacher", teacher(x)))
                                        .argmax(1) for x in inputs])
                if loader is self.test_loader:
                    self._teacher_test_preds = t_pred
                    if self.teacher_key is not None:
                        _TEACHER_TEST_PREDS[self.teacher_key] = t_pred
            else:
                t_pred = self._teacher_test_preds.to(pred.device)  # may come from a run on another device
            metrics["agreement_error"] = float((pred != t_pred).float().mean())
            metrics["teacher_test_acc"] = float((t_pred == label).float().mean())
        return metrics

    def _logits(self, role: str, output: Any) -> Tensor:
        logits_of = getattr(self.distiller, "logits_of", None)
        return logits_of(role, output) if logits_of is not None else output

    # ------------------------------------------------------------------ fit

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train for ``config.epochs`` epochs (continuing from the last checkpoint if ``resume``)."""
        if resume:
            self.load_checkpoint()
        else:
            torch.manual_seed(self.seed)
            self._write("metrics.jsonl", "", mode="w")
            self._write("steps.jsonl", "", mode="w")
        if self.cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        if self.cfg.progress and self.dist.is_main:  # each term's weight and where it comes from
            for line in getattr(self.distiller, "weight_lines", list)():
                print(line, flush=True)
        start = time.perf_counter()
        while self.epoch < self.cfg.epochs:
            for cb in self.callbacks:
                cb.on_epoch_start(self, self.epoch)
            row: dict[str, Any] = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
            row.update(self.train_epoch())
            self._sync_buffers()
            if (self.epoch + 1) % self.cfg.eval_every == 0 or self.epoch + 1 == self.cfg.epochs:
                row.update(self.evaluate())
            self.epoch += 1
            self._flag_divergence(row)
            self.history.append(row)
            self._report_epoch(row)
            for cb in self.callbacks:
                cb.on_epoch_end(self, row)
            if self.epoch % self.cfg.checkpoint_every == 0 or self.epoch == self.cfg.epochs:
                self.save_checkpoint()
            # The row after the checkpoint that holds it: a crash in between loses nothing, since a
            # resume rewrites metrics.jsonl from the checkpoint's history.
            self._write("metrics.jsonl", jsonutil.dumps(row) + "\n")
        summary = self.summary(time.perf_counter() - start)
        self._write("summary.json", jsonutil.dumps(summary, indent=2) + "\n", mode="w")
        if self.run_dir is not None and self.dist.is_main:
            from kdtune.report import plot_curves, plot_weights

            plot_curves(self.history, self.run_dir / "curves.png")
            plot_weights(self.run_dir)  # weights.png: path weights over training (no-op if none logged)
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        return summary

    def _report_epoch(self, row: dict[str, Any]) -> None:
        if not (self.cfg.progress and self.dist.is_main):
            return
        agree = f"  agree_err {row['agreement_error']:.4f}" if "agreement_error" in row else ""
        test = f"  test_acc {row['test_acc']:.4f}" if "test_acc" in row else ""
        print(f"epoch {row['epoch']:>3}/{self.cfg.epochs}  loss {row['train_loss']:.4f}  "
              f"train_acc {row['train_acc']:.4f}{test}{agree}  {row['img_per_s']:.0f} img/s", flush=True)

    def _flag_divergence(self, row: dict[str, Any]) -> None:
        """Mark an epoch whose mean training loss grew by orders of magnitude (a finite blow-up that
        the NaN check misses, e.g. lr=30): ``row["diverged"]`` says how, with the accuracy against
        chance, and a warning goes to stderr (once per run)."""
        loss, first = row.get("train_loss"), self.first_loss
        if loss is None or first is None or not math.isfinite(loss):
            return
        scale = max(abs(first), 1e-3)  # a loss that starts near 0 (a negative-log weighting) needs a floor
        if abs(loss) < DIVERGENCE_FACTOR * scale:
            return
        chance = 1.0 / self._num_classes if self._num_classes else None
        acc = row.get("test_acc", row.get("train_acc"))
        at_chance = chance is not None and acc is not None and acc <= 1.5 * chance
        row["diverged"] = (f"mean training loss {loss:.3g} at epoch {row['epoch']} is {abs(loss) / scale:.3g}x the "
                           f"first step's {first:.3g}" + (f"; accuracy {acc:.3f} is at chance ({chance:.3f})"
                                                          if at_chance else ""))
        if not any("diverged" in r for r in self.history) and self.dist.is_main:
            print(f"warning: training diverged: {row['diverged']}. Lower the learning rate "
                  f"(train.optimizer.lr={self.cfg.optimizer.lr:g}) or a term's weight.",
                  file=sys.stderr, flush=True)

    def summary(self, fit_seconds: float) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        diverged = next((r["diverged"] for r in self.history if "diverged" in r), None)
        return {
            "diverged": diverged,
            "epochs": self.epoch,
            "final": last,
            "test_acc": last.get("test_acc"),
            "agreement_error": last.get("agreement_error"),
            "teacher_test_acc": last.get("teacher_test_acc"),
            "best_test_acc": max((r.get("test_acc", 0.0) for r in self.history), default=None),
            "train_seconds": sum(r["seconds"] for r in self.history),
            "fit_seconds_this_session": fit_seconds,
            "student_parameters": sum(p.numel() for p in self.distiller.student.parameters()),
            "extra_parameters": sum(p.numel() for p in self.distiller.extra_parameters()),
            "world_size": self.dist.world_size,
            **self._calibration_summary(),
        }

    def _calibration_summary(self) -> dict[str, Any]:
        """``calibration``: measured gradient norms and calibrated weights (``distill.calibrate``)."""
        record = getattr(self.distiller, "calibration", None)
        return {"calibration": record.to_dict()} if record is not None else {}


def _step_of(line: str) -> float:
    """The ``step`` of a ``steps.jsonl`` line; a torn line (a kill mid-append) sorts after every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
