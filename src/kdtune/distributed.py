"""Multi-process training under ``torchrun``: gloo on CPU, nccl on GPU.

``torchrun --nproc_per_node 2 -m kdtune.cli run cfg.yaml`` sets RANK/WORLD_SIZE/MASTER_ADDR;
:func:`init_distributed` joins the group when they are present and is a no-op otherwise, so
the same trainer runs single- or multi-process unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(cuda: bool | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (if any): nccl when training on
    GPUs (``cuda``; None: whenever torch sees one), else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if (torch.cuda.is_available() if cuda is None else cuda) else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo(dist.get_rank(), dist.get_world_size())


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> this process's device (under torchrun: GPU ``LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise ValueError("train.device is cuda but torch sees no GPU (torch.cuda.is_available() is False); "
                         "use device: auto or cpu, or install a CUDA build of torch")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
