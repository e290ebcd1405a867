"""STL-10 (Coates et al. 2011) in its official binary format.

Layout (``stl10_binary.tar.gz`` unpacked, as torchvision downloads it)::

    <root>/stl10_binary/train_X.bin  train_y.bin     5,000 labelled images
    <root>/stl10_binary/test_X.bin   test_y.bin      8,000 labelled images
    <root>/stl10_binary/unlabeled_X.bin              100,000 unlabelled images
    <root>/stl10_binary/class_names.txt              10 names, one per line

``*_X.bin`` is raw uint8, 3×96×96 per image, each channel plane stored **column-major**
(MATLAB order), so a plane reads as 96×96 and is transposed. ``*_y.bin`` is one uint8 per image,
labels 1..10 (kdbench uses 0..9). The unlabelled split has label −1.

Both transfer protocols that use STL-10 work at CIFAR resolution: images are resized once, at
read time, from 96×96 to 32×32 with PIL's bilinear filter — what ``transforms.Resize((32, 32))``
does to a PIL image (giakoumoglou/distillers ``dataset/stl10.py``, the public re-implementation
of CRD's transfer experiment; recipes.md §3.4). Normalisation mean (0.4467, 0.4398, 0.4066),
std (0.2603, 0.2566, 0.2712) (same source); training augmentation: crop 32 from the 4-px padded
image + horizontal flip, as CIFAR.

Registered: ``stl10``. Synthetic data: the 32×32 images upsampled to 96×96; ``unlabeled`` is train
without its labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdbench.data.base import DatasetInfo, register_dataset
from kdbench.data.cifar import DatasetMissingError, ImageSet
from kdbench.data.resize import resize_uint8, resized

STL10_MEAN = (0.4467, 0.4398, 0.4066)
STL10_STD = (0.2603, 0.2566, 0.2712)
FOLDER = "stl10_binary"
SPLITS = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
          "unlabeled": ("unlabeled_X.bin", None)}
NATIVE = 96
MD5 = "91f7769df0f17e558f3565bffb0c7dfb"  # stl10_binary.tar.gz, checked by torchvision on download


def howto(root) -> str:
    return (f"Get it with `kdbench fetch stl10 --root {root}` (torchvision download of stl10_binary.tar.gz from "
            f"http://ai.stanford.edu/~acoates/stl10/, MD5 checked), or unpack that archive so that "
            f"{Path(root) / FOLDER}/ exists.")


def fetch_stl10(root: str) -> None:
    import torchvision.datasets as tvd
    tvd.STL10(root, split="train", download=True)


def read_stl10(root: str | Path, split: str, size: int = 32) -> ImageSet:
    """Read ``split`` (train, test, unlabeled, or several joined by ``+``) resized to ``size`` px."""
    parts = split.split("+")
    bad = [p for p in parts if p not in SPLITS]
    if bad:
        raise ValueError(f"unknown STL-10 split {bad[0]!r}; valid: {', '.join(SPLITS)} (or joined with '+')")
    sets = [_read_one(root, p, size) for p in parts]
    return ImageSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]), sets[0].classes)


def _read_one(root: str | Path, split: str, size: int) -> ImageSet:
    base = Path(root) / FOLDER
    x_file, y_file = SPLITS[split]
    need = [x_file, "class_names.txt"] + ([y_file] if y_file else [])
    missing = [base / f for f in need if not (base / f).is_file()]
    if missing:
        raise DatasetMissingError(f"STL-10 {split} split not found: missing {', '.join(map(str, missing))}. "
                                  + howto(root))
    raw = np.fromfile(base / x_file, dtype=np.uint8)
    per = 3 * NATIVE * NATIVE
    if raw.size % per:
        raise DatasetMissingError(f"{base / x_file}: {raw.size} bytes is not a whole number of 3×96×96 images "
                                  f"(truncated?); fetch it again")
    images = raw.reshape(-1, 3, NATIVE, NATIVE).transpose(0, 3, 2, 1)  # column-major planes -> N×H×W×C
    if y_file:
        labels = np.fromfile(base / y_file, dtype=np.uint8).astype(np.int64) - 1
        if labels.size != images.shape[0] or (labels.size and (labels.min() < 0 or labels.max() > 9)):
            raise DatasetMissingError(f"{base / y_file}: expected {images.shape[0]} labels in 1..10")
    else:
        labels = np.full(images.shape[0], -1, dtype=np.int64)
    classes = [c for c in (base / "class_names.txt").read_text().split("\n") if c.strip()]
    return ImageSet(resize_uint8(images, size), labels, classes)


def write_stl10(root: str | Path, splits: dict[str, ImageSet], classes: list[str]) -> Path:
    """Write 96×96 ``splits`` in the official binary layout (fixtures and synthetic data)."""
    base = Path(root) / FOLDER
    base.mkdir(parents=True, exist_ok=True)
    for split, s in splits.items():
        x_file, y_file = SPLITS[split]
        assert s.images.shape[1:] == (NATIVE, NATIVE, 3), "STL-10 images are 96×96×3"
        s.images.transpose(0, 3, 2, 1).astype(np.uint8).tofile(base / x_file)
        if y_file:
            (s.labels + 1).astype(np.uint8).tofile(base / y_file)
    (base / "class_names.txt").write_text("\n".join(classes) + "\n")
    return base


def write_synthetic(root: str | Path, train: ImageSet, test: ImageSet) -> None:
    unlabeled = resized(train, NATIVE)
    write_stl10(root, {"train": resized(train, NATIVE), "test": resized(test, NATIVE),
                       "unlabeled": ImageSet(unlabeled.images, unlabeled.labels * 0 - 1, train.classes)}, train.classes)


register_dataset(DatasetInfo(
    "stl10", lambda root, split: read_stl10(root, split, 32), STL10_MEAN, STL10_STD, howto=howto, fetch=fetch_stl10,
    write_synthetic=write_synthetic, train_size=5000, splits=tuple(SPLITS)))
