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
(0.4802, 0.4481, 0.3975), std (0.2302, 0.2265, 0.2262) (mdistiller ``tiny_imagenet`` loader;
recipes.md §3.3). Both transfer protocols run at CIFAR resolution, so the default reader resizes
64 → 32 px once at read time (PIL bilinear, as ``transforms.Resize((32, 32))``); training
augmentation is CIFAR's (crop 32 of the 4-px padded image + horizontal flip).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .cifar import DatasetMissingError, ImageSet
from .resize import load_rgb

TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2302, 0.2265, 0.2262)
FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
SPLITS = ("train", "test", "val")  # test and val are the same labelled val set


def _howto(root) -> str:
    return (f"Get it with `kdbench fetch tinyimagenet --root {root}`: it downloads {URL}, checks its MD5, unzips it "
            f"and re-folders val/. Where that URL is down, put a copy of tiny-imagenet-200.zip (e.g. the Kaggle mirror) "
            f"in {Path(root)}/ and run the same command (it checks the copy's MD5 {MD5}); an already unzipped copy "
            f"({Path(root) / FOLDER}/wnids.txt present) is only re-foldered.")


def wnids(root: str | Path) -> list[str]:
    base = Path(root) / FOLDER
    f = base / "wnids.txt"
    if not f.is_file():
        raise DatasetMissingError(f"Tiny-ImageNet not found: {f} is missing. " + _howto(root))
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
                                  f"{'train/<wnid>/images' if split == 'train' else 'val'}. " + _howto(root))
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
