"""Shared fixtures: tiny models that know nothing of kdtune, tiny random and real data."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from helpers import DictNet, TinyNet
from kdtune.data import ImageDataset, balanced_subset, from_arrays, load_fashion_mnist
from kdtune.models import MODELS, register_model


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module: the 2 cores are shared with training jobs, and small
    models gain nothing from a second thread while two processes would oversubscribe them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_data() -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(40) % 10
    return from_arrays(x, y, num_classes=10)


@pytest.fixture(scope="session")
def fmnist_small() -> tuple[ImageDataset, ImageDataset]:
    """200 real training images (20 per class) and the first 500 test images."""
    train = balanced_subset(load_fashion_mnist("train"), 20, seed=0)
    test = load_fashion_mnist("test")
    return train, test.subset(torch.arange(500))


@pytest.fixture
def dict_net() -> Iterator[None]:
    """Registers ``dict_net`` (:class:`helpers.DictNet`, a dict output) and its tensor-output twin
    ``tiny_net`` (:class:`helpers.TinyNet`) as a user's models, for a test's run configs."""
    register_model("dict_net")(DictNet)
    register_model("tiny_net")(TinyNet)
    yield
    MODELS._items.pop("dict_net", None)
    MODELS._items.pop("tiny_net", None)
