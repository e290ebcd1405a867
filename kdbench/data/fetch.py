"""Obtain a dataset into the layout its reader expects: ``kdbench fetch NAME --root DIR``.

Each dataset's module supplies its fetch function (``DatasetInfo.fetch``): torchvision downloads
with MD5 checks for CIFAR, SVHN and STL-10; the cs231n archive (MD5 checked, unzipped, val
re-foldered) for Tiny-ImageNet; for ImageNet no download (it needs an image-net.org account) but
the unpacking of the official archives placed in ``DIR``. Existing files whose MD5 matches are not
downloaded again. A failed download or check ends with the dataset's how-to message (how to
place the files by hand). kdbench's readers do not check MD5 sums themselves (that would reject
the fixtures and synthetic files written in the same format).
"""

from __future__ import annotations

from pathlib import Path

from kdbench.data.base import DATASETS


def fetch(dataset: str, root: str) -> Path:
    if dataset not in DATASETS:
        raise SystemExit(f"kdbench cannot fetch {dataset!r}; valid: {', '.join(DATASETS.names())}. "
                         f"See the README's Datasets section for how to obtain it by hand.")
    info = DATASETS.get(dataset)
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        info.fetch(root)
    except (OSError, RuntimeError) as e:  # unreachable URL, bad checksum, missing archive
        raise SystemExit(f"kdbench fetch {dataset}: {e}\n{info.howto(root)}") from None
    return Path(root)
