import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import TinyNet
from kdtune.checkpoint import CheckpointError, load_checkpoint
from kdtune.config import ConfigError, ScheduleConfig, TrainConfig
from kdtune.data import BatchLoader
from kdtune.distiller import Distiller
from kdtune.pathways import Pathway
from kdtune.trainer import Callback, NonFiniteLossError, Trainer, lr_factor


def cfg(**kw):
    return TrainConfig(**{"epochs": 2, "progress": False, "channels_last": False, "log_every": 1, **kw})


def distiller(width=4, pathways=None):
    torch.manual_seed(0)
    return Distiller(TinyNet(width), TinyNet(6), logit_losses=["kd"], input_shape=(1, 8, 8),
                     pathways=pathways if pathways is not None else [Pathway("blocks.1", "blocks.1", method="fitnets")])


def test_fit_writes_run_directory_and_trains_adapters(tmp_path, tiny_data):
    d = distiller()
    adapter_before = [p.clone() for p in d.extra_parameters()]
    tr = Trainer(d, BatchLoader(tiny_data, 10), BatchLoader(tiny_data, 20, shuffle=False), cfg(), run_dir=tmp_path)
    summary = tr.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_kd", "train_task", "w/kd", "test_acc", "agreement_error", "img_per_s"):
        assert key in rows[0], key
    steps = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert (tmp_path / "summary.json").exists() and (tmp_path / "curves.png").stat().st_size > 1000
    assert summary["test_acc"] == rows[-1]["test_acc"] and tr.global_step == 8
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(adapter_before, d.extra_parameters(), strict=True))


def test_evaluate_accuracy_and_agreement_by_hand(tiny_data):
    d = distiller()
    tr = Trainer(d, BatchLoader(tiny_data, 10), BatchLoader(tiny_data, 7, shuffle=False), cfg())
    m = tr.evaluate()
    d.eval()
    x = (tiny_data.images.float() / 255 - tiny_data.mean[0]) / tiny_data.std[0]
    s_pred, t_pred = d.student(x).argmax(1), d.teacher(x).argmax(1)
    assert m["test_acc"] == pytest.approx((s_pred == tiny_data.labels).float().mean().item())
    assert m["agreement_error"] == pytest.approx((s_pred != t_pred).float().mean().item())


def test_runs_with_one_teacher_key_compute_the_teachers_test_predictions_once(tiny_data):
    calls = []
    key = ("teacher-test-key", id(tiny_data))  # unique to this test: the cache lives for the process
    first = distiller()
    first.teacher.register_forward_hook(lambda *a: calls.append("first"))
    m1 = Trainer(first, BatchLoader(tiny_data, 10), BatchLoader(tiny_data, 7, shuffle=False), cfg(),
                 teacher_key=key).evaluate()
    second = distiller()  # same teacher weights (seeded), another run
    second.teacher.register_forward_hook(lambda *a: calls.append("second"))
    m2 = Trainer(second, BatchLoader(tiny_data, 10), BatchLoader(tiny_data, 7, shuffle=False), cfg(),
                 teacher_key=key).evaluate()
    assert "first" in calls and "second" not in calls  # the second run reused the predictions
    assert m2["teacher_test_acc"] == m1["teacher_test_acc"]
    Trainer(second, BatchLoader(tiny_data, 10), BatchLoader(tiny_data, 7, shuffle=False), cfg()).evaluate()
    assert "second" in calls  # no key: computed


def test_teacher_key_needs_a_checkpointed_teacher_and_names_the_test_set():
    from kdtune.config import RunConfig, from_dict
    from kdtune.recipe import teacher_key

    base = {"student": {"name": "resnet8"}, "data": {"test_limit": 100}}
    assert teacher_key(from_dict(RunConfig, base)) is None  # no teacher
    assert teacher_key(from_dict(RunConfig, {**base, "teacher": {"name": "resnet56"}})) is None  # seed-dependent
    zoo = {**base, "teacher": {"name": "resnet56", "checkpoint": "zoo:resnet56_fashion_mnist"}}
    other_test = {**zoo, "data": {"test_limit": 200}}
    assert teacher_key(from_dict(RunConfig, zoo)) is not None
    assert teacher_key(from_dict(RunConfig, zoo)) != teacher_key(from_dict(RunConfig, other_test))


def test_lr_schedules():
    c = TrainConfig(epochs=10)
    assert lr_factor(0, 10, c) == 1.0
    assert lr_factor(50, 10, c) == pytest.approx(0.5)
    assert lr_factor(75, 10, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    c = TrainConfig(epochs=10, schedule=ScheduleConfig(name="multistep", milestones=[3, 6], gamma=0.1))
    assert [lr_factor(e * 10, 10, c) for e in (0, 3, 5, 6)] == pytest.approx([1, 0.1, 0.1, 0.01])
    # Fractions of the run (DistPro §4.1: 10/20/30 of 40 epochs) scale with the length: 8 epochs x 10 steps.
    c = TrainConfig(epochs=8, schedule=ScheduleConfig(name="multistep", milestone_fractions=[0.25, 0.5, 0.75]))
    assert [lr_factor(s, 10, c) for s in (0, 19, 20, 39, 40, 59, 60, 79)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    with pytest.raises(ConfigError, match="milestone_fractions"):
        ScheduleConfig(name="multistep", milestone_fractions=[0.5, 1.5])
    c = TrainConfig(epochs=10, schedule=ScheduleConfig(name="step", step_size=4, gamma=0.5))
    assert lr_factor(85, 10, c) == pytest.approx(0.25)
    c = TrainConfig(epochs=10, schedule=ScheduleConfig(name="cosine", warmup_epochs=1))
    assert lr_factor(4, 10, c) == pytest.approx(0.5) and lr_factor(10, 10, c) == pytest.approx(1.0)


def test_nan_loss_stops_with_terms_and_keeps_last_good_checkpoint(tmp_path, tiny_data):
    calls = {"n": 0}

    def flaky(s, t):
        calls["n"] += 1  # 4 steps per epoch: the 6th call is in epoch 2
        return ((s - t) ** 2).mean() * (float("nan") if calls["n"] >= 6 else 1.0)

    d = distiller(pathways=[Pathway("blocks.1", "blocks.1", transform="conv1x1", distance=flaky, name="flaky")])
    tr = Trainer(d, BatchLoader(tiny_data, 10), None, cfg(epochs=3), run_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2.*'flaky': nan.*the checkpoint of epoch 1 is kept at "
                       + str(tmp_path / "checkpoints" / "last.pt")):
        tr.fit()
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["distiller"].values() if v.is_floating_point())


def test_nan_before_the_first_checkpoint_says_none_was_written(tmp_path, tiny_data):
    def nan_at_once(s, t):
        return ((s - t) ** 2).mean() * float("nan")

    d = distiller(pathways=[Pathway("blocks.1", "blocks.1", transform="conv1x1", distance=nan_at_once)])
    tr = Trainer(d, BatchLoader(tiny_data, 10), None, cfg(epochs=2), run_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet") as err:
        tr.fit()
    assert "kept at" not in str(err.value)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "summary.json").exists()  # a failed run is never reported as finished


def test_tolerated_nan_steps_are_written_as_strict_json_null(tmp_path, tiny_data):
    import json

    def always_nan(s, t):
        return ((s - t) ** 2).mean() * float("nan")

    d = distiller(pathways=[Pathway("blocks.1", "blocks.1", transform="conv1x1", distance=always_nan)])
    tr = Trainer(d, BatchLoader(tiny_data, 10), None, cfg(epochs=1, max_nan_steps=100, log_every=1),
                 run_dir=tmp_path)
    tr.fit()
    strict = {"parse_constant": lambda c: pytest.fail(f"non-standard JSON constant {c}")}
    rows = [json.loads(line, **strict) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_loss"] is None
    for line in (tmp_path / "steps.jsonl").read_text().splitlines():
        assert json.loads(line, **strict)["loss"] is None
    assert json.loads((tmp_path / "summary.json").read_text(), **strict)["final"]["train_loss"] is None


def test_a_finite_blow_up_is_flagged_as_divergence(tmp_path, tiny_data, capsys):
    import json

    c = cfg(epochs=2)
    c.optimizer.lr = 30.0  # the lr=30: the loss reaches ~1e4 in epoch 1, finite, accuracy at chance
    tr = Trainer(distiller(pathways=[]), BatchLoader(tiny_data, 10), BatchLoader(tiny_data, 20), c, run_dir=tmp_path)
    summary = tr.fit()
    assert "first step's" in summary["diverged"] and "at chance" in summary["diverged"]
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"] == summary["diverged"]
    assert "warning: training diverged" in capsys.readouterr().err


def test_a_healthy_run_is_not_flagged(tiny_data):
    assert Trainer(distiller(), BatchLoader(tiny_data, 10), None, cfg(epochs=2)).fit()["diverged"] is None


def test_nan_steps_can_be_tolerated(tiny_data):
    calls = {"n": 0}

    def once_nan(s, t):
        calls["n"] += 1
        return ((s - t) ** 2).mean() * (float("nan") if calls["n"] == 2 else 1.0)

    d = distiller(pathways=[Pathway("blocks.1", "blocks.1", transform="conv1x1", distance=once_nan)])
    tr = Trainer(d, BatchLoader(tiny_data, 10), None, cfg(epochs=1, max_nan_steps=1))
    tr.fit()
    assert tr.nan_steps == 1 and tr.global_step == 3  # the NaN step was skipped


def test_resume_with_another_model_names_mismatched_keys(tmp_path, tiny_data):
    Trainer(distiller(), BatchLoader(tiny_data, 10), None, cfg(epochs=1), run_dir=tmp_path).fit()
    other = Trainer(distiller(width=5), BatchLoader(tiny_data, 10), None, cfg(epochs=2), run_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*student\.blocks"):
        other.fit(resume=True)


def test_resume_from_corrupt_checkpoint_is_reported(tmp_path, tiny_data):
    Trainer(distiller(), BatchLoader(tiny_data, 10), None, cfg(epochs=1), run_dir=tmp_path).fit()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"\x00garbage")
    tr = Trainer(distiller(), BatchLoader(tiny_data, 10), None, cfg(epochs=2), run_dir=tmp_path)
    with pytest.raises(CheckpointError, match="corrupt"):
        tr.fit(resume=True)


def test_callbacks_see_every_stage(tiny_data):
    seen = []

    class Spy(Callback):
        def on_fit_start(self, trainer): seen.append("fit_start")
        def on_epoch_start(self, trainer, epoch): seen.append(f"epoch_start{epoch}")
        def on_batch_start(self, trainer, x, y): seen.append("batch_start")
        def on_batch_end(self, trainer, out): seen.append("batch_end")
        def on_epoch_end(self, trainer, metrics): seen.append(f"epoch_end{metrics['epoch']}")
        def on_fit_end(self, trainer, summary): seen.append("fit_end")

    Trainer(distiller(), BatchLoader(tiny_data, 20), None, cfg(epochs=1), callbacks=[Spy()]).fit()
    assert seen == ["fit_start", "epoch_start0", "batch_start", "batch_end", "batch_start", "batch_end",
                    "epoch_end1", "fit_end"]


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys, torch
    from torch import nn
    from kdtune.config import TrainConfig
    from kdtune.data import Augment, BatchLoader, balanced_subset, load_fashion_mnist
    from kdtune.distiller import Distiller
    from kdtune.pathways import Pathway
    from kdtune.trainer import Callback, Trainer

    def net(w):
        return nn.Sequential(nn.Conv2d(1, w, 3, 2, 1), nn.BatchNorm2d(w), nn.ReLU(), nn.Dropout(0.2),
                             nn.Conv2d(w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10))

    run_dir, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    torch.manual_seed(0)
    train = balanced_subset(load_fashion_mnist("train"), 10, seed=0)
    test = load_fashion_mnist("test").subset(range(200))
    d = Distiller(net(4), net(8), pathways=[Pathway("5", "5", method="fitnets")], logit_losses=["kd"],
                  input_shape=(1, 28, 28))

    class Kill(Callback):
        def on_batch_start(self, trainer, x, y):
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(epochs=3, progress=False, log_every=1)
    tr = Trainer(d, BatchLoader(train, 32, augment=Augment(2, True), seed=0), BatchLoader(test, 100, shuffle=False),
                 cfg, run_dir=run_dir, callbacks=[Kill()], seed=0)
    tr.fit(resume=resume)
''')


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)

    def train(run_dir, kill_at, resume):
        return subprocess.run([sys.executable, str(script), str(run_dir), str(kill_at), str(int(resume))],
                              capture_output=True, text=True, timeout=300)

    straight = train(tmp_path / "a", -1, False)
    assert straight.returncode == 0, straight.stderr
    killed = train(tmp_path / "b", 6, False)  # 4 steps per epoch: killed in the middle of epoch 2
    assert killed.returncode == -9
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = train(tmp_path / "b", -1, True)
    assert resumed.returncode == 0, resumed.stderr

    def metrics(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in rows]

    assert metrics("b") == metrics("a") and len(metrics("a")) == 3
    steps = [(tmp_path / r / "steps.jsonl").read_text() for r in ("a", "b")]
    assert steps[0] == steps[1]
    wa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["distiller"]
    wb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["distiller"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_extra_eval_logits_are_scored(tiny_data):
    class WithExits(Distiller):
        def eval_logits(self, x):
            logits = self.student(x)
            return {"same": logits, "flipped": -logits}

    torch.manual_seed(0)
    d = WithExits(TinyNet(4))
    m = Trainer(d, BatchLoader(tiny_data, 10), BatchLoader(tiny_data, 7, shuffle=False), cfg()).evaluate()
    d.eval()
    x = (tiny_data.images.float() / 255 - tiny_data.mean[0]) / tiny_data.std[0]
    flipped = ((-d.student(x)).argmax(1) == tiny_data.labels).float().mean().item()
    assert m["test_acc/same"] == pytest.approx(m["test_acc"]) and m["test_acc/flipped"] == pytest.approx(flipped)


def test_eval_every_skips_epochs_but_always_evaluates_the_last(tmp_path, tiny_data):
    tr = Trainer(distiller(), BatchLoader(tiny_data, 20), BatchLoader(tiny_data, 20, shuffle=False),
                 cfg(epochs=5, eval_every=2), run_dir=tmp_path)
    summary = tr.fit()
    assert [("test_acc" in r) for r in tr.history] == [False, True, False, True, True]
    assert summary["test_acc"] == tr.history[-1]["test_acc"] and (tmp_path / "curves.png").exists()


def test_without_a_terminal_progress_is_a_line_every_tenth_of_an_epoch(tiny_data, capsys):
    Trainer(distiller(), BatchLoader(tiny_data, 2), None, cfg(epochs=1, progress=True)).fit()  # 20 batches
    lines = [line for line in capsys.readouterr().out.splitlines() if "batch " in line]
    assert [line.split("batch ")[1].split()[0] for line in lines] == [f"{b}/20" for b in range(2, 20, 2)]
    assert lines[0].startswith("epoch 1/1   10%")


# --------------------------------------------------------------------------- any loader


class StopAfterFirstEpoch(Callback):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint


def test_dataloader_with_two_workers_trains_and_resumes_exactly(tmp_path, fmnist_small):
    from kdtune.data import Augment, DatasetLoader, SampleDataset

    train = SampleDataset(fmnist_small[0].subset(range(48)), Augment(2, True))  # crops and flips in the workers

    def trainer(run_dir, callbacks=()):
        torch.manual_seed(0)
        d = Distiller(TinyNet(4), TinyNet(6), logit_losses=["kd"], input_shape=(1, 28, 28))
        return Trainer(d, DatasetLoader(train, 16, seed=3, workers=2), None, cfg(), run_dir=run_dir,
                       callbacks=callbacks, seed=0)

    straight = trainer(tmp_path / "a")
    straight.fit()
    assert straight.global_step == 6
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "b", [StopAfterFirstEpoch()]).fit()
    resumed = trainer(tmp_path / "b")
    resumed.fit(resume=True)
    a, b = straight.distiller.state_dict(), resumed.distiller.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other_seed = trainer(None)
    other_seed.train_loader.seed = 4  # another order and other crops: other weights (the test can fail)
    other_seed.fit()
    assert not torch.equal(other_seed.distiller.state_dict()["student.head.weight"], a["student.head.weight"])


def test_a_users_dataloader_and_a_map_style_dataset_train(fmnist_small):
    from torch.utils.data import DataLoader, TensorDataset

    x = fmnist_small[0].images[:32].float() / 255
    y = fmnist_small[0].labels[:32]
    seen_epochs = []

    class Sampler(torch.utils.data.RandomSampler):
        def set_epoch(self, epoch):
            seen_epochs.append(epoch)

    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=8, sampler=Sampler(ds, generator=torch.Generator().manual_seed(0)))
    tr = Trainer(Distiller(TinyNet(4)), loader, ds, cfg())
    tr.fit()
    assert tr.global_step == 8 and seen_epochs == [0, 1]  # the sampler is told each epoch
    assert len(tr.test_loader) == 1  # the map-style test Dataset is read in batches of 500
    assert 0 <= tr.history[-1]["test_acc"] <= 1


def test_a_users_dataloader_with_a_small_last_batch_gets_a_warning(fmnist_small, capsys):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = fmnist_small[0].images[:36].float() / 255, fmnist_small[0].labels[:36]
    ds = TensorDataset(x[:35], y[:35])
    Trainer(Distiller(TinyNet(4)), DataLoader(ds, batch_size=8), None, cfg())  # 35 = 4 x 8 + 3: 3 < 4
    assert "last batch holds 3 of 8 samples" in capsys.readouterr().err
    for quiet in (DataLoader(ds, batch_size=8, drop_last=True), DataLoader(ds, batch_size=7),  # 35 = 5 x 7
                  DataLoader(TensorDataset(x, y), batch_size=8)):  # 36 = 4 x 8 + 4: half a batch, kept
        Trainer(Distiller(TinyNet(4)), quiet, None, cfg())
        assert "last batch" not in capsys.readouterr().err


def test_data_without_a_length_is_a_clear_error(tiny_data):
    batches = ((torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)) for _ in range(3))
    with pytest.raises(TypeError, match="with len\\(\\).*got generator"):
        Trainer(Distiller(TinyNet(4)), batches, None, cfg())


# --------------------------------------------------------------------------- devices and precision


def test_bf16_autocast_runs_the_forwards_in_bfloat16_and_the_losses_in_float32(tiny_data):
    dtypes = {}

    def record(name):
        def hook(module, args, out):  # returns None: the output is left as it is
            dtypes[name] = (out[0] if isinstance(out, tuple) else out).dtype  # the last call: the step
        return hook

    runs = {}
    for precision in ("fp32", "bf16"):
        d = distiller()
        d.student.blocks[0][0].register_forward_hook(record(f"{precision}/student conv"))
        d.teacher.blocks[0][0].register_forward_hook(record(f"{precision}/teacher conv"))
        d.pathways[0].transform.register_forward_hook(record(f"{precision}/adapter"))
        tr = Trainer(d, BatchLoader(tiny_data, 10, seed=0), BatchLoader(tiny_data, 20, shuffle=False),
                     cfg(epochs=1, precision=precision))
        x, y = next(iter(tr.train_loader))
        out = tr.train_step(*tr.prepare_batch(x, y))
        runs[precision] = {k: float(v.detach()) for k, v in out.items() if v.ndim == 0}
        assert out["loss"].dtype == out["kd"].dtype == out["logits"].dtype == torch.float32
        assert tr.device == torch.device("cpu")  # auto on a machine without a GPU
    assert dtypes["bf16/student conv"] == dtypes["bf16/teacher conv"] == torch.bfloat16
    assert dtypes["fp32/student conv"] == dtypes["fp32/teacher conv"] == torch.float32
    assert dtypes["bf16/adapter"] == torch.float32  # pathway transforms and distances run in fp32
    # Same weights, same batch: bf16 changes the losses only by its rounding (8 bits of mantissa).
    for k in ("task", "kd"):
        assert abs(runs["bf16"][k] - runs["fp32"][k]) < 0.05 * abs(runs["fp32"][k]) + 1e-3, k
    assert runs["bf16"]["task"] != runs["fp32"]["task"]


def test_bf16_fit_evaluates_and_resumes(tmp_path, tiny_data):
    tr = Trainer(distiller(), BatchLoader(tiny_data, 10), BatchLoader(tiny_data, 20, shuffle=False),
                 cfg(precision="bf16"), run_dir=tmp_path)
    summary = tr.fit()
    assert summary["epochs"] == 2 and 0 <= summary["test_acc"] <= 1 and summary["agreement_error"] is not None
    assert all(p.dtype == torch.float32 for p in tr.distiller.parameters())  # fp32 master weights


def test_cuda_without_a_gpu_is_a_clear_error(tiny_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="train.device is cuda but torch sees no GPU"):
        Trainer(distiller(), BatchLoader(tiny_data, 10), None, cfg(device="cuda"))
