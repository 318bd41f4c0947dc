"""Image folders on disk, ImageNet-style: ``root/<split>/<class>/<image>``, decoded lazily with Pillow.

``data.dataset: folder`` with ``data.root: root``; the splits are ``root/train`` and ``root/test``
(or ``root/val``). Class names are the sub-directory names, sorted; their index is the label.
Nothing is read into memory up front: an image is decoded when a batch needs it (in DataLoader
workers with ``data.workers > 0``), optionally resized (shorter side to ``image_size``) and
centre-cropped to a square, then augmented and normalised like in-memory images
(:class:`~kdtune.data.SampleDataset`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdtune.data import DATASETS, DatasetNotFoundError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TEST_DIRS = ("test", "val")
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def decode(path: Path, mode: str, image_size: int | None) -> Tensor:
    """One image file -> (C, H, W) uint8: converted to ``mode`` ("L" or "RGB"), and with
    ``image_size`` its shorter side resized to it and the centre square cropped."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode)
        if image_size is not None:
            w, h = im.size
            scale = image_size / min(w, h)
            im = im.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                           Image.Resampling.BILINEAR)
            w, h = im.size
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        arr = np.asarray(im, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class FolderDataset:
    """Image files with labels; images are decoded on :meth:`read` (see the module docstring).

    Attributes:
        files: one path per image; labels (N,) int64; classes: class names by label.
        mode: Pillow mode the images are converted to ("L": 1 channel, "RGB": 3).
        image_size: resize + centre-crop size, or None (the files' own size, which must be shared).
        mean, std: per-channel statistics of the training split (normalisation).
    """

    def __init__(self, files: Sequence[Path], labels: Tensor, classes: Sequence[str], mode: str,
                 image_size: int | None, mean: tuple[float, ...], std: tuple[float, ...], name: str) -> None:
        self.files, self.labels, self.classes = list(files), labels.long(), list(classes)
        self.num_classes, self.mode, self.image_size = len(self.classes), mode, image_size
        self.mean, self.std, self.name = mean, std, name
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image (the first one is decoded to find it)."""
        if self._shape is None:
            self._shape = tuple(decode(self.files[0], self.mode, self.image_size).shape)
        return self._shape

    @property
    def in_channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def read(self, index: int) -> Tensor:
        """Image ``index`` decoded: (C, H, W) uint8."""
        x = decode(self.files[index], self.mode, self.image_size)
        if tuple(x.shape) != self.input_shape:
            raise ValueError(f"{self.files[index]}: image is {tuple(x.shape)} but {self.files[0]} is "
                             f"{self.input_shape}; set data.image_size to resize them all to one size")
        return x

    def fingerprint(self) -> str:
        """Hash of the file list (paths, sizes, modification times), labels and decoding settings."""
        h = hashlib.sha256(repr((self.mode, self.image_size, self.labels.tolist())).encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def subset(self, indices: Tensor | Sequence[int], name: str | None = None) -> FolderDataset:
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        out = FolderDataset([self.files[i] for i in idx], self.labels[idx], self.classes, self.mode,
                            self.image_size, self.mean, self.std, name or self.name)
        out._shape = self._shape
        return out


def scan(directory: Path, classes: Sequence[str] | None = None) -> tuple[list[Path], Tensor, list[str]]:
    """Image files under ``directory/<class>/`` (sorted), their labels and the class names."""
    found = sorted(d.name for d in directory.iterdir() if d.is_dir())
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{directory}: classes {unknown} are not among the training classes {classes}")
    files, labels = [], []
    for label, cls in enumerate(classes):
        if not (directory / cls).is_dir():
            continue
        for f in sorted((directory / cls).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise DatasetNotFoundError(f"{directory}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class "
                                   f"sub-directories; expected {directory}/<class>/<image>")
    return files, torch.tensor(labels, dtype=torch.long), classes


@functools.lru_cache(maxsize=8)
def _train_statistics(root: str, mode: str, image_size: int | None,
                      sample: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of a seeded sample of ``sample`` training images (normalisation)."""
    files, _, _ = scan(Path(root) / "train")
    pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:sample].tolist()
    pixels = torch.cat([decode(files[i], mode, image_size).float().flatten(1) / 255.0 for i in pick], dim=1)
    return tuple(pixels.mean(dim=1).tolist()), tuple(pixels.std(dim=1).clamp_min(1e-6).tolist())


@DATASETS.register("folder")
def load_folder(split: str = "train", root: str | None = None, image_size: int | None = None) -> FolderDataset:
    """Images in class folders on disk: root/train/<class>/<image> and root/test (or val)/..., lazily decoded."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root) if root else None
    if base is None or not (base / "train").is_dir():
        raise DatasetNotFoundError(f"folder: data.root must be a directory holding train/<class>/<image> and "
                                   f"test/<class>/<image> (got {root!r})")
    train_files, _, classes = scan(base / "train")
    from PIL import Image

    with Image.open(train_files[0]) as im:
        mode = "L" if im.mode in GREY_MODES else "RGB"
    if split == "train":
        directory = base / "train"
    else:
        directory = next((base / d for d in TEST_DIRS if (base / d).is_dir()), None)
        if directory is None:
            raise DatasetNotFoundError(f"folder {root}: no test split; add {root}/test/<class>/<image> "
                                       f"(or val/)")
    files, labels, _ = scan(directory, classes)
    mean, std = _train_statistics(str(base), mode, image_size)
    return FolderDataset(files, labels, classes, mode, image_size, mean, std, f"folder-{split}")


def write_image_folder(images: Tensor, labels: Tensor, directory: str | Path,
                       classes: Sequence[str] | None = None) -> Path:
    """Write (N, C, H, W) uint8 images as PNGs under ``directory/<class>/<index>.png`` (C = 1 or 3);
    ``classes`` names the label indices (default ``"0"``, ``"1"`` ..., zero-padded so that sorting
    the names, as :func:`scan` does, gives back the label order). Returns ``directory``."""
    from PIL import Image

    directory = Path(directory)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    n = int(labels.max()) + 1
    names = list(classes) if classes is not None else [f"{c:0{len(str(n - 1))}d}" for c in range(n)]
    for i, (img, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        arr = img.permute(1, 2, 0).numpy()
        out = directory / names[label] / f"{i:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(out)
    return directory
