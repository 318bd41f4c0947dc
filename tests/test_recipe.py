"""kdtune.recipe on data other than the built-in in-memory sets: an image folder on disk read by
DataLoader workers, through a plain run and each search (DistPro, Auto-KD with its teacher cache,
the weight search)."""

import json

import pytest
import torch

from helpers import kdtune_run, tiny_autokd
from kdtune.config import RunConfig, from_dict
from kdtune.data import DatasetLoader, balanced_subset, load_fashion_mnist
from kdtune.imagefolder import write_image_folder
from kdtune.recipe import prepare


@pytest.fixture(scope="module")
def fmnist_folder(tmp_path_factory):
    """Fashion-MNIST as PNG files: 6 training images per class, the first 30 test images."""
    root = tmp_path_factory.mktemp("fmnist_png")
    train = balanced_subset(load_fashion_mnist("train"), 6, seed=0)
    test = load_fashion_mnist("test").subset(range(30))
    write_image_folder(train.images, train.labels, root / "train")
    write_image_folder(test.images, test.labels, root / "test")
    return root


def folder_data(root, **extra):
    return {"dataset": "folder", "root": str(root), "batch_size": 16, "eval_batch_size": 30, **extra}


def test_prepare_reads_the_folder_through_worker_processes(fmnist_folder):
    cfg = from_dict(RunConfig, {"data": folder_data(fmnist_folder, workers=2), "student": {"name": "resnet8"},
                                "train": {"epochs": 1, "progress": False}})
    trainer = prepare(cfg, None)
    assert isinstance(trainer.train_loader, DatasetLoader) and trainer.train_loader.workers == 2
    assert trainer.train_loader.dataset.augment.flip  # clothes: the dataset default flips
    summary = trainer.fit()
    assert summary["epochs"] == 1 and 0 <= summary["test_acc"] <= 1
    assert trainer.global_step == 4  # 60 images in batches of 16


def test_image_size_is_only_for_image_files():
    cfg = from_dict(RunConfig, {"data": {"image_size": 32}, "student": {"name": "resnet8"}})
    with pytest.raises(ValueError, match="data.image_size resizes image files"):
        prepare(cfg, None)


def test_distpro_search_on_an_image_folder(fmnist_folder, tmp_path):
    run_dir = kdtune_run({"seed": 0, "data": folder_data(fmnist_folder, val_fraction=0.5),
                          "student": {"name": "resnet8"}, "teacher": {"name": "resnet8"},
                          "distpro": {"connections": "same", "transforms": ["conv1x1"]},
                          "train": {"epochs": 1, "progress": False}}, tmp_path / "runs")
    process = json.loads((run_dir / "process.json").read_text())
    assert len(process["steps"]) == 2  # 30 training images in batches of 16


def test_autokd_trial_with_teacher_cache_on_an_image_folder(fmnist_folder, tmp_path):
    config = tiny_autokd("ak", data=folder_data(fmnist_folder, val_fraction=0.5, workers=2, train_per_class=None),
                         trials=1, cache=True)
    run_dir = kdtune_run(config, tmp_path / "runs")
    assert (run_dir / "teacher_cache" / "epoch_0.pt").exists()
    assert json.loads((run_dir / "autokd.json").read_text())["best_reward"] is not None


def test_weight_search_on_an_image_folder(fmnist_folder, tmp_path):
    config = {"seed": 0, "data": folder_data(fmnist_folder, val_fraction=0.5), "student": {"name": "resnet8"},
              "teacher": {"name": "resnet8"}, "distill": {"logit_losses": [{"name": "kd"}]},
              "train": {"epochs": 1, "progress": False},
              "search": {"sampler": "grid", "space": {"kd": [0.5, 1]}}}
    run_dir = kdtune_run(config, tmp_path / "runs")
    assert json.loads((run_dir / "search.json").read_text())["complete_trials"] == 2
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
