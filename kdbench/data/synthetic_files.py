"""Write a suite's synthetic dataset to disk once, in the dataset's real format."""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.io import atomic_write_json
from .cifar import ImageSet, write_cifar
from .resize import resize_uint8
from .synthetic import make_synthetic

MARKER = "kdbench-synthetic.json"


def _at(s: ImageSet, size: int) -> ImageSet:
    """The 32×32 synthetic images upsampled to a dataset's native size."""
    return ImageSet(resize_uint8(s.images, size), s.labels, s.classes)


def _svhn(root, tr, te):
    from .svhn import write_svhn
    write_svhn(root, "train", tr)
    write_svhn(root, "test", te)
    write_svhn(root, "extra", ImageSet(tr.images[: len(tr.labels) // 4], tr.labels[: len(tr.labels) // 4], tr.classes))


def _stl10(root, tr, te):
    from .stl10 import write_stl10
    unl = _at(tr, 96)
    write_stl10(root, {"train": _at(tr, 96), "test": _at(te, 96),
                       "unlabeled": ImageSet(unl.images, unl.labels * 0 - 1, tr.classes)}, tr.classes)


def _tiny(root, tr, te):
    from .tinyimagenet import write_tinyimagenet
    write_tinyimagenet(root, _at(tr, 64), _at(te, 64))


def _imagenet(root, tr, te):
    from .imagenet import write_imagenet
    write_imagenet(root, _at(tr, 64), _at(te, 64))


#: synthetic writers: the 32×32 class-conditional images, in each dataset's real format (SVHN's
#: ``extra`` is the first quarter of train; STL-10's ``unlabeled`` is train without labels;
#: Tiny-ImageNet and ImageNet are JPEG files upsampled to 64×64)
WRITERS = {"cifar100": lambda root, tr, te: write_cifar(root, "cifar100", tr, te),
           "cifar10": lambda root, tr, te: write_cifar(root, "cifar10", tr, te),
           "svhn": _svhn, "svhn_extra": _svhn, "stl10": _stl10, "tinyimagenet": _tiny, "imagenet": _imagenet}


def ensure_synthetic(dataset: str, root: str, params: dict) -> Path:
    """Generate (or keep, if the same parameters were used) synthetic ``dataset`` under ``root``."""
    if dataset not in WRITERS:
        raise ValueError(f"no synthetic writer for {dataset!r}; valid: {', '.join(sorted(WRITERS))}")
    marker = Path(root) / MARKER
    record = {"dataset": dataset, **params}
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return marker
    train, test = make_synthetic(**params)
    WRITERS[dataset](root, train, test)
    atomic_write_json(marker, record)
    return marker
