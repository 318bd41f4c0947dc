"""The same Trainer under torchrun: 2 CPU processes (gloo) end with identical weights."""

import os
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent('''
    import sys, torch
    from torch import nn
    from kdtune.config import TrainConfig
    from kdtune.data import BatchLoader, from_arrays
    from kdtune.distiller import Distiller
    from kdtune.pathways import Pathway
    from kdtune.trainer import Trainer

    def net(w):
        return nn.Sequential(nn.Conv2d(1, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(),
                             nn.Conv2d(w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10))

    out = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    data = from_arrays(torch.randint(0, 256, (64, 1, 8, 8), generator=g, dtype=torch.uint8),
                       torch.arange(64) % 10, num_classes=10)
    torch.manual_seed(0)
    d = Distiller(net(4), net(6), pathways=[Pathway("4", "4", method="fitnets")], logit_losses=["kd"],
                  input_shape=(1, 8, 8))
    torch.save(d.state_dict(), f"{out}/init.pt")
    tr = Trainer(d, BatchLoader(data, 8, seed=0), BatchLoader(data, 16, shuffle=False),
                 TrainConfig(epochs=2, progress=False, channels_last=False), seed=0)
    tr.fit()
    assert tr.dist.world_size == 2, tr.dist
    torch.save({"state": d.state_dict(), "steps": tr.global_step}, f"{out}/rank{tr.dist.rank}.pt")
''')


def test_two_cpu_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == 8  # 8 batches per epoch split over 2 ranks, 2 epochs
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert not torch.equal(r0["state"]["student.0.weight"], init["student.0.weight"])
