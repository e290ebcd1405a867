"""Tiny-ImageNet-200 (the cs231n release) in its official layout.

Layout of ``tiny-imagenet-200.zip`` unpacked::

    <root>/tiny-imagenet-200/wnids.txt                         200 WordNet ids, one per line
    <root>/tiny-imagenet-200/words.txt                         "<wnid>\\t<names>" lines
    <root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG        500 × 64×64 per class
    <root>/tiny-imagenet-200/val/images/val_<k>.JPEG           10,000, flat ...
    <root>/tiny-imagenet-200/val/val_annotations.txt           ... "<file>\\t<wnid>\\t<box>" per line

The validation set is flat, so ``ImageFolder``-style code (mdistiller, distillers) first
re-folders it into ``val/<wnid>/images/``. :func:`refolder_val` does that (``kdbench fetch
tinyimagenet`` runs it); the reader accepts both the flat and the re-foldered layout. The test
images have no published labels, so the labelled val set is kdbench's ``test`` split (as in
every KD paper that uses Tiny-ImageNet).

Class k is the k-th wnid in sorted order (what ``ImageFolder`` on ``train/`` gives, as in
mdistiller). Some images are grayscale JPEGs; they are expanded to RGB. Normalisation: mean
(0.4802, 0.4481, 0.3975), std (0.2302, 0.2265, 0.2262) (mdistiller's ``tiny_imagenet`` loader;
recipes.md §3.3; that loader reads the native 64-px images); the 32-px reading uses the same
values.

Two registered names read the same files (one root serves both):

``tinyimagenet``
    32 px, for protocols that feed a 32-px CIFAR model (CRD's linear probe, FKD's cross-dataset
    transfer): 64 → 32 resized once at read time (PIL bilinear, as ``transforms.Resize((32,
    32))``); CIFAR's augmentation (crop 32 of the 4-px zero-padded image + horizontal flip).
``tinyimagenet64``
    the native 64 px, for models trained on Tiny-ImageNet itself (the KDA tables): crop 64 of
    the 8-px zero-padded image + horizontal flip. A choice: the KDA paper states neither its
    resolution nor its augmentation; 8 px is CIFAR's 4 px scaled with the image (1/8 of the
    side); another padding is another registered name. The training views are then
    2·17² = 578 (162 at 32 px). Every KDA model (ResNet18/34, ResNet18-0.5, ShuffleNet) ends in
    global average pooling, so it runs at 64 px unchanged.

Synthetic data (both names) is written as 64×64 JPEGs in the official layout, so the reader is
tested at the native resolution.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from kdbench.data.base import DatasetInfo, register_dataset
from kdbench.data.cifar import DatasetMissingError, ImageSet
from kdbench.data.resize import load_rgb, resized

TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2302, 0.2265, 0.2262)
FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
SPLITS = ("train", "test", "val")  # test and val are the same labelled val set


def howto(root) -> str:
    return (f"Get it with `kdbench fetch tinyimagenet --root {root}`: it downloads {URL}, checks its MD5, unzips it "
            f"and re-folders val/. Where that URL is down, put a copy of tiny-imagenet-200.zip (e.g. the Kaggle mirror) "
            f"in {Path(root)}/ and run the same command (it checks the copy's MD5 {MD5}); an already unzipped copy "
            f"({Path(root) / FOLDER}/wnids.txt present) is only re-foldered.")


def fetch_tinyimagenet(root: str) -> None:
    """Download and unzip (MD5 checked) unless ``wnids.txt`` is there, then re-folder val/."""
    from torchvision.datasets.utils import download_and_extract_archive

    if not (Path(root) / FOLDER / "wnids.txt").is_file():
        download_and_extract_archive(URL, root, filename="tiny-imagenet-200.zip", md5=MD5)
    moved = refolder_val(root)
    print(f"tiny-imagenet-200: {len(wnids(root))} classes; re-foldered {moved} val images into val/<wnid>/images/")


def wnids(root: str | Path) -> list[str]:
    base = Path(root) / FOLDER
    f = base / "wnids.txt"
    if not f.is_file():
        raise DatasetMissingError(f"Tiny-ImageNet not found: {f} is missing. " + howto(root))
    ids = sorted({w.strip() for w in f.read_text().split("\n") if w.strip()})
    if not ids:
        raise DatasetMissingError(f"{f} lists no classes")
    return ids


def read_annotations(base: Path) -> dict[str, str]:
    """``val_annotations.txt``: file name → wnid."""
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetMissingError(f"{ann} is missing: it names the class of each flat val image")
    out = {}
    for n, line in enumerate(ann.read_text().split("\n"), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2:
            raise DatasetMissingError(f"{ann}:{n}: expected '<file>\\t<wnid>\\t<box>', found {line!r}")
        out[cols[0].strip()] = cols[1].strip()
    return out


def _val_files(base: Path, classes: list[str]) -> list[tuple[Path, str]]:
    flat = base / "val" / "images"
    if flat.is_dir() and any(flat.glob("*.JPEG")):
        ann = read_annotations(base)
        files = sorted(flat.glob("*.JPEG"))
        unknown = [f.name for f in files if f.name not in ann]
        if unknown:
            raise DatasetMissingError(f"{flat}: {len(unknown)} images are not in val_annotations.txt (e.g. {unknown[0]})")
        return [(f, ann[f.name]) for f in files]
    return [(f, w) for w in classes for f in sorted((base / "val" / w).rglob("*.JPEG"))]


def read_tinyimagenet(root: str | Path, split: str, size: int = 32) -> ImageSet:
    """Read ``train`` or ``test`` (= the labelled val set) at ``size`` px (64 = native)."""
    if split not in SPLITS:
        raise ValueError(f"unknown Tiny-ImageNet split {split!r}; valid: {', '.join(SPLITS)}")
    base = Path(root) / FOLDER
    classes = wnids(root)
    index = {w: i for i, w in enumerate(classes)}
    if split == "train":
        files = [(f, w) for w in classes for f in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    else:
        files = _val_files(base, classes)
    if not files:
        raise DatasetMissingError(f"Tiny-ImageNet {split} split: no JPEG images under {base}/"
                                  f"{'train/<wnid>/images' if split == 'train' else 'val'}. " + howto(root))
    stray = sorted({w for _, w in files if w not in index})
    if stray:
        raise DatasetMissingError(f"{base}: val images of classes not in wnids.txt: {', '.join(stray[:5])}")
    images = np.stack([load_rgb(f, size) for f, _ in files])
    labels = np.array([index[w] for _, w in files], dtype=np.int64)
    return ImageSet(images, labels, classes)


def refolder_val(root: str | Path) -> int:
    """Move the flat ``val/images/*.JPEG`` into ``val/<wnid>/images/`` using the annotations file.

    Idempotent; returns the number of images moved. ``val_annotations.txt`` is kept."""
    base = Path(root) / FOLDER
    flat = base / "val" / "images"
    if not flat.is_dir():
        return 0
    ann = read_annotations(base)
    moved = 0
    for f in sorted(flat.glob("*.JPEG")):
        if f.name not in ann:
            raise DatasetMissingError(f"{f}: not in val_annotations.txt; cannot re-folder")
        dest = base / "val" / ann[f.name] / "images"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(dest / f.name))
        moved += 1
    if not any(flat.iterdir()):
        flat.rmdir()
    return moved


def write_tinyimagenet(root: str | Path, train: ImageSet, test: ImageSet, flat_val: bool = True) -> Path:
    """Write 64×64 ``train``/``test`` as the official release (JPEG, quality 95), with the flat val
    layout and its annotations file unless ``flat_val`` is false (fixtures and synthetic data).
    Class k gets the wnid ``n{k:08d}`` unless ``classes`` already are wnids."""
    from PIL import Image

    base = Path(root) / FOLDER
    ids = train.classes if all(c.startswith("n") and c[1:].isdigit() for c in train.classes) else \
        [f"n{k:08d}" for k in range(len(train.classes))]
    assert ids == sorted(ids), "class k must be the k-th wnid in sorted order"
    (base / "val").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in ids))
    (base / "words.txt").write_text("".join(f"{w}\t{c}\n" for w, c in zip(ids, train.classes)))
    counts = [0] * len(ids)
    for img, y in zip(train.images, train.labels):
        folder = base / "train" / ids[y] / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{ids[y]}_{counts[y]}.JPEG", quality=95)
        counts[y] += 1
    for w, c in zip(ids, counts):
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{k}.JPEG\t0\t0\t63\t63\n" for k in range(c)))
    lines = []
    for k, (img, y) in enumerate(zip(test.images, test.labels)):
        folder = base / "val" / ("images" if flat_val else f"{ids[y]}/images")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"val_{k}.JPEG", quality=95)
        lines.append(f"val_{k}.JPEG\t{ids[y]}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return base


def _info(name: str, size: int, pad: int) -> DatasetInfo:
    return DatasetInfo(name, lambda root, split: read_tinyimagenet(root, split, size), TINY_MEAN, TINY_STD,
                       howto=howto, fetch=fetch_tinyimagenet, write_synthetic=write_synthetic, image_size=size,
                       pad=pad, train_size=100000)


def write_synthetic(root: str | Path, train: ImageSet, test: ImageSet) -> None:
    """The 32×32 synthetic images upsampled to the real 64×64 JPEGs (both registered names)."""
    write_tinyimagenet(root, resized(train, 64), resized(test, 64))


register_dataset(_info("tinyimagenet", 32, 4), _info("tinyimagenet64", 64, 8))
