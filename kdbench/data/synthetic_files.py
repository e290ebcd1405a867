"""Write a suite's synthetic dataset to disk once, in the dataset's real format.

The 32×32 class-conditional images of :mod:`kdbench.data.synthetic` go through the dataset's own
writer (``DatasetInfo.write_synthetic``), which upsamples them to its native size where that is
larger (STL-10 96 px, Tiny-ImageNet and ImageNet 64-px JPEGs)."""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.io import atomic_write_json
from .base import DATASETS
from .synthetic import make_synthetic

MARKER = "kdbench-synthetic.json"


def ensure_synthetic(dataset: str, root: str, params: dict) -> Path:
    """Generate (or keep, if the same parameters were used) synthetic ``dataset`` under ``root``."""
    writable = [n for n in DATASETS if DATASETS.get(n).write_synthetic is not None]
    if dataset not in writable:
        raise ValueError(f"no synthetic writer for {dataset!r}; valid: {', '.join(writable)}")
    marker = Path(root) / MARKER
    record = {"dataset": dataset, **params}
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return marker
    train, test = make_synthetic(**params)
    DATASETS.get(dataset).write_synthetic(root, train, test)
    atomic_write_json(marker, record)
    return marker
