"""Auto-KD proxies, train-free weights, reward, and a tiny end-to-end search + spec run."""

import json

import pytest
import torch
import yaml

from helpers import TinyNet, kdtune_run, tiny_autokd
from kdtune.data import Augment, BatchLoader, DatasetLoader, SampleDataset, from_arrays
from kdtune.distances import cka
from kdtune.distiller import Distiller, LogitLoss
from kdtune.pathways import Pathway
from kdtune.search.autokd import feature_entropy, reward_from, train_free_weights
from kdtune.search.proxies import CachedTeacher, SparseStudent, TeacherCache, check_sparsity, proxy_epochs, proxy_subset
from kdtune.search.space import DistillerSpec
from kdtune.trainer import Callback, Trainer


def make_distiller():
    torch.manual_seed(0)
    p = DistillerSpec(intra="multi_scale", feature_distance="kl").pathways(["blocks.1"], ["blocks.1"])[0]
    return Distiller(TinyNet(4), TinyNet(8), [Pathway(teacher=p.teacher, student=p.student, transform="autokd",
                                                      distance="kl", weight=1.0, name="f",
                                                      transform_kwargs=p.transform_kwargs)],
                     [LogitLoss("kd", 1.0, {"tau": 4.0})], input_shape=(1, 8, 8))


def data():
    g = torch.Generator().manual_seed(0)
    return from_arrays(torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(40) % 10,
                       num_classes=10)


class Record(Callback):
    def __init__(self):
        self.terms = []

    def on_batch_end(self, trainer, out):
        self.terms.append((float(out["kd"].detach()), float(out["f"].detach())))


def batch_loader():
    return BatchLoader(data(), 8, shuffle=True, augment=Augment(2, True), seed=5)


def worker_loader():  # a DataLoader with 2 workers cropping and flipping
    return DatasetLoader(SampleDataset(data(), Augment(2, True)), 8, shuffle=True, seed=5, workers=2)


def train(cache, tmp_path, make_loader=batch_loader):
    d = make_distiller()
    loader = make_loader()
    callbacks = [Record()]
    if cache:
        tc = TeacherCache(tmp_path / "cache", make_loader(), 2)
        assert tc.build(d) > 0 and tc.build(d) == 0.0  # built once, then reused
        callbacks.append(CachedTeacher(tc))
    calls = []
    teacher_forward = d.teacher_forward  # every teacher run of a step goes through it (fast path or not)
    d.teacher_forward = lambda x: calls.append(1) or teacher_forward(x)
    from kdtune.config import TrainConfig
    Trainer(d, loader, None, TrainConfig(epochs=2, progress=False, channels_last=False), callbacks=callbacks,
            seed=0).fit()
    return callbacks[0].terms, len(calls)


@pytest.mark.parametrize("make_loader", [batch_loader, worker_loader])
def test_cached_teacher_gives_the_live_teachers_losses_on_the_same_augmented_batches(tmp_path, make_loader):
    live, live_calls = train(False, tmp_path, make_loader)
    cached, cached_calls = train(True, tmp_path, make_loader)
    assert live_calls == 10 and cached_calls == 0  # 2 epochs x 5 batches; the cached run never runs it
    assert len(live) == len(cached) == 10
    for a, b in zip(live, cached, strict=True):
        assert abs(a[0] - b[0]) < 1e-6 and abs(a[1] - b[1]) < 1e-6


def test_cache_needs_a_seeded_kdtune_loader(tmp_path):
    from torch.utils.data import DataLoader

    with pytest.raises(ValueError, match="order must be seeded.*not a DataLoader"):
        TeacherCache(tmp_path / "c", DataLoader(SampleDataset(data()), 8, shuffle=True), 1)


def test_cache_for_other_data_fails_loudly(tmp_path):
    d = make_distiller()
    tc = TeacherCache(tmp_path / "c", BatchLoader(data(), 8, seed=5), 1)
    tc.build(d)
    cb = CachedTeacher(tc)

    class T:
        epoch, distiller = 0, d

    try:
        cb.on_batch_start(T, torch.zeros(8, 1, 8, 8), torch.full((8,), 3))
    except RuntimeError as err:
        assert "other labels" in str(err)
    else:
        raise AssertionError("expected a label mismatch error")


@pytest.mark.parametrize("channels_last", [False, True])  # channels-last weights have no flat view
def test_sparse_student_keeps_its_sparsity_through_prune_and_regrow(channels_last):
    d = make_distiller()
    sparse = SparseStudent(0.5, regrow_every=2, regrow_fraction=0.3, seed=0)
    from kdtune.config import TrainConfig
    first: dict[str, torch.Tensor] = {}

    class KeepFirstMasks(Callback):
        def on_fit_start(self, trainer):
            first.update({k: m.clone() for k, m in sparse.masks.items()})

    tr = Trainer(d, BatchLoader(data(), 8, seed=0), None,
                 TrainConfig(epochs=1, progress=False, channels_last=channels_last),
                 callbacks=[sparse, KeepFirstMasks()])
    tr.fit()
    check_sparsity(d.student, 0.5)
    assert abs(sparse.density() - 0.5) < 0.02
    assert any(not torch.equal(first[k], m) for k, m in sparse.masks.items())  # masks moved (5 steps, every 2)
    for name, w in sparse._params.items():  # zero exactly where the mask is off
        assert not w[~sparse.masks[name]].any()


def test_subset_and_early_stop():
    ds = data()
    sub = proxy_subset(ds, 0.2)
    assert len(sub) == 10 and torch.bincount(sub.labels, minlength=10).tolist() == [1] * 10  # >= 1 per class
    assert proxy_epochs(30, 0.2) == 6 and proxy_epochs(2, 0.2) == 1


def test_train_free_weights_are_entropy_times_cka():
    torch.manual_seed(0)
    s, t = TinyNet(4).eval(), TinyNet(8).eval()
    x = torch.randn(16, 1, 8, 8)
    mu = train_free_weights(s, t, x, ["blocks.0", "blocks.1"], ["blocks.0", "blocks.1"])
    fs, ft = s.blocks[0](x), t.blocks[0](x)
    p = torch.softmax(ft.flatten(1), 1)
    h = -(p * p.log()).sum(1).mean()
    assert abs(mu[0] - float((h * (1 - cka(fs, ft))).detach())) < 1e-5
    assert abs(float(feature_entropy(torch.zeros(3, 4))) - float(torch.log(torch.tensor(4.0)))) < 1e-6
    assert len(mu) == 2 and all(m > 0 for m in mu)


def test_rewards():
    m = {"ce": 0.5, "cka": 0.8, "acc": 0.9, "l1": 0.3}
    assert abs(reward_from(m, "ce_cka") - (1 - (0.5 + 0.2))) < 1e-12
    assert reward_from(m, "acc") == 0.9 and reward_from(m, "ce") == 0.5
    assert abs(reward_from(m, "ce_l1") - 0.2) < 1e-12


TINY = tiny_autokd("ak", trials=3, final=False, layer_weights="train_free",
                   teacher_layers=["stage:-1", "stage:1"], student_layers=["stage:-1", "stage:1"])


def test_kdtune_run_autokd_search_then_spec_run_then_resume(tmp_path, capsys):
    from kdtune.cli import main

    exported = tmp_path / "specs" / "best_fmnist.yaml"
    run_dir = kdtune_run(TINY, tmp_path / "runs", f"autokd.export={exported}")
    assert exported.read_text() == (run_dir / "best.yaml").read_text()  # the stable copy of the best spec
    assert (run_dir / "study.db").exists()  # storage: null -> SQLite in the run directory
    info = json.loads((run_dir / "autokd.json").read_text())
    assert info["complete_trials"] == 3 and len(info["mu"]) == 2
    assert (run_dir / "best.yaml").exists() and (run_dir / "tree.png").exists() and (run_dir / "rewards.png").exists()
    assert (run_dir / "teacher_cache" / "epoch_0.pt").exists()
    for t in info["trials"]:
        summary = json.loads((tmp_path / t["run_dir"] / "summary.json").read_text())
        assert summary["eval_split"] == "val" and summary["reward"] == t["reward"]
    # `kdtune report` on the search (no final run): a "search only" row, the tree and the best spec.
    assert main(["report", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "(search only) | — | — |" in printed and f"tree: {run_dir / 'tree.png'}" in printed
    assert "Auto-KD best spec" in printed and not (run_dir / "comparison.png").exists()
    # Resume: the study already holds 3 trials, so nothing is trained again.
    assert main(["run", "--resume", str(run_dir), "autokd.trials=3"]) == 0
    assert json.loads((run_dir / "autokd.json").read_text())["complete_trials"] == 3
    # The best leaf trains directly: spec=<best.yaml>.
    final = {**TINY, "data": {**TINY["data"], "val_fraction": 0.0},
             "autokd": {"teacher_layers": ["stage:-1"], "student_layers": ["stage:-1"]}}
    frun = kdtune_run(final, tmp_path / "final", f"spec={run_dir / 'best.yaml'}")
    saved = yaml.safe_load((frun / "config.yaml").read_text())
    assert saved["autokd"] is None and saved["distill"]["pathways"][0]["transform"] == "autokd"
