"""Atomic checkpoints that load without pickle execution and fail with the mismatched keys.

A checkpoint is a plain dict of tensors and primitive values written with ``torch.save`` to a
temporary file in the same directory, flushed, fsynced, then renamed over the target: a crash
mid-write leaves the previous checkpoint intact. Loading uses ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint file is corrupt, not a kdtune checkpoint, or does not fit the model."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (tmp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if the write failed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``); a clear error if it is unreadable."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, pickled code objects ...
        raise CheckpointError(f"{path} is corrupt or not a torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict")
    return obj


#: Keys under which common training scripts nest a model's weights in a checkpoint dict.
NESTED_STATE_KEYS = ("student", "state_dict", "model_state_dict", "model")


def model_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A model's ``state_dict`` out of a checkpoint dict of any usual layout.

    Understood: a plain state dict; one nested under ``student``, ``state_dict``,
    ``model_state_dict`` or ``model``; a kdtune training checkpoint (the student of its
    ``distiller``). A ``module.`` prefix (a model saved inside DDP / DataParallel) is dropped.
    """
    if ckpt.get("kdtune_checkpoint") == 1:
        state = {k.removeprefix("student."): v for k, v in ckpt["distiller"].items() if k.startswith("student.")}
    else:
        nested = next((ckpt[k] for k in NESTED_STATE_KEYS if isinstance(ckpt.get(k), dict)), None)
        state = nested if nested is not None else ckpt
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str = "model") -> None:
    """``load_state_dict(strict=True)`` with an error that names missing, unexpected and
    shape-mismatched keys (the usual cause: a checkpoint of another architecture or config)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    # Only tensors have a shape; a module's get_extra_state() entry (e.g. an optimiser state) may be any object.
    wrong_shape = sorted(k for k in set(own) & set(state) if isinstance(own[k], torch.Tensor)
                         and isinstance(state[k], torch.Tensor) and own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if wrong_shape:
            parts.append("shape mismatch " + _few(
                [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong_shape]))
        raise CheckpointError(f"{what} checkpoint does not fit: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def rng_state() -> dict[str, Any]:
    """Every RNG stream a training step may draw from (torch CPU/CUDA, Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """Python's RNG state must be nested tuples; a round trip may return lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x
