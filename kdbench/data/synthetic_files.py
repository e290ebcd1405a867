"""Write a suite's synthetic dataset to disk once, in the dataset's real format.

The 32×32 class-conditional images of :mod:`kdbench.data.synthetic` go through the dataset's own
writer (``DatasetInfo.write_synthetic``), which upsamples them to its native size where that is
larger (STL-10 96 px, Tiny-ImageNet and ImageNet 64-px JPEGs).

The marker ``kdbench-synthetic.json`` is the Snakemake output, and Snakemake deletes it before it
reruns the job, e.g. when a second invocation that shares the data root planned the job before
the first one finished it. So the files written are also recorded apart (``WRITTEN``, with their
sizes): the same parameters with every file in place only restore the marker, and never rewrite
in place the files that another pipeline's runs are reading. One writer at a time (``flock``)."""

from __future__ import annotations

import fcntl
from pathlib import Path

from kdbench.core.io import atomic_write_json, read_json
from kdbench.data.base import DATASETS
from kdbench.data.synthetic import make_synthetic

MARKER = "kdbench-synthetic.json"
WRITTEN = ".kdbench-synthetic-written.json"
LOCK = ".kdbench-synthetic.lock"


def ensure_synthetic(dataset: str, root: str, params: dict) -> Path:
    """Generate (or keep, if the same parameters were used) synthetic ``dataset`` under ``root``."""
    writable = [n for n in DATASETS if DATASETS.get(n).write_synthetic is not None]
    if dataset not in writable:
        raise ValueError(f"no synthetic writer for {dataset!r}; valid: {', '.join(writable)}")
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    marker = root_path / MARKER
    record = {"dataset": dataset, **params}
    with open(root_path / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_json(marker) == record:
            return marker
        written = read_json(root_path / WRITTEN) or {}
        if written.get("record") != record or _sizes(root_path) != written.get("files"):
            train, test = make_synthetic(**params)
            DATASETS.get(dataset).write_synthetic(root, train, test)
            atomic_write_json(root_path / WRITTEN, {"record": record, "files": _sizes(root_path)})
        atomic_write_json(marker, record)
    return marker


def _sizes(root: Path) -> dict[str, int]:
    """{relative path: size} of the dataset's files under ``root`` (not kdbench's own three)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (MARKER, WRITTEN, LOCK)}
