"""Datasets: each module of this package that defines one registers it (:mod:`kdbench.data.base`).

``load_dataset(name, root)`` returns the train and test splits and the normalisation and
augmentation its protocol uses; :meth:`LoadedDataset.loaders` gives the engine's loaders, and
:func:`load_stream` a named extra split (STL-10's ``unlabeled``) as a second training stream. Small
datasets (CIFAR, SVHN, STL-10, Tiny-ImageNet) are decoded once into uint8 arrays and go through
the device-resident :class:`TensorLoader`; ImageNet is listed as files and streamed by
:class:`~kdbench.data.stream.StreamingLoader` (worker processes). Under DDP each rank gets its
shard of every global batch (:mod:`kdbench.data.sharded`). Synthetic data (the default suite) is
written in the real format by each dataset's synthetic writer and read back through the same
readers (:mod:`kdbench.data.synthetic_files`).

Every module of the package is imported here, as :mod:`kdbench.methods` does, so a new dataset is
one new module that calls :func:`~kdbench.data.base.register_dataset`. ``kdbench list datasets``
lists the registered names; each module's docstring gives their format and protocol.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, replace

import numpy as np

from kdbench.data.base import DATASETS, DatasetInfo, register_dataset
from kdbench.data.cifar import DatasetMissingError, ImageSet
from kdbench.data.imagenet import FileImageSet
from kdbench.data.loader import TensorLoader

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")


@dataclass
class LoadedDataset:
    info: DatasetInfo
    train: ImageSet | FileImageSet
    test: ImageSet | FileImageSet

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def loaders(self, batch_size: int, test_batch_size: int, device, rank: int = 0, world_size: int = 1,
                workers: int | None = None):
        """Train and test loaders. ``batch_size`` is the global batch: under DDP (``world_size`` > 1)
        each rank gets its 1/world_size slice of every global batch (see :mod:`kdbench.data.sharded`).
        ``workers``: decoding processes per rank for streamed datasets (default: the CPUs / ranks)."""
        i = self.info
        if i.streaming:
            from kdbench.data.stream import StreamingLoader
            kw = dict(mean=i.mean, std=i.std, device=device, crop=i.image_size, resize=i.resize, rank=rank,
                      world_size=world_size, workers=workers)
            return (StreamingLoader(self.train, batch_size=batch_size, train=True, **kw),
                    StreamingLoader(self.test, batch_size=test_batch_size, train=False, **kw))
        if world_size == 1 and i.flip:  # the reference path
            return (TensorLoader(self.train.images, self.train.labels, i.mean, i.std, batch_size, True, device, i.pad),
                    TensorLoader(self.test.images, self.test.labels, i.mean, i.std, test_batch_size, False, device))
        from kdbench.data.sharded import ShardedTensorLoader
        return (ShardedTensorLoader(self.train.images, self.train.labels, i.mean, i.std, batch_size, True, device, i.pad,
                                    flip=i.flip, rank=rank, world_size=world_size),
                ShardedTensorLoader(self.test.images, self.test.labels, i.mean, i.std, test_batch_size, False, device,
                                    rank=rank, world_size=world_size))


def load_dataset(name: str, root: str) -> LoadedDataset:
    info = DATASETS.get(name)
    return LoadedDataset(info, info.read(root, "train"), info.read(root, "test"))


def holdout_indices(labels, size: int, seed: int) -> np.ndarray:
    """The sorted indices of a stratified holdout of ``size`` samples: each class gives its share
    ``size·n_c/N`` (largest remainders round it, ties to the lower class), drawn by a permutation of
    the class's samples seeded by ``seed`` alone. Deterministic, and independent of any run seed."""
    labels = np.asarray(labels)
    n = len(labels)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size < n:
        raise ValueError(f"validation.size: a holdout needs 0 < size < {n} (the labelled training set), not {size!r}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = size * counts / n
    take = np.floor(quota).astype(np.int64)
    rest = size - int(take.sum())
    order = sorted(range(len(classes)), key=lambda c: (-(quota[c] - take[c]), c))
    take[order[:rest]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _subset(split, idx: np.ndarray):
    if isinstance(split, FileImageSet):
        return replace(split, paths=[split.paths[i] for i in idx], labels=split.labels[idx])
    return replace(split, images=split.images[idx], labels=split.labels[idx])


def holdout_split(data: LoadedDataset, size: int, seed: int) -> LoadedDataset:
    """``data`` with the training set minus a stratified holdout (:func:`holdout_indices`) as
    ``train`` and the holdout as ``test``: its loaders then train on the rest and evaluate on the
    holdout without augmentation, as on the test set (``RunSpec.validation``)."""
    idx = holdout_indices(data.train.labels, size, seed)
    keep = np.setdiff1d(np.arange(len(data.train.labels)), idx, assume_unique=True)
    return LoadedDataset(data.info, _subset(data.train, keep), _subset(data.train, idx))


def check_stream_split(name: str, split: str) -> DatasetInfo:
    """Refuse (with the valid choices) a split that cannot be a second training stream of ``name``."""
    info = DATASETS.get(name)
    if info.streaming:
        raise ValueError(f"{name} is streamed from files: it has no device-resident second training stream; "
                         f"an unlabelled stream needs one of "
                         f"{', '.join(n for n in DATASETS if not DATASETS.get(n).streaming)}")
    if split not in info.splits:
        raise ValueError(f"{name} has no split {split!r} to stream; valid: {', '.join(info.splits)}")
    return info


def load_stream(name: str, root: str, split: str, batch_size: int, device) -> TensorLoader:
    """A named split of ``name`` as a second training stream (``RunSpec.unlabeled``): a training
    loader with the dataset's augmentation whose :meth:`TensorLoader.stream` draws its batches."""
    from kdbench.data.sharded import ShardedTensorLoader
    i = check_stream_split(name, split)
    s = i.read(root, split)
    return ShardedTensorLoader(s.images, s.labels, i.mean, i.std, batch_size, True, device, i.pad, flip=i.flip)


__all__ = ["DATASETS", "DatasetInfo", "DatasetMissingError", "register_dataset", "FileImageSet", "ImageSet", "LoadedDataset", "TensorLoader",
           "check_stream_split", "holdout_indices", "holdout_split", "load_dataset", "load_stream"]
