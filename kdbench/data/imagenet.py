"""ImageNet (ILSVRC-2012 classification) in the standard train/val folder layout.

Layout (what torchvision's ``ImageNet`` prepares from the official archives, and what the
usual ``valprep.sh`` re-foldering gives)::

    <root>/train/<wnid>/*.JPEG      1,281,167 images, 1000 folders n01440764 … n15075141
    <root>/val/<wnid>/*.JPEG        50,000 images, 50 per class

Class k is the k-th wnid in sorted order — ``ImageFolder``'s convention, which is also the
class order of torchvision's pretrained weights. The val folders must be the same 1000 wnids
(a flat ``val/`` of 50,000 files is the classic mistake; HobbitLong/RepDistiller#36). Files
are only listed here; :mod:`kdbench.data.stream` decodes them in worker processes.

ImageNet cannot be downloaded automatically: the archives need an image-net.org account.
``kdbench fetch imagenet --root R`` unpacks the three official archives placed in ``R`` into this
layout through torchvision (which checks their MD5 sums).

Registered: ``imagenet``, streamed; RandomResizedCrop 224 + flip for training, resize 256 +
centre crop 224 for test, torchvision's normalisation. Synthetic data: the 32×32 images upsampled
to 64×64 JPEGs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdbench.data.base import DatasetInfo, register_dataset
from kdbench.data.cifar import DatasetMissingError
from kdbench.data.resize import resized

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpeg", ".jpg", ".png")
ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")


@dataclass
class FileImageSet:
    """A split as image files: ``paths[i]`` has label ``labels[i]`` (index into ``classes``)."""

    paths: list[str]
    labels: np.ndarray  # int64, N
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def howto(root) -> str:
    return (f"ImageNet must be obtained by hand: download {', '.join(ARCHIVES)} from https://image-net.org/ "
            f"(ILSVRC2012, needs an account) into {Path(root)}/, then run `kdbench fetch imagenet --root {root}` "
            f"to unpack them (MD5 checked) into {Path(root)}/train/<wnid>/ and {Path(root)}/val/<wnid>/. "
            f"An existing copy in that layout can be used as is (or symlinked there).")


def fetch_imagenet(root: str) -> None:
    """Unpack the official archives placed in ``root`` (torchvision checks their MD5 sums)."""
    import torchvision.datasets as tvd

    for split in ("train", "val"):
        tvd.ImageNet(root, split=split)


def _class_dirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir(follow_symlinks=True))


def read_imagenet(root: str | Path, split: str) -> FileImageSet:
    """List ``train`` or ``test`` (= the official val set, as every ImageNet KD paper reports)."""
    if split not in ("train", "test", "val"):
        raise ValueError(f"unknown ImageNet split {split!r}; valid: train, test (= val)")
    root = Path(root)
    folder = root / ("train" if split == "train" else "val")
    if not (root / "train").is_dir() or not folder.is_dir():
        raise DatasetMissingError(f"ImageNet {split} split not found: {folder}/ is missing. " + howto(root))
    classes = _class_dirs(root / "train")
    here = classes if split == "train" else _class_dirs(folder)
    if not here:
        flat = sum(1 for f in folder.iterdir() if f.suffix.lower() in EXTENSIONS)
        hint = (f" It holds {flat} images directly: the val set is still flat. Re-folder it into val/<wnid>/ "
                f"(`kdbench fetch imagenet --root {root}` with the devkit archive in place does it)." if flat else "")
        raise DatasetMissingError(f"{folder}: no class folders.{hint} " + howto(root))
    if split != "train" and here != classes:
        extra, missing = sorted(set(here) - set(classes)), sorted(set(classes) - set(here))
        raise DatasetMissingError(f"{folder}: class folders differ from train/'s (only in val: {extra[:3]}, "
                                  f"missing in val: {missing[:3]}); both must hold the same wnids")
    paths, labels = [], []
    for k, w in enumerate(classes):
        with os.scandir(folder / w) as it:
            names = sorted(e.name for e in it if e.name.lower().endswith(EXTENSIONS))
        paths.extend(str(folder / w / n) for n in names)
        labels.extend([k] * len(names))
    if not paths:
        raise DatasetMissingError(f"{folder}: no images found. " + howto(root))
    return FileImageSet(paths, np.asarray(labels, dtype=np.int64), classes)


def write_imagenet(root: str | Path, train, test) -> Path:
    """Write uint8 ``ImageSet``s as ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (JPEG quality
    95; class k gets the wnid ``n{k:08d}``) — for fixtures and synthetic data."""
    from PIL import Image

    root = Path(root)
    ids = [f"n{k:08d}" for k in range(len(train.classes))]
    for split, s, prefix in (("train", train, None), ("val", test, "ILSVRC2012_val")):
        for w in ids:
            (root / split / w).mkdir(parents=True, exist_ok=True)
        for k, (img, y) in enumerate(zip(s.images, s.labels)):
            name = f"{prefix}_{k + 1:08d}.JPEG" if prefix else f"{ids[y]}_{k}.JPEG"
            Image.fromarray(img).save(root / split / ids[y] / name, quality=95)
    return root


register_dataset(DatasetInfo(
    "imagenet", read_imagenet, IMAGENET_MEAN, IMAGENET_STD, howto=howto, fetch=fetch_imagenet,
    write_synthetic=lambda root, train, test: write_imagenet(root, resized(train, 64), resized(test, 64)),
    image_size=224, pad=0, streaming=True, resize=256, train_size=1281167))
