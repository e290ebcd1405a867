"""What a selection of a suite's tables reads (``snakemake --config tables=crd_table1,crd_table2``):
the runs (and, through ``family``, the kernel-gap records) the Snakefile then plans, and nothing else.

A seed table (``kdbench aggregate``, ``kdbench figures --seed-tables``) reads the runs of its
experiments. A paper table (``kdbench tables``, ``kdbench figures``) reads the runs of its cells,
and also those of every table that owns one of its tests: a test shown by several tables is
adjusted in the family of the first table that plans it (:func:`kdbench.stats.comparisons.adjust`),
so its adjusted p depends on every test of that family, that is on the owner table's cells. (An
owner's family holds only tests of the owner's own cells, so one step reaches all of them.) Which
runs a cell has and which table owns a test follow from the suite alone: they are computed here
without reading any run output.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdbench.core.names import did_you_mean
from kdbench.planning.suite import Suite, SuiteError
from kdbench.report.paper_layout import is_paper_table
from kdbench.report.paper_tables import compute_tables
from kdbench.report.records import Records


@dataclass(frozen=True)
class Selection:
    """The chosen tables (in the suite's order) and what they read."""

    tables: tuple[str, ...]
    paper: tuple[str, ...]  # those of them that are paper tables (``kdbench tables``)
    family: tuple[str, ...]  # the paper tables whose tests they show: theirs and the tests' owners
    runs: frozenset[str]  # run ids whose metrics.json they read (their teachers come with them)


def table_names(suite: Suite) -> list[str]:
    """Every table of the suite (seed and paper); a suite without ``tables:`` has ``summary``."""
    return [t["name"] for t in _tables(suite)]


def _tables(suite: Suite) -> list[dict]:
    return suite.config.get("tables") or [{"name": "summary", "experiments": list(suite.experiment_runs)}]


class _Unread(Records):
    """Records as if no run had finished: a cell's runs and a test's family without any file read."""

    def metrics(self, run_id: str):
        return None

    def diag(self, path: str):
        return None


def select_tables(suite: Suite, names: list[str]) -> Selection:
    """The tables ``names`` and what they read; an unknown name is refused with the valid ones."""
    valid = table_names(suite)
    for name in names:
        if name not in valid:
            raise SuiteError(f"--config tables: {suite.path} has no table {name!r}.{did_you_mean(name, valid)} "
                             f"Its tables: {', '.join(valid)}")
    chosen = [t for t in _tables(suite) if t["name"] in names]
    runs = {c.run for c in suite.cells if any(c.experiment in t["experiments"] for t in chosen)}
    paper = [t["name"] for t in chosen if is_paper_table(t)]
    family = set()
    if paper:
        computed = {r.spec.name: r for r in compute_tables(suite, _Unread(suite))}
        family = set(paper) | {c.owner for name in paper for c in computed[name].comparisons}
        runs |= {r for name in family for cell in computed[name].cells for r in cell.run_ids if r in suite.runs}
    order = [t["name"] for t in _tables(suite)]
    return Selection(tuple(t["name"] for t in chosen), tuple(paper), tuple(n for n in order if n in family),
                     frozenset(runs))
