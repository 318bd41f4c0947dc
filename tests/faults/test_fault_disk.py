"""A disk that fills up while a run checkpoints: the previous checkpoint stays intact and loads,
and the error names the file, the cause and what to do. Needs root to mount a small tmpfs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import TinyNet
from kdtune.checkpoint import CheckpointError, load_checkpoint
from kdtune.config import TrainConfig
from kdtune.data import BatchLoader, from_arrays
from kdtune.distiller import Distiller
from kdtune.trainer import Callback, Trainer


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


class FillDiskAfterFirstCheckpoint(Callback):
    """At the start of epoch 2, leave free only half the size of the checkpoint just written:
    the metrics rows still fit, the next checkpoint does not."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if epoch != 1:
            return
        ckpt = trainer.checkpoint_path
        st = os.statvfs(ckpt.parent)
        free = st.f_bavail * st.f_frsize
        with open(ckpt.parent.parent / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - ckpt.stat().st_size // 2))


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(small_disk):
    g = torch.Generator().manual_seed(0)
    data = from_arrays(torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(40) % 10)
    torch.manual_seed(0)
    distiller = Distiller(TinyNet(16))  # a checkpoint of tens of KB: larger than the metrics rows
    run_dir = small_disk / "run"
    trainer = Trainer(distiller, BatchLoader(data, 10), None, TrainConfig(epochs=3, progress=False),
                      run_dir=run_dir, callbacks=[FillDiskAfterFirstCheckpoint()])
    with pytest.raises(CheckpointError) as err:
        trainer.fit()
    message = str(err.value)
    assert "No space left on device" in message and str(run_dir / "checkpoints" / "last.pt") in message
    assert "the previous last.pt is intact" in message and "free space" in message
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # the partial file is removed
