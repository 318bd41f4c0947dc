"""The kdtune command line on real Fashion-MNIST (tiny subsets, 1-2 epochs)."""

import json

import pytest
import torch
import yaml

from kdtune.checkpoint import load_checkpoint, load_state_strict
from kdtune.cli import main
from kdtune.config import RunConfig, from_dict
from kdtune.models import create_model
from kdtune.recipe import run
from kdtune.trainer import Callback

CONFIG = {
    "seed": 0,
    "data": {"dataset": "fashion_mnist", "train_per_class": 5, "eval_batch_size": 1000, "test_limit": 500},
    "student": {"name": "resnet8"},
    "teacher": {"name": "resnet8"},  # an untrained teacher is enough to exercise the plumbing
    "distill": {"logit_losses": [{"name": "kd"}],
                "pathways": [{"teacher": "layer2", "student": "layer2", "method": "fitnets"}]},
    "train": {"epochs": 1, "progress": False},
}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "runs")}))
    return path


def only_run(tmp_path):
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


@pytest.mark.parametrize("kind,expected", [
    ("losses", ["kd", "fitnets", "at", "rkd", "dkd", "hcl"]),
    ("models", ["resnet8", "wrn_40_2", "mobilenetv2", "shufflenetv2", "vgg13"]),
    ("transforms", ["conv1x1", "distpro"]),
    ("distances", ["mse", "cka", "hcl"]),
    ("weightings", ["fixed", "equal"]),
    ("datasets", ["fashion_mnist", "mnist", "cifar10"]),
])
def test_list(capsys, kind, expected):
    assert main(["list", kind]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert set(expected) <= names


def test_list_losses_shows_each_catalogue_weight(capsys):
    assert main(["list", "losses"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert lines["fitnets"][1:3] == ["weight", "100"] and lines["at"][1:3] == ["weight", "500"]
    assert lines["kd"][1:3] == ["weight", "1"] and lines["pkt"][1:3] == ["weight", "30000"]


def test_run_with_overrides_then_report_and_export(tmp_path, config_file, capsys):
    assert main(["run", str(config_file), "train.epochs=2", "name=tiny"]) == 0
    run_dir = only_run(tmp_path)
    assert run_dir.name.startswith("tiny-s0-")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "checkpoints/last.pt"):
        assert (run_dir / name).exists(), name
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["name"] == "tiny"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert "final test accuracy" in capsys.readouterr().out

    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{100 * summary['test_acc']:.2f}" in out and (run_dir / "comparison.png").exists()

    assert main(["export", str(run_dir), str(tmp_path / "student.pt")]) == 0
    student = create_model("resnet8", in_channels=1, num_classes=10)
    load_state_strict(student, load_checkpoint(tmp_path / "student.pt"))  # adapters dropped: fits exactly
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")["distiller"]
    assert torch.equal(student.fc.weight, ckpt["student.fc.weight"])


def test_unknown_config_key_is_named(config_file, capsys):
    assert main(["run", str(config_file), "train.epochs=1", "train.optimiser.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optimiser" in err and "optimizer" in err


def test_bad_value_type_names_path(config_file, capsys):
    assert main(["run", str(config_file), "train.epochs=ten"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_missing_dataset_prints_install_command(config_file, capsys):
    assert main(["run", str(config_file), "data.root=/nonexistent"]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def test_wrong_layer_path_lists_real_ones(config_file, capsys):
    assert main(["run", str(config_file), "distill.pathways.0.student=layer4"]) == 2
    err = capsys.readouterr().err
    assert "layer4" in err and "layer3" in err


def test_interrupted_run_resumes_from_cli(tmp_path, capsys):
    class Interrupt(Callback):
        def on_epoch_start(self, trainer, epoch):
            if epoch == 1:
                raise KeyboardInterrupt

    cfg = from_dict(RunConfig, {**CONFIG, "name": "resumable", "output_dir": str(tmp_path / "runs"),
                                "train": {"epochs": 2, "progress": False}})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, callbacks=(Interrupt(),))
    run_dir = only_run(tmp_path)
    assert not (run_dir / "summary.json").exists()
    assert main(["run", "--resume", str(run_dir)]) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2


def test_probe(capsys):
    assert main(["probe", "resnet8"]) == 0
    out = capsys.readouterr().out
    assert "layer3" in out and "<- stage" in out and "(2, 64, 7, 7)" in out
