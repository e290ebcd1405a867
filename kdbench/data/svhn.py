"""SVHN (Netzer et al. 2011), cropped-digits format: one MATLAB v5 file per split.

Layout (what http://ufldl.stanford.edu/housenumbers/ serves and torchvision downloads)::

    <root>/train_32x32.mat     73,257 digits
    <root>/test_32x32.mat      26,032 digits
    <root>/extra_32x32.mat     531,131 "somewhat less difficult" digits (optional)

Each file holds ``X`` (uint8, 32×32×3×N: row, column, channel, image) and ``y`` (N×1) with
labels 1..10, where **10 is the digit 0**; kdbench maps 10 → 0 so class k is digit k (as
torchvision does).

Normalisation: mean (0.4377, 0.4438, 0.4728), std (0.1980, 0.2010, 0.1970), the per-channel
statistics of the train split that SVHN code commonly uses (no KD paper in this suite publishes
its own). Augmentation — a choice, since the OT-KD paper does not publish its SVHN recipe:
RepDistiller's random 32×32 crop of the 4-px zero-padded image, **without** horizontal flips
(digits are not mirror-symmetric).

Registered: ``svhn`` (train on ``train``) and ``svhn_extra`` (train on train + extra, 604,388
digits); both test on ``test``. Synthetic data: ``extra`` is the first quarter of train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdbench.data.base import DatasetInfo, register_dataset
from kdbench.data.cifar import DatasetMissingError, ImageSet

SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)
CLASSES = [str(d) for d in range(10)]
#: MD5 of the official files (the ones torchvision checks on download)
MD5 = {"train": "e26dedcc434d2e4c54c9b2d4a06d8373", "test": "eb5a983be6a315427106f1b164d9cef3",
       "extra": "a93ce644f1a588dc4d68dda5feec44a7"}
SPLITS = ("train", "test", "extra")


def howto(root, name: str = "svhn") -> str:
    files = ", ".join(f"{s}_32x32.mat" for s in (SPLITS if name == "svhn_extra" else SPLITS[:2]))
    return (f"Get it with `kdbench fetch {name} --root {root}` (torchvision download of {files} from "
            f"http://ufldl.stanford.edu/housenumbers/, MD5 checked), or download those files from that page "
            f"into {Path(root)}/.")


def fetch_svhn(root: str, splits=SPLITS[:2]) -> None:
    import torchvision.datasets as tvd
    for s in splits:
        tvd.SVHN(root, split=s, download=True)


def split_file(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}_32x32.mat"


def read_svhn(root: str | Path, split: str) -> ImageSet:
    """Read one split, or several joined by ``+`` (``"train+extra"``), in file order."""
    parts = split.split("+")
    bad = [p for p in parts if p not in SPLITS]
    if bad:
        raise ValueError(f"unknown SVHN split {bad[0]!r}; valid: {', '.join(SPLITS)} (or joined with '+')")
    sets = [_read_one(root, p) for p in parts]
    return ImageSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]), CLASSES)


def _read_one(root: str | Path, split: str) -> ImageSet:
    from scipy.io import loadmat

    path = split_file(root, split)
    if not path.is_file():
        raise DatasetMissingError(f"SVHN {split} split not found: {path} is missing. "
                                  + howto(root, "svhn_extra" if split == "extra" else "svhn"))
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # truncated download, HDF5 (v7.3) file, not a .mat file
        raise DatasetMissingError(f"{path}: cannot be read as a MATLAB v5 file ({type(e).__name__}: {e}); "
                                  f"delete it and fetch it again (`kdbench fetch svhn --root {root}`)") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise DatasetMissingError(f"{path}: expected X of shape 32×32×3×N and y of N labels, found "
                                  f"X {None if x is None else x.shape}, y {None if y is None else y.shape}")
    labels = y.reshape(-1).astype(np.int64)
    if labels.min() < 1 or labels.max() > 10:
        raise DatasetMissingError(f"{path}: labels must be 1..10 (10 = digit 0), found {labels.min()}..{labels.max()}")
    labels[labels == 10] = 0
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2), dtype=np.uint8)  # N×H×W×C
    return ImageSet(images, labels, CLASSES)


def write_svhn(root: str | Path, split: str, s: ImageSet) -> Path:
    """Write ``s`` as the official ``<split>_32x32.mat`` (for fixtures and synthetic data)."""
    from scipy.io import savemat

    path = split_file(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    y = np.where(s.labels == 0, 10, s.labels).astype(np.uint8).reshape(-1, 1)
    savemat(path, {"X": np.ascontiguousarray(s.images.transpose(1, 2, 3, 0)), "y": y}, format="5", do_compression=False)
    return path


def write_synthetic(root: str | Path, train: ImageSet, test: ImageSet) -> None:
    """``train``/``test`` and an ``extra`` split (the first quarter of train) as the official files."""
    write_svhn(root, "train", train)
    write_svhn(root, "test", test)
    quarter = len(train.labels) // 4
    write_svhn(root, "extra", ImageSet(train.images[:quarter], train.labels[:quarter], train.classes))


register_dataset(
    DatasetInfo("svhn", read_svhn, SVHN_MEAN, SVHN_STD, howto=howto, fetch=fetch_svhn,
                write_synthetic=write_synthetic, flip=False, train_size=73257, splits=SPLITS),
    DatasetInfo("svhn_extra", lambda root, split: read_svhn(root, "train+extra" if split == "train" else split),
                SVHN_MEAN, SVHN_STD, howto=lambda root: howto(root, "svhn_extra"),
                fetch=lambda root: fetch_svhn(root, SPLITS), write_synthetic=write_synthetic, flip=False,
                train_size=604388, splits=SPLITS))
