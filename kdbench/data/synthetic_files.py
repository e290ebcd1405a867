"""Write a suite's synthetic dataset to disk once, in the dataset's real format."""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.io import atomic_write_json
from .cifar import write_cifar
from .synthetic import make_synthetic

MARKER = "kdbench-synthetic.json"
WRITERS = {"cifar100": lambda root, tr, te: write_cifar(root, "cifar100", tr, te),
           "cifar10": lambda root, tr, te: write_cifar(root, "cifar10", tr, te)}


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
