"""The dataset registry. Each dataset's module registers what kdbench needs to know about it.

A dataset is one :class:`DatasetInfo`: how its files are read, its normalisation and training
augmentation, its image size, how ``kdbench fetch`` obtains it, how the synthetic data of the
smoke suite and the tests is written in its format, and how to get it by hand. Adding a dataset
is one new module in :mod:`kdbench.data` that calls :func:`register_dataset` (the package
imports every module, as :mod:`kdbench.methods` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kdbench.core.registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    read: Callable[[str, str], object]  # (root, split) -> ImageSet (uint8 arrays) or FileImageSet (streamed)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    howto: Callable[[str], str]  # (root) -> how to obtain the files (``kdbench fetch`` or by hand)
    fetch: Callable[[str], None]  # (root) -> download / unpack into the layout ``read`` expects
    write_synthetic: Callable | None = None  # (root, train, test) 32×32 ImageSets -> files in the real format
    image_size: int = 32
    pad: int = 4  # RandomCrop zero padding of the training augmentation (views: 2·(2·pad+1)²)
    flip: bool = True  # random horizontal flips in training (not for digits)
    streaming: bool = False  # files decoded by worker processes (ImageNet) instead of a device tensor
    resize: int = 0  # streaming test transform: resize the short side to this, then centre-crop image_size
    train_size: int = 50000  # official training-set size (job resource estimates; no data needed)
    splits: tuple[str, ...] = ("train", "test")  # what ``read`` reads (``load_stream``'s choices)


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def register_dataset(*infos: DatasetInfo) -> None:
    for info in infos:
        DATASETS.register(info.name, info)
