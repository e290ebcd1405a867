"""Paper-table specifications: a suite's ``tables:`` item resolved into a :class:`TableSpec`.

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
  (KDA Fig. 3; from ``kdbench kernel-gap`` records);
* ``published_runs`` — n_p of a published value whose paper states no run count (default: none,
  read as one run, the widest reading: :func:`kdbench.stats.verdict.published_sd`);
* ``margin`` — the equivalence margin δ of the reproduction verdicts (default per dataset:
  :func:`kdbench.stats.verdict.default_margin`) and the effect ``seeds needed`` is planned for;
* the primary family of paired tests (Holm) is generated from the paper's claims,
  ``kdbench/reference/claims/<paper>.yaml`` (:mod:`kdbench.report.claims`), by the table's name
  (a stand-in's: the table it miniaturises) and its published paper; ``primary`` —
  ``{row: [rows]}``, a family of the suite's own for a table no claims file covers (refused where one
  does); ``reference`` — the column every other method is compared with, exploratory
  (Benjamini–Hochberg); ``alpha`` — the level of both (default 0.05);
* ``like`` + ``stand_in`` — a miniature: the layout and published values of another suite's
  table, the reproduced numbers from this suite's experiments (the smoke suite uses this). A
  stand-in prints no reproduction verdicts: its published values belong to another setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import yaml

from kdbench.core.names import did_you_mean
from kdbench.planning.checks import SuiteError

if TYPE_CHECKING:  # annotations only: `kdbench tables --help` loads no torch (the suite's registries do)
    from kdbench.planning.suite import Suite
from kdbench.report.claims import Claim, claim_tests, claims_for
from kdbench.stats.comparisons import ClaimTest
from kdbench.stats.verdict import default_margin

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


#: caption sentence of a table whose teachers the suite trains (``teacher: train``, kdbench/planning/suite.py)
TRAINED_TEACHER_NOTE = ("Teachers trained by this suite (one run each, not the paper's): every student interval is "
                        "conditional on that teacher; its variance is not in the intervals.")


def fusion_note(suite: Suite, experiments) -> str:
    """Caption sentence naming the fused runs among ``experiments``' (``pack: {fuse: true}``; fusion
    is in their run ids, kdbench/planning/suite.py ``_fused``), or "" when none was fused."""
    runs = {c.run for c in suite.cells if c.experiment in set(experiments)}
    fused = sorted(r for r in runs if suite.runs[r].spec.execution.fuse)
    if not fused:
        return ""
    students = ", ".join(sorted({suite.runs[r].spec.student for r in fused}))
    return (f"Fused: {len(fused)} of these {len(runs)} runs (distilled {students} students) were trained "
            f"horizontally fused in packs (pack: {{fuse: true}}); fused results differ from unfused ones by about "
            f"seed noise, and their run ids say fused.")


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
    """One paper table, resolved: its rows, groups, published filter and statistical settings."""

    name: str
    rows: dict[str, dict]  # label -> {"column": str, "published": dict}
    groups: list[Group]
    layout: str
    reference: str | None
    published: dict
    caption: str
    figure: dict | None
    stand_in: str | None
    margin: float | None = None  # the suite's δ; None: each group's dataset default
    alpha: float = 0.05
    primary: list[ClaimTest] = field(default_factory=list)  # the primary family's planned tests
    claims: list[Claim] = field(default_factory=list)  # the paper's claims they come from
    default_n: int | None = None  # n_p the suite states where the paper does not (None: read as one run)

    def sign(self, group: Group) -> int:
        """+1 where higher is better (accuracy), −1 where lower is (an error, a kernel gap)."""
        return -1 if group.metric.startswith(("err", "kernel_gap")) else 1

    def margin_for(self, group: Group) -> float:
        """δ of ``group``'s cells: the table's ``margin`` or its dataset's default."""
        return self.margin if self.margin is not None else default_margin(group.dataset, group.metric)

    def cells(self):
        """(group, row label, kdbench column) of every cell, groups outer and rows inner: the one
        walk over a table that computing, coverage and diagnostics share."""
        for g in self.groups:
            for label, row in self.rows.items():
                yield g, label, g.rows.get(label, row["column"])


def _fail(table: str, msg: str):
    raise SuiteError(f"table {table!r}: {msg}")


def _check_column(table: str, column: str) -> None:
    from kdbench.methods import METHODS
    valid = sorted(METHODS.names()) + list(UNPAIRED)
    if column not in valid:
        _fail(table, f"unknown column {column!r}.{did_you_mean(column, valid)} Valid: a method ({', '.join(valid[:-2])}), teacher, teacher_ensemble")


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
    fused = fusion_note(suite, {e for g in groups for e in g.experiments})
    caption = " ".join(filter(None, [cfg.get("caption", ""), TRAINED_TEACHER_NOTE if trained else "", fused]))
    note = _stand_in_note(cfg, suite, groups) if stand_in is not None else None
    claims = claims_for(cfg["_like"].split(":")[-1] if "_like" in cfg else name, published.get("paper"))
    if claims and cfg.get("primary"):
        _fail(name, f"primary: this table's family comes from the paper's claims ({claims[0].paper}.yaml in "
                    f"kdbench/reference/claims); remove `primary:` or edit the claims file")
    primary = claim_tests(claims) if claims else [ClaimTest(a, b) for a, bs in (cfg.get("primary") or {}).items() for b in bs]
    _check_primary(name, primary, rows)
    return TableSpec(name, rows, groups, cfg.get("layout", "methods_as_rows"), cfg.get("reference", "student"),
                     published, caption, cfg.get("figure"), note, cfg.get("margin"), cfg.get("alpha", 0.05),
                     primary, claims, cfg.get("published_runs"))


def _check_primary(table: str, primary: list[ClaimTest], rows: dict) -> None:
    """Every row a primary test names is a row label (its groups may be absent: a stand-in keeps some)."""
    for t in primary:
        for label in (t.a, t.b):
            if label not in rows:
                where = f"claim {t.claim!r}" if t.claim else "primary"
                _fail(table, f"{where}: {label!r} is not a row label.{did_you_mean(label, rows)} Rows: {', '.join(rows)}")


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


def is_paper_table(table: dict) -> bool:
    """A ``tables:`` item with a paper layout (``published``, ``like`` or ``rows``), not only seeds."""
    return any(k in table for k in ("published", "like", "rows"))


def table_specs(suite: Suite, only: list[str] | None = None) -> list[TableSpec]:
    """Specs of the suite's paper tables (:func:`is_paper_table`)."""
    tables = [t for t in suite.config.get("tables", []) if is_paper_table(t)]
    if only:
        unknown = set(only) - {t["name"] for t in tables}
        if unknown:
            raise SuiteError(f"no paper table {sorted(unknown)} in {suite.path}; its paper tables: "
                             f"{', '.join(t['name'] for t in tables)}")
        tables = [t for t in tables if t["name"] in only]
    return [resolve(t, suite) for t in tables]
