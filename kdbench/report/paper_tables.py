"""``kdbench tables``: every paper table in the paper's layout, published value beside reproduced.

The parts, one place each: :mod:`.paper_layout` (a suite's ``tables:`` item → :class:`TableSpec`,
the table keys), :mod:`.records` (run outputs and how they count), :mod:`.verdict` (did the cell
reproduce the published number), :mod:`.comparisons` (which methods are tested against which, and
the corrections), :mod:`.format` (cell text, caption, markdown and CSV). This module computes a
table (:func:`compute`) and writes a suite's tables, and checks published.csv's coverage.

Each cell reports mean ± 95% t-interval half-width (n ok seeds), its failed and missing runs,
the published value as printed (with its spread's type and run count), Δ = reproduced −
published with its 90% CI and the reproduction verdict (statistics.md §1; none in a stand-in).
Outputs per table, under ``--out``: ``<name>.md`` (caption, paper-layout table, paired tests),
``<name>.csv`` (paper layout, numeric columns per group) and ``<name>_cells.csv`` (one row per
cell with every statistic).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import yaml

from kdbench.planning.checks import SuiteError

if TYPE_CHECKING:  # annotations only: `kdbench tables --help` loads no torch (the suite's registries do)
    from kdbench.planning.suite import Suite
from kdbench.stats.ci import mean_ci
from kdbench.stats.comparisons import (DIFFERENCE, NONINFERIOR, PRIMARY, ClaimTest, Comparison, SeedsPlan, adjust,
                                      planned_pairs, seeds_plan, comparison_key)
from kdbench.report.format import caption, cell_text, cells_frame, layout_frame, markdown  # noqa: F401  (re-exported)
from kdbench.stats.paired import PairedTest, paired_test
from kdbench.report.paper_layout import (METRICS, TRAINED_TEACHER_NOTE, UNPAIRED, Group, TableSpec, resolve,  # noqa: F401
                           table_specs)
from kdbench.report.records import (Records, diagnostics_path, ensemble_source, from_accuracy, group_cells,  # noqa: F401
                      imported_accuracy, imported_teachers, teachers_of)
from kdbench.stats.verdict import Verdict, published_sd, reproduction_verdict

REFERENCE = Path(__file__).resolve().parent.parent / "reference"
PUBLISHED_CSV = REFERENCE / "published.csv"
COVERAGE_YAML = REFERENCE / "coverage.yaml"


@dataclass
class CellStat:
    """One cell of a paper table: the reproduced seeds, the published value and the verdict."""

    row: str
    group: str
    column: str
    metric: str
    values: dict  # seed -> value (ok runs)
    run_ids: tuple  # every run of the cell (a paired test's identity)
    n_expected: int
    n_failed: int
    n_missing: int
    mean: float
    sd: float
    lo: float
    hi: float
    published: float | None = None
    published_text: str = ""  # exactly as printed (72.50 stays 72.50)
    spread_text: str = ""
    spread_type: str = "none"  # ci95 | sd | unknown | none
    published_n: int | None = None  # the paper's run count, where known
    published_row: int | None = None
    check: Verdict | None = None  # None: no published value, or a stand-in
    comparison: Comparison | None = None  # this row − the table's reference (figures read it)
    sequential: str = ""  # the looks' decision of this reproduction, where a budget's looks added seeds

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def delta(self) -> float:
        return self.mean - self.published if self.published is not None and self.n else math.nan

    @property
    def test(self) -> PairedTest | None:
        return self.comparison.test if self.comparison else None

    @property
    def p_adj(self) -> float:
        """The comparison's adjusted p (Holm in the primary family, BH otherwise: ``comparison.correction``)."""
        return self.comparison.p_adj if self.comparison else math.nan

    @property
    def verdict(self) -> str:
        """The reproduction verdict, or why there is none."""
        if self.n_expected == 0:
            return "n/a" if self.published is None else "not in suite"
        if self.n == 0:
            return "no finished runs"
        if self.published is None:
            return "no published value"
        if self.check is None:
            return "stand-in: no verdict"
        return self.check.verdict or self.check.reason


@dataclass
class TableResult:
    """A computed table: its cells, its paired comparisons and the prospective seeds needed."""

    spec: TableSpec
    cells: list[CellStat]
    paper_title: str
    comparisons: list[Comparison]
    seeds_plan: SeedsPlan | None

    def cell(self, row: str, group: str) -> CellStat:
        return next(c for c in self.cells if c.row == row and c.group == group)


@functools.cache
def published_table() -> pd.DataFrame:
    """published.csv with ``value`` and ``spread`` as printed (strings) and ``paper_key``."""
    df = pd.read_csv(PUBLISHED_CSV, dtype={"value": str, "spread": str}, keep_default_na=False,
                     na_values={"n_runs": [""]})
    df["paper_key"] = df.paper.str.split().str[0]
    return df


def match_published(filt: dict) -> pd.DataFrame:
    """The published.csv rows matching ``filt`` (``paper`` matches the paper's first word)."""
    df = published_table()
    mask = pd.Series(True, index=df.index)
    for k, v in filt.items():
        mask &= (df.paper_key == v) if k == "paper" else (df[k].astype(str) == str(v))
    return df[mask]


def _published_filter(spec: TableSpec, group: Group, label: str) -> dict:
    return {"metric": METRICS[group.metric][1], **spec.published, **group.published, "method": label,
            **spec.rows[label]["published"]}


def _seed_values(suite: Suite, records: Records, g: Group, column: str):
    """({seed: value} of the ok runs, run ids, expected, failed, missing) of one cell."""
    values, failed, missing = {}, 0, 0
    if column == "teacher_ensemble":  # one value: the ensemble's averaged-probability accuracy
        src = ensemble_source(suite, group_cells(records, g, "teacher"))
        if src is None:
            return values, (), 0, 0, 0
        d = records.diag(diagnostics_path(suite, src[0], src[1]))
        top1 = d["teacher"]["top1"] if d is not None and d.get("status") == "ok" else None
        if top1 is not None and math.isfinite(top1):
            values[0] = top1 if g.metric.startswith("acc") else 100 - top1
        return values, (src[0],), 1, 0, 0 if values else 1
    cells = group_cells(records, g, column)
    if column == "teacher" and not cells:
        return _imported_teacher_values(records, g)
    for c in cells:
        status, v = records.value(c, g.metric)
        if status == "ok":
            values[c.seed] = v
        elif status == "missing":
            missing += 1
        else:
            failed += 1
    return values, tuple(sorted(c.run for c in cells)), len(cells), failed, missing


def _imported_teacher_values(records: Records, g: Group):
    """The teacher row of a group whose teachers are files (``teacher_checkpoints``): the accuracy
    measured when each file was imported (``kdbench import-teacher --check-data``), one value per
    file like a trained teacher's seeds; a file imported without the data counts as missing. A
    kernel-gap metric has no teacher value."""
    cells = [c for c in records.index.get((g.dataset, *g.pair), []) if c.experiment in g.experiments]
    paths = next(filter(None, (imported_teachers(records.suite, c) for c in cells)), ())
    values, missing = {}, 0
    for i, path in enumerate(paths):
        v = from_accuracy(g.metric, *(imported_accuracy(path) or (None, None)))
        if v is None:
            missing += 1
        else:
            values[i] = v
    return values, tuple(paths), len(paths), 0, missing


def _cell(spec: TableSpec, suite: Suite, records: Records, g: Group, label: str, column: str) -> CellStat:
    values, runs, expected, failed, missing = _seed_values(suite, records, g, column)
    ci = mean_ci(list(values.values()))
    cs = CellStat(label, g.label, column, g.metric, values, runs, expected, failed, missing, ci.mean, ci.std, ci.lo, ci.hi)
    pub = match_published(_published_filter(spec, g, label))
    if len(pub) > 1:
        raise SuiteError(f"table {spec.name!r}, {label!r} / {g.label!r}: the published filter matches "
                         f"{len(pub)} rows of published.csv ({list(pub.index)}); make it more specific")
    if len(pub) == 1:
        r = pub.iloc[0]
        cs.published, cs.published_text, cs.published_row = float(r.value), r.value, int(pub.index[0])
        cs.spread_text, cs.spread_type = r.spread, r.spread_type
        cs.published_n = None if pd.isna(r.n_runs) else int(r.n_runs)
        if spec.stand_in is None and cs.n:
            spread = published_sd(float(r.spread) if r.spread else None, r.spread_type, cs.published_n, spec.default_n)
            cs.check = reproduction_verdict(values.values(), cs.published, spread, spec.margin_for(g))
    return cs


def _comparison(spec: TableSpec, g: Group, ca: CellStat, cb: CellStat, group: str, family: str,
                claim: ClaimTest | None) -> Comparison:
    """Row ``ca`` − row ``cb`` paired by seed. A teacher side with one value (a teacher ensemble's
    accuracy) is a constant the students' seeds are tested against (one-sample t, conditional on
    that teacher, as every student interval is)."""
    b_values = cb.values
    if cb.column in UNPAIRED and len(cb.values) == 1:
        b_values = dict.fromkeys(ca.values, next(iter(cb.values.values())))
    hypothesis = claim.hypothesis if claim else DIFFERENCE
    margin = math.nan
    if hypothesis == NONINFERIOR:
        margin = float(claim.margin if claim.margin is not None else spec.margin_for(g))
    key = comparison_key(g.metric, hypothesis, ca.run_ids, cb.run_ids, margin)  # the same runs on another metric: another test
    return Comparison(ca.row, cb.row, group, family, key, paired_test(ca.values, b_values), claim=claim.claim if claim else "",
                      hypothesis=hypothesis, margin=margin, sign=spec.sign(g), owner=spec.name,
                      cells=((ca.row, ca.group), (cb.row, cb.group)))


def _comparisons(spec: TableSpec, cells: list[CellStat]) -> list[Comparison]:
    """The planned paired tests of every group (:func:`kdbench.stats.comparisons.planned_pairs`) and
    the claims across groups, not yet adjusted (:func:`compute_tables` adjusts a suite's at once)."""
    out = []
    cell_of = {(c.row, c.group): c for c in cells if c.n_expected}
    for g in spec.groups:
        by_row = {c.row: c for c in cells if c.group == g.label and c.n_expected}
        ref = next((r for r, c in by_row.items() if c.column == spec.reference), None)
        unpaired = {r for r, c in by_row.items() if c.column in UNPAIRED or c.column == spec.reference}
        for a, b, family, claim in planned_pairs(list(by_row), spec.primary, ref, unpaired, g.label):
            out.append(_comparison(spec, g, by_row[a], by_row[b], g.label, family, claim))
    groups = {g.label: g for g in spec.groups}
    for t in spec.primary:
        ca, cb = cell_of.get((t.a, t.a_group)), cell_of.get((t.b, t.b_group))
        if t.across_groups and ca and cb:
            out.append(_comparison(spec, groups[t.a_group], ca, cb, f"{t.a_group} vs {t.b_group}", PRIMARY, t))
    return out


def _attach(spec: TableSpec, cells: list[CellStat], comparisons: list[Comparison]) -> None:
    """Each cell keeps its (adjusted) comparison with the reference row of its group."""
    refs = {g.label: next((c.row for c in cells if c.group == g.label and c.n_expected and c.column == spec.reference), None)
            for g in spec.groups}
    cell_of = {(c.row, c.group): c for c in cells}
    for k in comparisons:
        if k.group in refs and k.b == refs[k.group]:
            cell_of[(k.a, k.group)].comparison = k


def looks_test_id(owner: str, a: str, b: str, group: str) -> str:
    """The id under which ``kdbench looks`` records a primary test (kdbench.commands.looks)."""
    return f"{owner}: {a} − {b} ({group})"


def reproduction_test_id(table: str, row: str, group: str) -> str:
    """The id under which ``kdbench looks`` records a reproduction verdict."""
    return f"published ({table}: {row} / {group})"


def _looks_state(suite: Suite) -> tuple[dict, dict]:
    """(run -> experiment of a budgeted experiment with looks taken, test id -> its last decision)."""
    from kdbench.planning.budget import read_state
    state = {k: v for k, v in read_state(suite.config).items() if isinstance(v, dict)}
    exp_of = {c.run: c.experiment for c in suite.cells if c.experiment in state}
    return exp_of, {d.get("test"): d for st in state.values() for d in st.get("decisions", [])}


def _sequential(suite: Suite, tables: list[str], comparisons: list[Comparison]) -> list[Comparison]:
    """Comparisons on runs of a budgeted experiment (seeds added by looks) carry the looks' decision
    instead of a fixed-n p: the last decision recorded for the test, or why there is none.
    ``tables[i]`` is the table ``comparisons[i]`` was planned in."""
    exp_of, decided = _looks_state(suite)
    if not exp_of:
        return comparisons
    home = {c.key: looks_test_id(c.owner, c.a, c.b, c.group) for t, c in zip(tables, comparisons)
            if c.owner == t and c.family == PRIMARY}
    out = []
    for c in comparisons:
        if not any(r in exp_of for side in c.key[2:4] if isinstance(side, tuple) for r in side):
            out.append(c)
            continue
        d = decided.get(home.get(c.key))
        text = (f"looks: {d['decision']} (look {d['look']}, n = {d['n']})" if d else
                "looks: not in the family the looks decide (adaptive n: no valid fixed-n p)")
        out.append(replace(c, sequential=text))
    return out


def compute_tables(suite: Suite, records: Records | None = None, specs: list[TableSpec] | None = None) -> list[TableResult]:
    """Every paper table of the suite (``specs``: these instead of :func:`table_specs`'), adjusted
    together: a test several tables show is one test of one family, with one adjusted p
    (:func:`kdbench.stats.comparisons.adjust`)."""
    records = records or Records(suite)
    specs = table_specs(suite) if specs is None else specs
    raw = []
    for spec in specs:
        cells = [_cell(spec, suite, records, g, label, column) for g, label, column in spec.cells()]
        raw.append((spec, cells, _comparisons(spec, cells)))
    tables = [spec.name for spec, _, cs in raw for _ in cs]
    adjusted = iter(_sequential(suite, tables, adjust([c for _, _, cs in raw for c in cs])))
    exp_of, decided = _looks_state(suite)
    out = []
    for spec, cells, comparisons in raw:
        comparisons = [next(adjusted) for _ in comparisons]
        for c in cells:
            d = decided.get(reproduction_test_id(spec.name, c.row, c.group)) if exp_of else None
            if d and c.check is not None:
                c.sequential = f"looks: {d['decision']} (look {d['look']}, n = {d['n']})"
        _attach(spec, cells, comparisons)
        mine = [c for c in comparisons if c.owner == spec.name]
        plan = (seeds_plan(comparisons, spec.margin_for(spec.groups[0]), spec.alpha, owner=spec.name)
                if spec.primary and mine else None)
        paper = spec.published.get("paper")
        titles = published_table().loc[published_table().paper_key == paper, "paper"] if paper else []
        out.append(TableResult(spec, cells, titles.iloc[0] if len(titles) else (paper or ""), comparisons, plan))
    return out


def compute(spec: TableSpec, suite: Suite, records: Records | None = None) -> TableResult:
    """Every cell of ``spec`` from the suite's run outputs, its verdict, and the table's paired tests,
    adjusted together with the suite's other tables (:func:`compute_tables`)."""
    others = [s for s in table_specs(suite) if s.name != spec.name]
    return next(r for r in compute_tables(suite, records, others + [spec]) if r.spec is spec)


def diagnostic_targets(suite: Suite, only: list[str] | None = None) -> dict[str, tuple[str, list[str]]]:
    """``kdbench kernel-gap`` records the paper tables (``only``: these) read: {path: (run id, teachers)}."""
    out, rec = {}, Records(suite)
    for spec in table_specs(suite, only):
        for g, _, column in spec.cells():
            if column == "teacher_ensemble":
                src = ensemble_source(suite, group_cells(rec, g, "teacher"))
                if src:
                    out[diagnostics_path(suite, *src)] = src
            elif g.metric.startswith("kernel_gap"):
                for c in group_cells(rec, g, column):
                    teachers = teachers_of(rec, c)
                    out[diagnostics_path(suite, c.run, teachers)] = (c.run, teachers)
    return out


def write_tables(suite: Suite, out_dir: str | Path, only: list[str] | None = None) -> dict[str, Path]:
    """Write ``<table>.md``, ``.csv`` and ``_cells.csv`` of the suite's paper tables into ``out_dir``."""
    from kdbench.core.io import atomic_write_bytes
    out, written = Path(out_dir), {}
    wanted = {s.name for s in table_specs(suite, only)}
    for res in compute_tables(suite):
        spec = res.spec
        if spec.name not in wanted:
            continue
        for suffix, data in ((".md", markdown(res)), (".csv", layout_frame(res).to_csv(index=False, float_format="%.4f")),
                             ("_cells.csv", cells_frame(res).to_csv(index=False, float_format="%.6g"))):
            path = out / f"{spec.name}{suffix}"
            atomic_write_bytes(path, data.encode())
            written[path.name] = path
    return written


def published_coverage(suite: Suite) -> dict[int, list[str]]:
    """published.csv row -> the table cells (of runs the suite has) that show it."""
    shown: dict[int, list[str]] = {}
    rec = Records(suite)
    for spec in table_specs(suite):
        for g, label, column in spec.cells():
            has = (ensemble_source(suite, group_cells(rec, g, "teacher")) is not None if column == "teacher_ensemble"
                   else bool(group_cells(rec, g, column)))
            for i in match_published(_published_filter(spec, g, label)).index if has else []:
                shown.setdefault(int(i), []).append(f"{spec.name}: {label} / {g.label}")
    return shown


def exclusions() -> dict[int, list[str]]:
    """published.csv row -> the reasons of the coverage.yaml entries that exclude it."""
    with open(COVERAGE_YAML) as f:
        entries = (yaml.safe_load(f) or {}).get("excluded", [])
    out: dict[int, list[str]] = {}
    for e in entries:
        for i in match_published(e["match"]).index:
            out.setdefault(int(i), []).append(e["reason"])
    return out


def coverage_report(suite: Suite) -> tuple[str, int]:
    """Text listing every published row as shown / excluded / NOT COVERED, and the problem count
    (rows neither shown nor excluded, excluded twice, or both shown and excluded)."""
    shown, excl, df = published_coverage(suite), exclusions(), published_table()
    lines, problems = [], 0
    for i, r in df.iterrows():
        what = f"{r.paper_key} | {r.table} | {r.teacher} → {r.student} | {r.method} | {r.metric}"
        if i in shown and i not in excl:
            lines.append(f"shown     {what}  <- {'; '.join(shown[i])}")
        elif i in excl and i not in shown and len(excl[i]) == 1:
            lines.append(f"excluded  {what}  ({excl[i][0].strip()})")
        else:
            problems += 1
            why = ("shown AND excluded" if i in shown and i in excl else
                   "excluded twice" if i in excl else "NOT COVERED: no table cell shows it")
            lines.append(f"PROBLEM   {what}  [{why}]")
    return "\n".join(lines), problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kdbench tables",
        description="Paper-layout tables of a suite: reproduced mean ± 95% CI (n) beside the published value, "
                    "Δ and its reproduction verdict (TOST against the table's margin), with paired tests: the paper's "
                    "claims (Holm) and every method against the table's reference (exploratory, BH). "
                    "Reads runs/<run>/metrics.json (and kernel-gap records) of the suite's runs.")
    p.add_argument("--suite", required=True, help="suite YAML file (workflow/suites/*.yaml)")
    p.add_argument("--out", help="output folder (default results/<suite name>/paper)")
    p.add_argument("--table", action="append", help="only this table (repeatable; default: every paper table)")
    p.add_argument("--print", action="store_true", help="also print the markdown tables")
    p.add_argument("--coverage", action="store_true",
                   help="instead: list every row of published.csv as shown by a table cell, excluded "
                        "(kdbench/reference/coverage.yaml, with the reason) or not covered; exit 1 if any is not")
    args = p.parse_args(argv)
    from kdbench.planning.suite import load_suite
    try:
        suite = load_suite(args.suite)
        if args.coverage:
            text, problems = coverage_report(suite)
            print(text)
            print(f"# {problems} problem(s) among {len(published_table())} published rows", file=sys.stderr)
            return 1 if problems else 0
        written = write_tables(suite, args.out or f"results/{suite.name}/paper", args.table)
    except SuiteError as e:
        print(f"kdbench tables: error: {e}", file=sys.stderr)
        return 2
    for name, path in written.items():
        if args.print and name.endswith(".md"):
            print(path.read_text())
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
