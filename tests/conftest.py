"""Shared fixtures: tiny models that know nothing of kdtune, tiny random and real data."""

from __future__ import annotations

import pytest
import torch

from kdtune.data import ImageDataset, balanced_subset, from_arrays, load_fashion_mnist


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
