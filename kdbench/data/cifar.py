"""CIFAR-10/100 in their official on-disk format (the python pickle batches).

Layout, exactly as the official tarballs unpack (and as torchvision downloads them)::

    <root>/cifar-100-python/{train,test,meta}
    <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}

This reader does not check the official MD5 sums (torchvision's readers do, which rejects
kdbench's synthetic files written in the same format); ``kdbench fetch`` downloads through
torchvision, which verifies them.

Registered: ``cifar100`` and ``cifar10``, crop 32 of the 4-px zero-padded image + horizontal flip
(RepDistiller).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdbench.data.base import DatasetInfo, register_dataset

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # RepDistiller dataset/cifar100.py
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

LAYOUT = {
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", b"fine_labels", b"fine_label_names"),
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta", b"labels", b"label_names"),
}


class DatasetMissingError(FileNotFoundError):
    """A dataset is not where the config says; the message says how to obtain it."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8, N×H×W×C
    labels: np.ndarray  # int64, N
    classes: list[str]


def howto(root, name: str) -> str:
    return (f"Get it with `kdbench fetch {name} --root {root}` (downloads the official archive through torchvision "
            f"and checks its MD5), or unpack the official tarball so that {Path(root) / LAYOUT[name][0]}/ exists.")


def fetch_cifar(root: str, name: str) -> None:
    import torchvision.datasets as tvd
    cls = tvd.CIFAR100 if name == "cifar100" else tvd.CIFAR10
    cls(root, train=True, download=True)
    cls(root, train=False, download=True)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        root, name = path.parent.parent, next((n for n, lay in LAYOUT.items() if lay[0] == path.parent.name), "cifar100")
        raise DatasetMissingError(
            f"{path}: corrupt or truncated ({type(e).__name__}: {e}). Delete {root} and get the dataset again: "
            f"`kdbench fetch {name} --root {root}`, or, for a suite's synthetic data, rerun snakemake (it "
            f"regenerates it)") from None


def read_cifar(root: str | Path, name: str, split: str) -> ImageSet:
    folder, files, meta_file, label_key, names_key = LAYOUT[name]
    base = Path(root) / folder
    missing = [f for f in files[split] + [meta_file] if not (base / f).is_file()]
    if missing:
        raise DatasetMissingError(
            f"{name} {split} split not found: missing {', '.join(str(base / m) for m in missing)}. "
            + howto(root, name))
    data, labels = [], []
    for f in files[split]:
        d = _unpickle(base / f)
        data.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(d[label_key])
    names = [n.decode() if isinstance(n, bytes) else n for n in _unpickle(base / meta_file)[names_key]]
    images = np.concatenate(data).transpose(0, 2, 3, 1).copy()
    return ImageSet(images, np.asarray(labels, dtype=np.int64), names)


def write_cifar(root: str | Path, name: str, train: ImageSet, test: ImageSet) -> None:
    """Write ``train``/``test`` in the official layout (used for synthetic data and fixtures)."""
    folder, files, meta_file, label_key, names_key = LAYOUT[name]
    base = Path(root) / folder
    base.mkdir(parents=True, exist_ok=True)
    for split, s in (("train", train), ("test", test)):
        chunks = np.array_split(np.arange(len(s.labels)), len(files[split]))
        for f, idx in zip(files[split], chunks):
            d = {b"batch_label": f.encode(), b"data": s.images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1),
                 label_key: s.labels[idx].tolist(), b"filenames": [f"{split}_{i}.png".encode() for i in idx]}
            if name == "cifar100":
                d[b"coarse_labels"] = [int(v) // 5 for v in s.labels[idx]]
            with open(base / f, "wb") as fh:
                pickle.dump(d, fh)
    meta = {names_key: [c.encode() for c in train.classes]}
    if name == "cifar100":
        meta[b"coarse_label_names"] = [f"super{i}".encode() for i in range((len(train.classes) + 4) // 5)]
    with open(base / meta_file, "wb") as fh:
        pickle.dump(meta, fh)


def _info(name: str, mean, std) -> DatasetInfo:
    return DatasetInfo(name, lambda root, split: read_cifar(root, name, split), mean, std,
                       howto=lambda root: howto(root, name), fetch=lambda root: fetch_cifar(root, name),
                       write_synthetic=lambda root, train, test: write_cifar(root, name, train, test))


register_dataset(_info("cifar100", CIFAR100_MEAN, CIFAR100_STD), _info("cifar10", CIFAR10_MEAN, CIFAR10_STD))
