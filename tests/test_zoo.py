"""Shipped teachers: loadable by name, and their recorded test accuracy is what they score."""

import pytest
import torch

from kdtune.data import BatchLoader, load_fashion_mnist
from kdtune.zoo import list_teachers, load_teacher, teacher_record


def test_benchmark_teacher_is_shipped():
    assert "resnet56_fashion_mnist" in list_teachers()  # the FMNIST-5k protocol's default teacher


@pytest.mark.parametrize("name", list_teachers())
def test_record_matches_the_shipped_weights(name):
    record = teacher_record(name)
    assert record["dataset"] == "fashion_mnist" and record["epochs"] and "command" in record
    teacher = load_teacher(name)
    assert not teacher.training
    # Re-measure on the first 500 test images (seconds on a slow CPU; the record's per-epoch log holds the
    # full figure): at most one prediction may flip between CPUs whose kernels round differently.
    test = load_fashion_mnist("test").subset(torch.arange(500))
    with torch.no_grad():
        correct = sum(int((teacher(x).argmax(1) == y).sum()) for x, y in BatchLoader(test, 500, shuffle=False))
    assert correct / 500 == pytest.approx(record["test_acc_first_500"], abs=1.01 / 500)


def test_unknown_teacher_suggests_names():
    with pytest.raises(KeyError, match="resnet56_fashion_mnist"):
        load_teacher("resnet56_fashion")
