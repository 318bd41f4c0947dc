"""The same Trainer under torchrun: 2 CPU processes (gloo) end with identical weights."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from kdtune.weighting.process import Process

#: What both rank scripts share: imports, a two-stage CNN of width w, the output directory argv[1].
PRELUDE = textwrap.dedent('''
    import json, sys, torch
    from torch import nn
    from kdtune.config import TrainConfig
    from kdtune.data import BatchLoader, from_arrays, train_val_split
    from kdtune.distiller import Distiller
    from kdtune.trainer import Trainer

    def net(w):
        return nn.Sequential(nn.Conv2d(1, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(),
                             nn.Conv2d(w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10))

    out = sys.argv[1]
''')


def torchrun(script: str, tmp_path) -> None:
    """Run ``PRELUDE + script`` as 2 single-threaded CPU processes (gloo) writing to ``tmp_path``."""
    path = tmp_path / "rank_script.py"
    path.write_text(PRELUDE + textwrap.dedent(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(path), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


SCRIPT = textwrap.dedent('''
    from kdtune.pathways import Pathway

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
    torchrun(SCRIPT, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == 8  # 8 batches per epoch split over 2 ranks, 2 epochs
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert not torch.equal(r0["state"]["student.0.weight"], init["student.0.weight"])


DISTPRO_SCRIPT = textwrap.dedent('''
    from kdtune.search import distpro
    from kdtune.weighting.process import DistProWeighting, Process

    seen = {"local": [], "applied": [], "val": [], "saved": []}  # what this rank computed / wrote

    def spy(cls, name, record):
        original = getattr(cls, name)
        def wrapper(self, *args, **kwargs):
            record(*args)
            return original(self, *args, **kwargs)
        setattr(cls, name, wrapper)

    hypergradient = distpro.DistProSearch.hypergradient
    def local(self, x, y, xv, yv, *args):
        seen["val"].append(float(xv.sum()))
        h = hypergradient(self, x, y, xv, yv, *args)
        seen["local"].append(h.tolist())
        return h
    distpro.DistProSearch.hypergradient = local
    spy(DistProWeighting, "update_alpha", lambda h: seen["applied"].append(h.tolist()))
    spy(Process, "save", lambda path: seen["saved"].append(str(path)))

    g = torch.Generator().manual_seed(0)
    data = from_arrays(torch.randint(0, 256, (80, 1, 8, 8), generator=g, dtype=torch.uint8),
                       torch.arange(80) % 10, num_classes=10)
    train, val = train_val_split(data, 0.2, seed=0)  # 64 / 16 images
    torch.manual_seed(0)
    teacher, student = net(6), net(4)
    pathways, infos = distpro.search_space(teacher, student, (1, 8, 8), connections="all", transforms=["conv1x1"])
    d = Distiller(student, teacher, pathways, weighting="distpro",
                  weighting_kwargs={"learned": [p.name for p in pathways], "alpha_lr": 0.1}, input_shape=(1, 8, 8))
    # the raw hypergradient (undo_lr_decay off): what a rank applies is then exactly the ranks' mean
    search = distpro.DistProCallback(BatchLoader(val, 4, seed=1), infos, undo_lr_decay=False)
    tr = Trainer(d, BatchLoader(train, 8, seed=0), None, TrainConfig(epochs=1, progress=False, channels_last=False),
                 run_dir=out, callbacks=[search], seed=0)
    tr.fit()
    assert tr.dist.world_size == 2, tr.dist
    torch.save({"state": d.state_dict(), "steps": tr.global_step, "process": search.alpha_tilde},
               f"{out}/rank{tr.dist.rank}.pt")
    with open(f"{out}/seen{tr.dist.rank}.json", "w") as f:
        json.dump(seen, f)
''')


def test_distpro_search_on_two_cpu_processes_keeps_alpha_identical(tmp_path):
    """Each rank's hypergradient is taken on its own shard (training and held-out batches); the
    ranks apply their mean, so α̃, the recorded process and the student stay identical; rank 0
    alone writes process.json."""
    torchrun(DISTPRO_SCRIPT, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    s0, s1 = (json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 4  # 8 batches of 8 split over 2 ranks, 1 epoch
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # α̃, moments, student
    assert r0["process"] == r1["process"] and len(r0["process"]) == 4
    assert s0["val"] != s1["val"]  # held-out batches are sharded, not repeated on every rank
    local0, local1 = torch.tensor(s0["local"]), torch.tensor(s1["local"])
    assert not torch.allclose(local0, local1)  # local hypergradients differ: α̃ would drift apart
    assert s0["applied"] == s1["applied"]
    assert torch.allclose(torch.tensor(s0["applied"]), (local0 + local1) / 2, atol=1e-7)
    assert s0["saved"] and not s1["saved"]
    assert torch.allclose(Process.load(tmp_path / "process.json").alpha_tilde[-1],
                          torch.tensor(r0["process"][-1]), atol=1e-6)
    alpha = r0["state"]["weighting.alpha_tilde"]
    assert len(alpha) == 4 and not torch.equal(alpha, torch.ones(4))  # 2 x 2 stage pairs; α̃ moved from 1


SAMPLER_SCRIPT = textwrap.dedent('''
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    from kdtune.trainer import Callback

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 8, 8, generator=g), torch.arange(60) % 10
    ds = TensorDataset(x, y)
    seen = []

    class Record(Callback):
        def on_batch_start(self, trainer, xb, yb):
            seen.append(xb[:, 0, 0, 0])

    torch.manual_seed(0)
    d = Distiller(net(4), net(6), logit_losses=["kd"])
    tr = Trainer(d, ds, None, TrainConfig(epochs=2, progress=False, channels_last=False), callbacks=[Record()], seed=0)
    tr.fit()
    plain = DataLoader(ds, batch_size=8)
    try:
        Trainer(d, plain, None, TrainConfig(epochs=1, progress=False))
        error = ""
    except ValueError as err:
        error = str(err)
    user = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, shuffle=True, seed=0))
    Trainer(d, user, None, TrainConfig(epochs=1, progress=False))  # accepted: it has its shard
    torch.save({"state": d.state_dict(), "steps": tr.global_step, "seen": torch.cat(seen), "error": error},
               f"{out}/rank{tr.dist.rank}.pt")
''')


def test_a_dataset_is_sharded_by_a_distributed_sampler_under_torchrun(tmp_path):
    torchrun(SAMPLER_SCRIPT, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # 60 samples / 2 ranks = 30 each, batches of 128 (the default for a dataset): 1 step per epoch.
    assert r0["steps"] == r1["steps"] == 2
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    x = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(0))[:, 0, 0, 0]
    for epoch in range(2):  # each epoch, the two shards are disjoint and cover the dataset
        both = torch.cat([r0["seen"][30 * epoch:30 * (epoch + 1)], r1["seen"][30 * epoch:30 * (epoch + 1)]])
        assert sorted(both.tolist()) == sorted(x.tolist())
    assert not torch.equal(r0["seen"][:30], r0["seen"][30:])  # set_epoch: another order in epoch 2
    assert "needs sampler=DistributedSampler" in r0["error"]
