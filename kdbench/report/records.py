"""Run outputs of a suite's cells: their metrics.json and kernel-gap records, and how every table
counts them (:func:`run_status`: ok, failed or missing — never averaged unless ok)."""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

from kdbench.core.io import read_json, read_json_state
from kdbench.planning.checks import SuiteError

if TYPE_CHECKING:  # annotations only: `kdbench tables --help` loads no torch (the suite's registries do)
    from kdbench.planning.suite import Cell, Suite

ACCURACIES = ("acc_last", "acc_best", "acc5_last", "acc5_best")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def run_status(m: dict | None) -> str:
    """How a run counts in every table (``kdbench aggregate`` and ``kdbench tables`` alike):
    ``missing`` without a (readable) metrics.json; ``failed`` when its status is not ok, or when it
    finished with a non-finite accuracy (invalid: counted as failed, never in n); else ``ok``."""
    if m is None:
        return "missing"
    if m.get("status") != "ok" or any(m.get(k) is not None and not _finite(m[k]) for k in ACCURACIES):
        return "failed"
    return "ok"


def from_accuracy(metric: str, top1: float | None, top5: float | None) -> float | None:
    """A table metric's value (acc | acc5 | err | err5, _last | _best) from the top-1 and top-5
    accuracies; None where the accuracy it needs is None, and for kernel-gap metrics."""
    kind = metric.split("_")[0]
    acc = None if kind == "kernel" else top5 if kind.endswith("5") else top1
    return None if acc is None else 100 - acc if kind.startswith("err") else acc


def imported_teachers(suite: Suite, cell: Cell) -> tuple[str, ...]:
    """The teacher files a distilled cell was given (``teacher_checkpoints``: no teacher runs), else ()."""
    run = suite.runs[cell.run]
    return tuple(run.spec.teacher_ckpts) if run.kind == "distill" and not run.needs else ()


@functools.cache
def imported_accuracy(path: str) -> tuple[float | None, float | None] | None:
    """(top-1, top-5) measured when a teacher file was imported (``kdbench import-teacher
    --check-data``; (None, None) if imported without the data), or None if the file cannot be read."""
    from kdbench.engine.checkpoint import MODEL_FORMAT, CheckpointError, read_file
    try:
        imported = read_file(path, MODEL_FORMAT)["meta"].get("imported") or {}
    except CheckpointError:
        return None
    return imported.get("measured_top1"), imported.get("measured_top5")


def teachers_of(rec: "Records", cell: Cell) -> list[str]:
    """What a cell's model is compared with: its own teachers (distilled runs), else the teachers
    of its experiment's pair (plain students); run folders, or model files for imported teachers."""
    suite = rec.suite
    run = suite.runs[cell.run]
    if run.kind == "distill":
        return [suite.run_dir(t) for t in run.needs] if run.needs else list(run.spec.teacher_ckpts)
    same = rec.index.get((cell.dataset, cell.teacher, cell.student), [])
    tcells = [c for c in same if c.experiment == cell.experiment and c.column == "teacher"]
    if tcells:
        return [suite.run_dir(c.run) for c in tcells]
    other = next((suite.runs[c.run] for c in same if c.experiment == cell.experiment
                  and suite.runs[c.run].kind == "distill"), None)
    return list(other.spec.teacher_ckpts) if other else []


def diagnostics_path(suite: Suite, run_id: str, teachers: list[str]) -> str:
    """The ``kdbench kernel-gap`` record of a run against these teachers."""
    key = hashlib.sha256("\n".join(teachers).encode()).hexdigest()[:8]
    return f"{suite.run_dir(run_id)}/diagnostics-{key}.json"


class Records:
    """The suite's cells indexed by (dataset, teacher, student), and cached reads of
    metrics.json and kernel-gap records."""

    def __init__(self, suite: Suite):
        self.suite = suite
        self.index: dict[tuple, list[Cell]] = {}
        for c in suite.cells:
            self.index.setdefault((c.dataset, c.teacher, c.student), []).append(c)

    @functools.cache
    def metrics(self, run_id: str) -> dict | None:
        """A run's metrics.json (None: missing or unreadable)."""
        return read_json_state(Path(self.suite.run_dir(run_id)) / "metrics.json")[0]  # corrupt: as missing

    @functools.cache
    def diag(self, path: str) -> dict | None:
        """A kernel-gap record (None: missing or unreadable)."""
        return read_json(Path(path))

    def value(self, cell: Cell, metric: str) -> tuple[str, float | None]:
        """(status, value) of one seed of one cell: ok / failed / missing, as :func:`run_status`."""
        m = self.metrics(cell.run)
        status = run_status(m)
        if status != "ok":
            return status, None
        if metric.startswith("kernel_gap"):
            d = self.diag(diagnostics_path(self.suite, cell.run, teachers_of(self, cell)))
            if d is None or d.get("status") != "ok":
                return "missing", None
            v = d["kernel_gap"][metric.removeprefix("kernel_gap_")]
        else:
            stat = metric.split("_")[1]  # last | best
            v = from_accuracy(metric, m.get(f"acc_{stat}"), m.get(f"acc5_{stat}"))
        if v is None:
            return "missing", None
        return ("ok", float(v)) if _finite(v) else ("failed", None)


def ensemble_source(suite: Suite, cells: list[Cell]) -> tuple[str, list[str]] | None:
    """(first teacher's run, all teacher run folders) of a group: the teacher-ensemble record is
    ``kdbench kernel-gap`` of the first teacher against all of them (its ``teacher`` accuracy)."""
    teachers = list(dict.fromkeys(c.run for c in sorted(cells, key=lambda c: c.seed) if c.column == "teacher"))
    if not teachers:
        return None
    return teachers[0], [suite.run_dir(t) for t in teachers]



def group_cells(rec: Records, group, column: str) -> list[Cell]:
    """The cells of ``column`` in a table group (a :class:`~kdbench.report.paper_layout.Group`), one per seed."""
    cells = [c for c in rec.index.get((group.dataset, *group.pair), [])
             if c.experiment in group.experiments and c.column == column]
    by_seed: dict[int, Cell] = {}
    for c in cells:  # the same run through two experiments counts once
        if by_seed.setdefault(c.seed, c).run != c.run:
            raise SuiteError(f"group {group.label!r}, column {column!r}: seed {c.seed} is two different runs "
                             f"({by_seed[c.seed].run}, {c.run}); give the group one experiment")
    return list(by_seed.values())
