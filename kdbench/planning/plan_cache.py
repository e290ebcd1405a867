"""The Snakefile's plan, computed once by the main ``snakemake`` process and read back by every job's
re-parse of the Snakefile (``snakemake --mode remote`` under a cluster executor), which then loads
neither the suite nor torch, pandas or matplotlib.

Every value the workflow's rules are built from (run ids, inputs, job sizes, packs, table outputs)
goes through :meth:`Plan.value`: the main process computes it from the suite and keeps it; at the
end of its parse it writes them all to ``.snakemake/kdbench-plans/<key>.json`` in the working
directory, ``<key>`` being a hash of the suite file's path and the ``--config`` values, which the
jobs of that invocation are given unchanged. A job's parse reads that file and takes every value
from it, so its rules are those the main process planned. Each plan holds the SHA-256 of every
file the values follow from (the suite file, the suites it includes or a table's ``like:`` names,
and kdbench's own sources, schemas and reference files); if any differs when a job reads it, or
the file is missing or unreadable, or the suite ``imports:`` modules (whose files are not tracked),
the job's parse loads the suite as the main process did.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

PLAN_DIR = Path(".snakemake/kdbench-plans")
PACKAGE = Path(__file__).resolve().parents[1]  # kdbench/
_PACKAGE_SOURCES = ("**/*.py", "**/*.yaml", "**/*.csv", "**/*.json")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: a job's parse reads the suites too


def plan_path(suite_file: str | Path, config: dict) -> Path:
    """Where the plan of this suite and these ``--config`` values is written (working-directory relative)."""
    key = json.dumps({"suite": str(Path(suite_file).resolve()), "config": config}, sort_keys=True, default=str)
    return PLAN_DIR / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def suite_sources(suite_file: str | Path) -> list[Path] | None:
    """The suite file and every suite file it reaches through ``include:`` and tables' ``like:``;
    None when one of them ``imports:`` modules (untracked files: such a suite is always loaded)."""
    todo, seen = [Path(suite_file).resolve()], []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        cfg = yaml.load(path.read_text(), Loader=_LOADER) or {}
        if cfg.get("imports"):
            return None
        todo += [(path.parent / inc).resolve() for inc in cfg.get("include") or []]
        todo += [(path.parent / t["like"]["suite"]).resolve() for t in cfg.get("tables") or []
                 if isinstance(t.get("like"), dict) and "suite" in t["like"]]
    return seen


def digests(suite_file: str | Path) -> dict[str, str] | None:
    """SHA-256 of every file a plan follows from (:func:`suite_sources` and kdbench's own files)."""
    suites = suite_sources(suite_file)
    if suites is None:
        return None
    package = sorted({p for pattern in _PACKAGE_SOURCES for p in PACKAGE.glob(pattern) if "__pycache__" not in p.parts})
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in suites + package}


class Plan:
    """The values of one invocation's plan: computed (main process) or read back (a job's parse)."""

    def __init__(self, suite_file: str | Path, config: dict, load_suite, reuse: bool):
        self.suite_file, self.path, self._load = str(suite_file), plan_path(suite_file, config), load_suite
        self._suite = None
        self.values: dict = {}
        self.reused = reuse and self._read()

    def _read(self) -> bool:
        try:
            saved = json.loads(self.path.read_text())
            if saved["sources"] is None or saved["sources"] != digests(self.suite_file):
                return False
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            return False
        self.values = saved["values"]
        return True

    @property
    def suite(self):
        """The suite (loaded on first use: never when every value was read back)."""
        if self._suite is None:
            self._suite = self._load(self.suite_file)
        return self._suite

    def value(self, key: str, compute):
        """The plan's ``key``: read back, or ``compute()`` (JSON values) kept for :meth:`write`."""
        if not self.reused:
            # through JSON here too, so that the main process builds its rules from what a job reads
            self.values[key] = json.loads(json.dumps(compute()))
        return self.values[key]

    def write(self) -> None:
        """Write the plan (atomically, and only where it changed) for the jobs of this invocation."""
        from kdbench.core.io import atomic_write_bytes

        text = json.dumps({"suite": self.suite_file, "sources": digests(self.suite_file), "values": self.values},
                          sort_keys=True)
        try:
            if self.path.read_text() == text:
                return
        except OSError:
            pass
        atomic_write_bytes(self.path, text.encode())
