"""Obtain datasets into the layout their readers expect, checking MD5 sums.

``kdbench fetch NAME --root DIR``:

===============  =============================================================================
cifar100/10      torchvision download (MD5 checked)
svhn             torchvision download of train/test ``*_32x32.mat`` (MD5 checked)
svhn_extra       as svhn, plus ``extra_32x32.mat`` (1.3 GB)
stl10            torchvision download of ``stl10_binary.tar.gz`` (MD5 checked), unpacked
tinyimagenet     ``tiny-imagenet-200.zip`` from cs231n (MD5 checked), unzipped, val re-foldered;
                 an already unzipped copy in ``DIR`` is only re-foldered
imagenet         no download (needs an image-net.org account): the three official archives placed
                 in ``DIR`` are MD5-checked and unpacked by torchvision into ``train/<wnid>``,
                 ``val/<wnid>``
===============  =============================================================================

Existing files whose MD5 matches are not downloaded again. kdbench's readers do not check MD5
sums themselves (that would reject the fixtures and synthetic files written in the same format).
"""

from __future__ import annotations

from pathlib import Path


def _svhn(root: str, splits) -> None:
    import torchvision.datasets as tvd
    for s in splits:
        tvd.SVHN(root, split=s, download=True)


def _stl10(root: str) -> None:
    import torchvision.datasets as tvd
    tvd.STL10(root, split="train", download=True)


def _tinyimagenet(root: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    from . import tinyimagenet as tin

    if not (Path(root) / tin.FOLDER / "wnids.txt").is_file():
        download_and_extract_archive(tin.URL, root, filename="tiny-imagenet-200.zip", md5=tin.MD5)
    moved = tin.refolder_val(root)
    classes = tin.wnids(root)
    print(f"tiny-imagenet-200: {len(classes)} classes; re-foldered {moved} val images into val/<wnid>/images/")


def _imagenet(root: str) -> None:
    import torchvision.datasets as tvd

    from .imagenet import howto

    try:
        for split in ("train", "val"):
            tvd.ImageNet(root, split=split)
    except RuntimeError as e:
        raise SystemExit(f"{e}\n{howto(root)}") from None


def _cifar(root: str, name: str) -> None:
    import torchvision.datasets as tvd
    cls = tvd.CIFAR100 if name == "cifar100" else tvd.CIFAR10
    cls(root, train=True, download=True)
    cls(root, train=False, download=True)


FETCHERS = {
    "cifar100": lambda root: _cifar(root, "cifar100"),
    "cifar10": lambda root: _cifar(root, "cifar10"),
    "svhn": lambda root: _svhn(root, ("train", "test")),
    "svhn_extra": lambda root: _svhn(root, ("train", "test", "extra")),
    "stl10": _stl10,
    "tinyimagenet": _tinyimagenet,
    "imagenet": _imagenet,
}


def fetch(dataset: str, root: str) -> Path:
    if dataset not in FETCHERS:
        raise SystemExit(f"kdbench cannot fetch {dataset!r}; valid: {', '.join(sorted(FETCHERS))}. "
                         f"See the README's Datasets section for how to obtain it by hand.")
    Path(root).mkdir(parents=True, exist_ok=True)
    FETCHERS[dataset](root)
    return Path(root)
