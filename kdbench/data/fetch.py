"""Download datasets into their official layout through torchvision (which checks MD5 sums)."""

from __future__ import annotations

from pathlib import Path


def fetch(dataset: str, root: str) -> Path:
    import torchvision.datasets as tvd

    fetchers = {
        "cifar100": lambda: tvd.CIFAR100(root, train=True, download=True) and tvd.CIFAR100(root, train=False, download=True),
        "cifar10": lambda: tvd.CIFAR10(root, train=True, download=True) and tvd.CIFAR10(root, train=False, download=True),
    }
    if dataset not in fetchers:
        raise SystemExit(f"kdbench cannot download {dataset!r}; downloadable: {', '.join(sorted(fetchers))}. "
                         f"See the README's Datasets section for how to obtain it by hand.")
    fetchers[dataset]()
    return Path(root)
