"""Dataset registry: each entry reads a dataset's real on-disk format into an :class:`ImageSet`.

``load_dataset(name, root)`` returns the train and test splits and the normalisation and
augmentation its protocol uses. Synthetic data (the default suite) is written in the real
format by :mod:`kdbench.data.synthetic` and read back through the same readers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry
from .cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DatasetMissingError, ImageSet, read_cifar
from .loader import TensorLoader


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    read: Callable[[str, str], ImageSet]  # (root, split) -> ImageSet
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = 32
    pad: int = 4  # RandomCrop padding used by the training augmentation
    fetch_hint: str = ""


DATASETS: Registry[DatasetInfo] = Registry("dataset")
DATASETS.register("cifar100", DatasetInfo("cifar100", lambda r, s: read_cifar(r, "cifar100", s), CIFAR100_MEAN, CIFAR100_STD))
DATASETS.register("cifar10", DatasetInfo("cifar10", lambda r, s: read_cifar(r, "cifar10", s), CIFAR10_MEAN, CIFAR10_STD))


@dataclass
class LoadedDataset:
    info: DatasetInfo
    train: ImageSet
    test: ImageSet

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def loaders(self, batch_size: int, test_batch_size: int, device) -> tuple[TensorLoader, TensorLoader]:
        i = self.info
        return (TensorLoader(self.train.images, self.train.labels, i.mean, i.std, batch_size, True, device, i.pad),
                TensorLoader(self.test.images, self.test.labels, i.mean, i.std, test_batch_size, False, device))


def load_dataset(name: str, root: str) -> LoadedDataset:
    info = DATASETS.get(name)
    return LoadedDataset(info, info.read(root, "train"), info.read(root, "test"))


__all__ = ["DATASETS", "DatasetInfo", "DatasetMissingError", "ImageSet", "LoadedDataset", "TensorLoader", "load_dataset"]
