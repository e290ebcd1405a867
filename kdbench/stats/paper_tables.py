"""``kdbench tables``: every paper table in the paper's layout, published value beside reproduced.

A suite's ``tables:`` item describes one paper table (schema: ``kdbench/schemas/suite.schema.yaml``):

* ``rows`` — the paper's method labels, in order, each mapped to a kdbench column (a method
  name, ``teacher``, or ``teacher_ensemble`` = the averaged-probability accuracy of the
  experiment's teachers); ``layout`` says whether they are the printed rows or columns;
* ``groups`` — the paper's other axis: teacher → student pairs (by default every pair of the
  table's experiments), or datasets, ensemble sizes or layers, each optionally with its own
  experiments, dataset, metric, published filter and row overrides;
* ``published`` — a filter on ``kdbench/reference/published.csv`` (paper, table, metric, …),
  refined per group and per row; the row label is the published ``method``;
* ``metric`` — the statistic the paper reports: ``acc_last`` (CRD, OT), ``acc_best``, errors
  ``err_last``/``err5_last`` (OT ImageNet), or ``kernel_gap_pooled``/``kernel_gap_logits``
  (KDA Fig. 3; from ``kdbench kernel-gap`` records, :func:`diagnostic_targets`);
* ``reference`` — the column every other method is compared with by a paired t-test over
  shared seeds (:mod:`kdbench.stats.paired`), Holm-corrected across the whole table;
* ``like`` + ``stand_in`` — a miniature: the layout and published values of another suite's
  table, the reproduced numbers from this suite's experiments (the smoke suite uses this).

Each cell reports mean ± 95% t-interval half-width (n ok seeds), its failed and missing runs,
the published value, Δ = reproduced − published and the verdict: where the published value
lies relative to the 95% CI (``within CI`` / ``pub above CI`` / ``pub below CI``). Outputs
per table, under ``--out``: ``<name>.md`` (caption, paper-layout table, paired tests),
``<name>.csv`` (paper layout, numeric columns per group) and ``<name>_cells.csv`` (one row per
cell with every statistic).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from tabulate import tabulate

from ..engine.io import read_json
from ..suite import Cell, Suite, SuiteError
from .ci import mean_ci
from .paired import PairedTest, holm, paired_test

REFERENCE = Path(__file__).resolve().parent.parent / "reference"
PUBLISHED_CSV = REFERENCE / "published.csv"
COVERAGE_YAML = REFERENCE / "coverage.yaml"
METRICS = {  # metric -> (what it is, default published metric)
    "acc_last": ("top-1 test accuracy (%), last epoch", "top1_acc_pct"),
    "acc_best": ("top-1 test accuracy (%), best epoch (maximum over epochs)", "top1_acc_pct"),
    "acc5_last": ("top-5 test accuracy (%), last epoch", "top5_acc_pct"),
    "acc5_best": ("top-5 test accuracy (%), best epoch", "top5_acc_pct"),
    "err_last": ("top-1 test error (%), last epoch", "top1_err_pct"),
    "err_best": ("top-1 test error (%), best epoch", "top1_err_pct"),
    "err5_last": ("top-5 test error (%), last epoch", "top5_err_pct"),
    "err5_best": ("top-5 test error (%), best epoch", "top5_err_pct"),
    "kernel_gap_pooled": ("untransferred kernel fraction ‖K_S−K_T‖_F/‖K_T‖_F before the last FC (pooled features), "
                          "final model, test set", "kernel_residual_||K_S-K_T||_F/||K_T||_F_read_from_figure"),
    "kernel_gap_logits": ("untransferred kernel fraction ‖K_S−K_T‖_F/‖K_T‖_F after the FC (logits), final model, "
                          "test set", "kernel_residual_||K_S-K_T||_F/||K_T||_F_read_from_figure"),
}
UNPAIRED = ("teacher", "teacher_ensemble")  # columns whose seeds are not the students' seeds


# ----------------------------------------------------------------------------- specification

#: caption sentence of a table whose teachers the suite trains (``teacher: train``, kdbench/suite.py)
TRAINED_TEACHER_NOTE = ("Teachers trained by this suite (one run each, not the paper's): every student interval is "
                        "conditional on that teacher; its variance is not in the intervals.")


@dataclass
class Group:
    """One entry of the paper's non-method axis (a pair, dataset, ensemble size or layer)."""
    label: str
    experiments: list[str]
    dataset: str
    pair: tuple[str, str]
    metric: str
    published: dict
    rows: dict = field(default_factory=dict)  # row label -> column, overriding the table's
    x: float | None = None


@dataclass
class TableSpec:
    name: str
    rows: dict[str, dict]  # label -> {"column": str, "published": dict}
    groups: list[Group]
    layout: str
    reference: str | None
    published: dict
    caption: str
    figure: dict | None
    stand_in: str | None


def _fail(table: str, msg: str):
    raise SuiteError(f"table {table!r}: {msg}")


def _check_column(table: str, column: str) -> None:
    from ..methods import METHODS
    valid = sorted(METHODS.names()) + list(UNPAIRED)
    if column not in valid:
        close = difflib.get_close_matches(column, valid, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        _fail(table, f"unknown column {column!r}.{hint} Valid: a method ({', '.join(valid[:-2])}), teacher, teacher_ensemble")


def _like(cfg: dict, suite: Suite) -> dict:
    """The table this one miniaturises (``like: {suite: FILE, table: NAME}``, FILE relative to
    the suite's folder), with this table's own keys on top."""
    like = cfg["like"]
    path = suite.path.parent / like["suite"]
    if not path.is_file():
        _fail(cfg["name"], f"like.suite {like['suite']!r}: no such file next to {suite.path}")
    with open(path) as f:
        tables = (yaml.safe_load(f) or {}).get("tables", [])
    want = like.get("table", cfg["name"])
    base = next((t for t in tables if t["name"] == want), None)
    if base is None:
        _fail(cfg["name"], f"{path} has no table {want!r}; its tables: {', '.join(t['name'] for t in tables)}")
    own = {k: v for k, v in cfg.items() if k not in ("like", "experiments")}
    return {**base, **own, "name": cfg["name"], "experiments": cfg["experiments"], "_like": f"{path.name}:{want}"}


def _exp_cfg(suite: Suite, name: str) -> dict:
    return next(e for e in suite.config["experiments"] if e["name"] == name)


def resolve(cfg: dict, suite: Suite) -> TableSpec:
    """Turn one ``tables:`` item into a :class:`TableSpec` (defaults filled, names checked)."""
    name = cfg["name"]
    if "like" in cfg:
        cfg = _like(cfg, suite)
    metric = cfg.get("metric", "acc_last")
    exps = cfg["experiments"]
    published = dict(cfg.get("published") or {})
    rows_cfg = cfg.get("rows") or {c: c for c in dict.fromkeys(
        ["teacher"] + [c.column for c in suite.cells if c.experiment in exps])}
    rows = {label: ({"column": v, "published": {}} if isinstance(v, str) else
                    {"column": v["column"], "published": dict(v.get("published") or {})}) for label, v in rows_cfg.items()}
    columns = [r["column"] for r in rows.values()] + [c for g in cfg.get("groups") or [] for c in (g.get("rows") or {}).values()]
    for column in columns + ([cfg["reference"]] if cfg.get("reference") else []):
        _check_column(name, column)

    def pairs_of(experiments, dataset=None):
        return list(dict.fromkeys((c.dataset, c.teacher, c.student) for c in suite.cells
                                  if c.experiment in experiments and (dataset is None or c.dataset == dataset)))

    groups_cfg = cfg.get("groups")
    if groups_cfg is None:  # every pair of the experiments, on their own datasets
        own = {_exp_cfg(suite, e)["dataset"] for e in exps}
        groups_cfg = [{"pair": [t, s], "dataset": d, "published": {"teacher": t, "student": s}}
                      for d, t, s in pairs_of(exps) if d in own]
    stand_in = cfg.get("stand_in")
    if stand_in is not None and cfg.get("groups") is None:
        _fail(name, "a stand-in needs the paper table's groups written out (`groups:` in the liked table)")
    if stand_in is not None:
        groups_cfg = _stand_in(name, groups_cfg, stand_in, exps, suite, pairs_of)
    groups = []
    for g in groups_cfg:
        g_exps = g.get("experiments") or exps
        for e in g_exps:
            if e not in suite.experiment_runs:
                _fail(name, f"group {g.get('label')!r}: unknown experiment {e!r}; valid: {', '.join(suite.experiment_runs)}")
        dataset = g.get("dataset") or _exp_cfg(suite, g_exps[0])["dataset"]
        pair = tuple(g["pair"]) if g.get("pair") else None
        if pair is not None and (dataset, *pair) not in pairs_of(g_exps):
            _fail(name, f"group {g.get('label')!r}: no pair {list(pair)} on {dataset} in experiments {g_exps}; "
                        f"their pairs: {[f'{t} -> {s} on {d}' for d, t, s in pairs_of(g_exps)]}")
        if pair is None:
            found = {(t, s) for d, t, s in pairs_of(g_exps, dataset)}
            if len(found) != 1:
                _fail(name, f"group {g.get('label')!r}: experiments {g_exps} on {dataset} have pairs {sorted(found)}; "
                            f"name one with `pair: [teacher, student]`")
            pair = found.pop()
        gm = g.get("metric", metric)
        if gm not in METRICS:
            _fail(name, f"unknown metric {gm!r}; valid: {', '.join(METRICS)}")
        own_pair = {} if stand_in is not None else {"teacher": pair[0], "student": pair[1]}
        pub = {**own_pair, **(g.get("published") or {})}
        label = g.get("label") or f"{pair[0]} → {pair[1]}"
        groups.append(Group(label, list(g_exps), dataset, pair, gm, pub, dict(g.get("rows") or {}), g.get("x")))
    trained = suite.trained_teacher_experiments() & {e for g in groups for e in g.experiments}  # teacher: train
    caption = " ".join(filter(None, [cfg.get("caption", ""), TRAINED_TEACHER_NOTE if trained else ""]))
    note = _stand_in_note(cfg, suite, groups) if stand_in is not None else None
    return TableSpec(name, rows, groups, cfg.get("layout", "methods_as_rows"), cfg.get("reference", "student"),
                     published, caption, cfg.get("figure"), note)


def _stand_in(name, groups_cfg, stand_in, exps, suite, pairs_of):
    """Re-point the paper table's groups at this suite's experiments (a miniature)."""
    mapping = stand_in.get("groups")
    if any("pair" not in g and not {"teacher", "student"} <= set(g.get("published") or {}) for g in groups_cfg):
        _fail(name, "a stand-in needs the paper table's groups written out (each with `pair` or published teacher "
                    "and student)")
    out = []
    for g in groups_cfg:
        label = g.get("label") or (f"{g['pair'][0]} → {g['pair'][1]}" if g.get("pair") else "")
        if mapping is not None and label not in mapping:
            continue
        g_exps = ([mapping[label]] if isinstance(mapping[label], str) else mapping[label]) if mapping else exps
        datasets = {d for d, _, _ in pairs_of(g_exps)}
        dataset = g.get("dataset") if g.get("dataset") in datasets else _exp_cfg(suite, g_exps[0])["dataset"]
        pub = {"teacher": g["pair"][0], "student": g["pair"][1]} if g.get("pair") else {}
        out.append({**g, "label": label, "experiments": g_exps, "dataset": dataset, "pair": None,
                    "published": {**pub, **(g.get("published") or {})}})
    if not out:
        _fail(name, "stand_in.groups keeps none of the paper table's groups")
    return out


def _stand_in_note(cfg: dict, suite: Suite, groups: list[Group]) -> str:
    sources = "; ".join(dict.fromkeys(f"{', '.join(g.experiments)}: {g.pair[0]} → {g.pair[1]} on {g.dataset}"
                                      for g in groups))
    note = cfg["stand_in"].get("note")
    return (f"**STAND-IN**: the layout and published values are {cfg['_like']}'s; every reproduced value comes "
            f"from suite {suite.name!r} ({sources}), not from the paper's setting.{' ' + note + '.' if note else ''}")


# ----------------------------------------------------------------------------- run outputs

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
        return read_json(Path(self.suite.run_dir(run_id)) / "metrics.json")

    @functools.cache
    def diag(self, path: str) -> dict | None:
        return read_json(Path(path))

    def value(self, cell: Cell, metric: str) -> tuple[str, float | None]:
        """(status, value) of one seed of one cell: ok / failed / missing (not run or no record)."""
        m = self.metrics(cell.run)
        if m is None:
            return "missing", None
        if m.get("status") != "ok":
            return m.get("status", "unknown"), None
        if metric.startswith("kernel_gap"):
            d = self.diag(diagnostics_path(self.suite, cell.run, teachers_of(self, cell)))
            if d is None or d.get("status") != "ok":
                return "missing", None
            return "ok", d["kernel_gap"][metric.removeprefix("kernel_gap_")]
        kind, stat = metric.split("_")  # acc | acc5 | err | err5, last | best
        acc = m.get(f"acc5_{stat}" if kind.endswith("5") else f"acc_{stat}")
        if acc is None:
            return "missing", None
        return "ok", (100 - acc if metric.startswith("err") else acc)


def ensemble_source(suite: Suite, cells: list[Cell]) -> tuple[str, list[str]] | None:
    """(first teacher's run, all teacher run folders) of a group: the teacher-ensemble record is
    ``kdbench kernel-gap`` of the first teacher against all of them (its ``teacher`` accuracy)."""
    teachers = list(dict.fromkeys(c.run for c in sorted(cells, key=lambda c: c.seed) if c.column == "teacher"))
    if not teachers:
        return None
    return teachers[0], [suite.run_dir(t) for t in teachers]


# ----------------------------------------------------------------------------- computation

@dataclass
class CellStat:
    row: str
    group: str
    column: str
    metric: str
    values: dict  # seed -> value (ok runs)
    n_expected: int
    n_failed: int
    n_missing: int
    mean: float
    sd: float
    lo: float
    hi: float
    published: float | None = None
    published_spread: float | None = None
    published_row: int | None = None
    test: PairedTest | None = None
    p_holm: float = math.nan

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def delta(self) -> float:
        return self.mean - self.published if self.published is not None and self.n else math.nan

    @property
    def verdict(self) -> str:
        if self.n_expected == 0:
            return "n/a" if self.published is None else "not in suite"
        if self.n == 0:
            return "no finished runs"
        if self.published is None:
            return "no published value"
        if self.n < 2:
            return "n<2: no CI"
        return "within CI" if self.lo <= self.published <= self.hi else ("pub above CI" if self.published > self.hi else "pub below CI")


@dataclass
class TableResult:
    spec: TableSpec
    cells: list[CellStat]
    paper_title: str

    def cell(self, row: str, group: str) -> CellStat:
        return next(c for c in self.cells if c.row == row and c.group == group)


@functools.cache
def published_table() -> pd.DataFrame:
    df = pd.read_csv(PUBLISHED_CSV)
    df["paper_key"] = df.paper.str.split().str[0]
    return df


def match_published(filt: dict) -> pd.DataFrame:
    df = published_table()
    mask = pd.Series(True, index=df.index)
    for k, v in filt.items():
        mask &= (df.paper_key == v) if k == "paper" else (df[k].astype(str) == str(v))
    return df[mask]


def _published_filter(spec: TableSpec, group: Group, label: str) -> dict:
    return {"metric": METRICS[group.metric][1], **spec.published, **group.published, "method": label,
            **spec.rows[label]["published"]}


def group_cells(rec: Records, group: Group, column: str) -> list[Cell]:
    cells = [c for c in rec.index.get((group.dataset, *group.pair), [])
             if c.experiment in group.experiments and c.column == column]
    by_seed: dict[int, Cell] = {}
    for c in cells:  # the same run through two experiments counts once
        if by_seed.setdefault(c.seed, c).run != c.run:
            raise SuiteError(f"group {group.label!r}, column {column!r}: seed {c.seed} is two different runs "
                             f"({by_seed[c.seed].run}, {c.run}); give the group one experiment")
    return list(by_seed.values())


def compute(spec: TableSpec, suite: Suite, records: Records | None = None) -> TableResult:
    records = records or Records(suite)
    out = []
    for g in spec.groups:
        for label, row in spec.rows.items():
            column = g.rows.get(label, row["column"])
            values, failed, missing, expected = {}, 0, 0, 0
            if column == "teacher_ensemble":
                src = ensemble_source(suite, group_cells(records, g, "teacher"))
                if src is not None:
                    expected = 1
                    d = records.diag(diagnostics_path(suite, src[0], src[1]))
                    if d is not None and d.get("status") == "ok" and d["teacher"]["top1"] is not None:
                        values[0] = d["teacher"]["top1"] if g.metric.startswith("acc") else 100 - d["teacher"]["top1"]
                    else:
                        missing = 1
            else:
                for c in group_cells(records, g, column):
                    expected += 1
                    status, v = records.value(c, g.metric)
                    if status == "ok":
                        values[c.seed] = v
                    elif status == "missing":
                        missing += 1
                    else:
                        failed += 1
            ci = mean_ci(list(values.values()))
            cs = CellStat(label, g.label, column, g.metric, values, expected, failed, missing, ci.mean, ci.std, ci.lo, ci.hi)
            pub = match_published(_published_filter(spec, g, label))
            if len(pub) > 1:
                raise SuiteError(f"table {spec.name!r}, {label!r} / {g.label!r}: the published filter matches "
                                 f"{len(pub)} rows of published.csv ({list(pub.index)}); make it more specific")
            if len(pub) == 1:
                r = pub.iloc[0]
                cs.published, cs.published_row = float(r.value), int(pub.index[0])
                cs.published_spread = None if pd.isna(r.ci95) else float(r.ci95)
            out.append(cs)
    _paired(spec, out)
    paper = spec.published.get("paper")
    titles = published_table().loc[published_table().paper_key == paper, "paper"] if paper else []
    return TableResult(spec, out, titles.iloc[0] if len(titles) else (paper or ""))


def _paired(spec: TableSpec, cells: list[CellStat]) -> None:
    """Each cell against the reference column of its group (same seeds), Holm across the table."""
    if not spec.reference:
        return
    tested = []
    for c in cells:
        ref = next((r for r in cells if r.group == c.group and r.column == spec.reference), None)
        if ref is None or c is ref or c.column in UNPAIRED or c.column == spec.reference:
            continue
        c.test = paired_test(c.values, ref.values)
        tested.append(c)
    for c, p in zip(tested, holm([c.test.p for c in tested])):
        c.p_holm = float(p)


# ----------------------------------------------------------------------------- rendering

def _num(x, digits=2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "—" if p is None or math.isnan(p) else (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}")


def _signed(x, digits=2) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:+.{digits}f}".replace("-", "−")


def _digits(metric: str) -> int:
    return 3 if metric.startswith("kernel_gap") else 2


def cell_text(c: CellStat, sep: str = "<br>") -> str:
    d = _digits(c.metric)
    notes = [f"{k} {v}" for k, v in (("failed", c.n_failed), ("missing", c.n_missing)) if v]
    if c.n_expected == 0:
        text = "n/a" if c.published is None else "not in suite"
    elif c.n == 0:
        text = f"— (0 of {c.n_expected} ok)"
    elif c.n == 1:
        text = f"{c.mean:.{d}f} (n=1)"
    else:
        text = f"{c.mean:.{d}f} ± {(c.hi - c.lo) / 2:.{d}f} (n={c.n})"
    if notes:
        text += f" [{', '.join(notes)}]"
    if c.published is not None:
        spread = f" ± {c.published_spread:g}" if c.published_spread is not None else ""
        text += f"{sep}pub {c.published:g}{spread} · Δ {_signed(c.delta, d)} · {c.verdict}"
    return text


def caption(res: TableResult) -> str:
    spec = res.spec
    metrics = list(dict.fromkeys(g.metric for g in spec.groups))
    what = "; ".join(METRICS[m][0] for m in metrics)
    where = spec.published.get("table", "")
    head = f"**{spec.name}** — {res.paper_title}{', ' + where if where else ''}."
    body = (f" Reproduced: {what}; mean ± 95% t-interval half-width over seeds (n = finished runs; failed and "
            f"missing runs are counted, never averaged). pub = published value (± its published spread, where "
            f"given); Δ = reproduced − published; verdict = where the published value lies relative to the 95% CI.")
    if spec.reference:
        body += (f" Paired tests: each method − `{spec.reference}` over shared seeds (paired t-test, 95% t-interval "
                 f"and percentile-bootstrap interval of the mean difference), p Holm-corrected across this table.")
    extra = " ".join(x for x in (spec.caption, spec.stand_in or "") if x)
    return head + body + (f" {extra}" if extra else "")


def markdown(res: TableResult) -> str:
    spec = res.spec
    labels, groups = list(spec.rows), [g.label for g in spec.groups]
    if spec.layout == "methods_as_rows":
        body = [[lab, *(cell_text(res.cell(lab, g)) for g in groups)] for lab in labels]
        text = tabulate(body, ["", *groups], tablefmt="github", disable_numparse=True)
    else:
        body = [[g, *(cell_text(res.cell(lab, g)) for lab in labels)] for g in groups]
        text = tabulate(body, ["", *labels], tablefmt="github", disable_numparse=True)
    out = [caption(res), "", text, ""]
    tested = [c for c in res.cells if c.test is not None and c.test.n > 0]
    untested = sum(1 for c in res.cells if c.test is not None and c.test.n == 0)
    if untested:
        out += [f"{untested} comparison(s) against `{spec.reference}` have no paired seeds with finished runs yet.", ""]
    if tested:
        d = _digits(tested[0].metric)
        rows = [[c.row, c.group, c.test.n, f"{_signed(c.test.mean_diff, d)} [{_signed(c.test.ci_lo, d)}, {_signed(c.test.ci_hi, d)}]",
                 f"[{_signed(c.test.boot_lo, d)}, {_signed(c.test.boot_hi, d)}]", _p(c.test.p), _p(c.p_holm),
                 c.test.seeds_needed if c.test.seeds_needed is not None else "—"] for c in tested]
        out += [f"Paired tests against `{spec.reference}` (seeds needed: for power 0.8 at α = 0.05 to detect the "
                f"observed difference):", "",
                tabulate(rows, ["row", "group", "pairs", "Δ mean [95% t-CI]", "bootstrap 95% CI", "p", "p (Holm)",
                                "seeds needed"], tablefmt="github", disable_numparse=True), ""]
    return "\n".join(out)


def cells_frame(res: TableResult) -> pd.DataFrame:
    rows = []
    for c in res.cells:
        t = c.test
        rows.append({"table": res.spec.name, "row": c.row, "group": c.group, "column": c.column, "metric": c.metric,
                     "n": c.n, "n_failed": c.n_failed, "n_missing": c.n_missing, "n_expected": c.n_expected,
                     "mean": c.mean, "sd": c.sd, "ci_lo": c.lo, "ci_hi": c.hi, "published": c.published,
                     "published_spread": c.published_spread, "published_row": c.published_row, "delta": c.delta,
                     "verdict": c.verdict, "reference": res.spec.reference if t else None,
                     "pairs": t.n if t else None, "diff_mean": t.mean_diff if t else None,
                     "diff_ci_lo": t.ci_lo if t else None, "diff_ci_hi": t.ci_hi if t else None,
                     "boot_lo": t.boot_lo if t else None, "boot_hi": t.boot_hi if t else None,
                     "p": t.p if t else None, "p_holm": c.p_holm if t else None,
                     "seeds_needed": t.seeds_needed if t else None,
                     "seeds": " ".join(map(str, sorted(c.values)))})
    return pd.DataFrame(rows)


def layout_frame(res: TableResult) -> pd.DataFrame:
    """The paper's rows and columns; each paper column expands to mean, ci95 (half-width), n,
    failed, missing, published, delta, verdict."""
    spec = res.spec
    outer, inner = (list(spec.rows), [g.label for g in spec.groups])
    if spec.layout != "methods_as_rows":
        outer, inner = inner, outer
    table = []
    for o in outer:
        line = {"": o}
        for i in inner:
            c = res.cell(o, i) if spec.layout == "methods_as_rows" else res.cell(i, o)
            line.update({f"{i} | mean": c.mean, f"{i} | ci95": (c.hi - c.lo) / 2, f"{i} | n": c.n,
                         f"{i} | failed": c.n_failed, f"{i} | missing": c.n_missing, f"{i} | published": c.published,
                         f"{i} | delta": c.delta, f"{i} | verdict": c.verdict})
        table.append(line)
    return pd.DataFrame(table)


# ----------------------------------------------------------------------------- suite level

def table_specs(suite: Suite, only: list[str] | None = None) -> list[TableSpec]:
    """Specs of the suite's paper tables (those with ``published``, ``like`` or ``rows``)."""
    tables = [t for t in suite.config.get("tables", []) if any(k in t for k in ("published", "like", "rows"))]
    if only:
        unknown = set(only) - {t["name"] for t in tables}
        if unknown:
            raise SuiteError(f"no paper table {sorted(unknown)} in {suite.path}; its paper tables: "
                             f"{', '.join(t['name'] for t in tables)}")
        tables = [t for t in tables if t["name"] in only]
    return [resolve(t, suite) for t in tables]


def diagnostic_targets(suite: Suite) -> dict[str, tuple[str, list[str]]]:
    """``kdbench kernel-gap`` records the paper tables read: {path: (run id, teachers)}."""
    out, rec = {}, Records(suite)
    for spec in table_specs(suite):
        for g in spec.groups:
            for label, row in spec.rows.items():
                column = g.rows.get(label, row["column"])
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
    from ..engine.io import atomic_write_bytes
    out, written, records = Path(out_dir), {}, Records(suite)
    for spec in table_specs(suite, only):
        res = compute(spec, suite, records)
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
        for g in spec.groups:
            for label, row in spec.rows.items():
                column = g.rows.get(label, row["column"])
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
                    "Δ and verdict, with paired tests against each table's reference method (Holm-corrected). "
                    "Reads runs/<run>/metrics.json (and kernel-gap records) of the suite's runs.")
    p.add_argument("--suite", required=True, help="suite YAML file (workflow/suites/*.yaml)")
    p.add_argument("--out", help="output folder (default results/<suite name>/paper)")
    p.add_argument("--table", action="append", help="only this table (repeatable; default: every paper table)")
    p.add_argument("--print", action="store_true", help="also print the markdown tables")
    p.add_argument("--coverage", action="store_true",
                   help="instead: list every row of published.csv as shown by a table cell, excluded "
                        "(kdbench/reference/coverage.yaml, with the reason) or not covered; exit 1 if any is not")
    args = p.parse_args(argv)
    from ..suite import load_suite
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
