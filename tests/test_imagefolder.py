"""Tests for kdtune.imagefolder: class folders of image files, decoded lazily with Pillow."""

import numpy as np
import pytest
import torch
from PIL import Image

from kdtune.data import DatasetNotFoundError, SampleDataset, load_dataset
from kdtune.imagefolder import decode, load_folder, write_image_folder


def grey_images(n: int, h: int = 6, w: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, h, w), generator=g, dtype=torch.uint8)


@pytest.fixture
def folder(tmp_path):
    """train: 3 classes x 4 images, test: 2 classes x 2 images (6x6 grey PNGs)."""
    x_train, y_train = grey_images(12), torch.arange(12) % 3
    x_test, y_test = grey_images(4, seed=1), torch.tensor([0, 2, 0, 2])
    names = ["cat", "dog", "eel"]
    write_image_folder(x_train, y_train, tmp_path / "train", names)
    write_image_folder(x_test, y_test, tmp_path / "test", names)
    return tmp_path, (x_train, y_train), (x_test, y_test)


def test_folder_reads_back_the_written_pixels_and_labels_by_class_name(folder):
    root, (x, y), (xt, yt) = folder
    train = load_dataset("folder", "train", str(root))
    assert train.classes == ["cat", "dog", "eel"] and train.num_classes == 3 and len(train) == 12
    assert train.input_shape == (1, 6, 6) and train.in_channels == 1
    # Files sort by class, then by index: class c holds images c, c+3, c+6, c+9.
    order = torch.cat([torch.arange(c, 12, 3) for c in range(3)])
    assert torch.equal(train.labels, y[order])
    assert all(torch.equal(train.read(i), x[j]) for i, j in enumerate(order.tolist()))
    test = load_folder("test", str(root))
    assert torch.equal(test.labels, torch.tensor([0, 0, 2, 2]))  # dog has no test images: label 2 stays eel


def test_statistics_are_the_training_pixels_and_samples_are_normalised_with_them(folder):
    root, (x, _), _ = folder
    train, test = load_folder("train", str(root)), load_folder("test", str(root))
    pixels = x.float() / 255
    assert train.mean == pytest.approx((float(pixels.mean()),), abs=1e-6)
    assert train.std == pytest.approx((float(pixels.std()),), abs=1e-6)
    assert test.mean == train.mean  # the test split is normalised with the training statistics
    xs, ys = SampleDataset(test)[0]
    expected = (test.read(0).float() / 255 - train.mean[0]) / train.std[0]
    assert torch.allclose(xs, expected) and ys == test.labels[0]


def test_image_size_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    img = np.zeros((8, 16, 3), dtype=np.uint8)
    img[:, 2:14] = 255  # black only at the left and right edges of a 16-wide image
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "train" / "a" / "0.png")
    x = decode(tmp_path / "train" / "a" / "0.png", "RGB", 4)
    assert x.shape == (3, 4, 4)
    assert (x == 255).all()  # 16x8 -> 8x4, the centre 4x4 has none of the black edges
    assert load_folder("train", str(tmp_path), image_size=4).input_shape == (3, 4, 4)


def test_images_of_different_sizes_name_the_file_and_the_fix(tmp_path):
    write_image_folder(grey_images(1), torch.tensor([0]), tmp_path / "train")
    write_image_folder(grey_images(1, 5, 5), torch.tensor([1]), tmp_path / "train")
    ds = load_folder("train", str(tmp_path))
    with pytest.raises(ValueError, match=r"000000\.png: image is \(1, 5, 5\).*data.image_size"):
        ds.read(1)


def test_missing_or_inconsistent_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train/<class>/<image>"):
        load_folder("train", str(tmp_path))
    write_image_folder(grey_images(2), torch.tensor([0, 1]), tmp_path / "train")
    with pytest.raises(DatasetNotFoundError, match="no test split"):
        load_folder("test", str(tmp_path))
    write_image_folder(grey_images(3), torch.tensor([0, 1, 2]), tmp_path / "val")
    with pytest.raises(ValueError, match=r"classes \['2'\] are not among the training classes"):
        load_folder("test", str(tmp_path))


def test_fingerprint_follows_the_files(folder):
    root, _, _ = folder
    ds = load_folder("train", str(root))
    before = ds.fingerprint()
    assert ds.subset([0, 1]).fingerprint() != before
    Image.fromarray(np.zeros((6, 6), dtype=np.uint8)).save(ds.files[0])  # same name, other content
    assert load_folder("train", str(root)).fingerprint() != before
