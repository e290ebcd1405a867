"""Aggregate run records into per-seed and per-cell tables under ``results/<suite>/``.

``runs.csv``    one row per (experiment cell, seed): status and metrics of the run.
``summary.csv`` one row per cell: n ok / failed / missing, mean, sd, 95% t-interval.
``<table>.md``  markdown tables laid out methods × pairs, cells ``mean ± half-width (n)``: the
                plain seed aggregate of every table, in kdbench's names (a paper table's layout,
                published values and paired tests are ``kdbench tables``' output under ``paper/``).
Failed runs (non-finite loss) and missing runs are counted and shown, never averaged. A plain
table with ``reproduces: <reference>`` also prints kdbench-vs-reference-implementation verdicts
(:mod:`kdbench.report.reference`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from kdbench.core.io import atomic_write_bytes, read_json_state
from kdbench.planning.rehearsal import NOTE as REHEARSAL_NOTE
from kdbench.planning.rehearsal import is_rehearsal_caption
from kdbench.planning.suite import Suite
from kdbench.stats.ci import mean_ci
from kdbench.report.forest import row_text, seed_forest_rows
from kdbench.report.paper_layout import fusion_note
from kdbench.report.records import imported_accuracy, imported_teachers, run_status
from kdbench.report.reference import reference_text
from kdbench.stats.verdict import default_margin

METRICS = ("acc_last", "acc_best")


def run_records(suite: Suite) -> pd.DataFrame:
    rows = []
    for c in suite.cells:
        m, state = read_json_state(Path(suite.run_dir(c.run)) / "metrics.json")
        status = state if m is None else run_status(m)  # missing, corrupt (rerun snakemake: it redoes it); failed
        row = {"experiment": c.experiment, "dataset": c.dataset, "teacher": c.teacher, "student": c.student,
               "method": c.column, "seed": c.seed, "status": status, "run": c.run}
        for k in METRICS + ("acc5_last", "acc5_best", "epoch_best", "wall_time_s"):
            row[k] = m.get(k) if m else None
        prov = (m or {}).get("provenance", {})
        row.update(git_sha=prov.get("git_sha"), device=prov.get("device_name"))
        rows.append(row)
    return pd.DataFrame(rows + imported_teacher_rows(suite))


def imported_teacher_rows(suite: Suite) -> list[dict]:
    """Teachers given as files (``teacher_checkpoints``) are no runs and have no cells: their
    "teacher" row is the top-1 measured when each file was imported (``kdbench import-teacher
    --check-data``), one row per file (an ensemble's members, as trained teacher seeds), status
    ``unevaluated`` when it was imported without the data."""
    pairs = {}
    for c in suite.cells:
        paths = imported_teachers(suite, c)
        if paths:
            pairs.setdefault((c.experiment, c.dataset, c.teacher, c.student), paths)
    rows = []
    for (exp, ds, t, s), paths in pairs.items():
        for i, path in enumerate(paths):
            got = imported_accuracy(path)
            status = "missing" if got is None else "ok" if got[0] is not None else "unevaluated"
            top1, top5 = got or (None, None)
            rows.append({"experiment": exp, "dataset": ds, "teacher": t, "student": s, "method": "teacher", "seed": i,
                         "status": status, "run": path, "acc_last": top1, "acc_best": top1, "acc5_last": top5,
                         "acc5_best": top5, "epoch_best": None, "wall_time_s": None, "git_sha": None, "device": None})
    return rows


def summarise(records: pd.DataFrame) -> pd.DataFrame:
    keys = ["experiment", "dataset", "teacher", "student", "method"]
    rows = []
    for key, g in records.groupby(keys, sort=False):
        ok = g[g.status == "ok"]
        row = dict(zip(keys, key))
        row.update(n=len(ok), n_failed=int((g.status == "failed").sum()),
                   n_missing=int(g.status.isin(["missing", "corrupt"]).sum()))  # no result either way
        for metric in METRICS:
            ci = mean_ci(ok[metric].tolist())
            row.update({f"{metric}_mean": ci.mean, f"{metric}_sd": ci.std, f"{metric}_ci_lo": ci.lo, f"{metric}_ci_hi": ci.hi})
        rows.append(row)
    return pd.DataFrame(rows)


def format_cell(row: pd.Series, metric: str) -> str:
    mean, lo, hi = row[f"{metric}_mean"], row[f"{metric}_ci_lo"], row[f"{metric}_ci_hi"]
    notes = [f"{row[k]} {k[2:]}" for k in ("n_failed", "n_missing") if row[k]]
    if row["n"] == 0:
        text = "—"
    elif math.isnan(lo):
        text = f"{mean:.2f} (n={row['n']})"
    else:
        text = f"{mean:.2f} ± {(hi - lo) / 2:.2f} (n={row['n']})"
    return text + (f" [{', '.join(notes)}]" if notes else "")


def markdown_table(summary: pd.DataFrame, experiments: list[str], metric: str, caption: str = "") -> str:
    """Methods as rows and teacher → student pairs as columns, as the CRD/OT tables are laid out."""
    metric = "acc_best" if metric.endswith("_best") else "acc_last"  # err / kernel-gap tables: the accuracy
    s = summary[summary.experiment.isin(experiments)]
    pairs = list(dict.fromkeys(zip(s.experiment, s.dataset, s.teacher, s.student)))
    multi = len({p[:2] for p in pairs}) > 1
    header = ["method", *(f"{e}/{d}: {t} → {st}" if multi else f"{t} → {st}" for e, d, t, st in pairs)]
    methods = list(dict.fromkeys(["teacher", *s.method]))
    cells = {(r.experiment, r.dataset, r.teacher, r.student, r.method): format_cell(r, metric) for _, r in s.iterrows()}
    body = [[m, *(cells.get((*p, m), "") for p in pairs)] for m in methods]
    what = {"acc_last": "last-epoch", "acc_best": "best-epoch"}[metric]
    cap = caption or f"Top-1 test accuracy (%), {what}: mean ± 95% t-interval half-width over seeds (n)."
    return f"{cap}\n\n" + tabulate(body, header, tablefmt="github") + "\n"


def aggregate(suite: Suite, out_dir: str | Path, only: list[str] | None = None) -> dict[str, Path]:
    """runs.csv, summary.csv and every table's ``<table>.md``; ``only``: these tables' .md alone."""
    out = Path(out_dir)
    records = run_records(suite)
    summary = summarise(records)
    written = {}
    if only is None:
        written = {"runs": out / "runs.csv", "summary": out / "summary.csv"}
        atomic_write_bytes(written["runs"], records.to_csv(index=False).encode())
        atomic_write_bytes(written["summary"], summary.to_csv(index=False, float_format="%.4f").encode())
    tables = suite.config.get("tables") or [{"name": "summary", "experiments": list(suite.experiment_runs)}]
    for t in (t for t in tables if only is None or t["name"] in only):
        path = out / f"{t['name']}.md"
        paper = any(k in t for k in ("published", "like", "rows"))  # its paper layout: kdbench tables
        caption = "" if paper else t.get("caption", "")
        text = markdown_table(summary, t["experiments"], t.get("metric", "acc_last"), caption)
        if paper and is_rehearsal_caption(t.get("caption")):  # its own caption is the paper page's
            text = f"**{REHEARSAL_NOTE}**\n\n{text}"
        fused = fusion_note(suite, t["experiments"])
        text += f"\n{fused}\n" if fused else ""
        if not paper:
            text += comparisons_text(records, summary, t)
        if not paper and t.get("reproduces"):
            text += reference_text(records, t, table_margin(summary, t), data_root(suite, t))
        if paper:
            text += f"\nPlain seed aggregate in kdbench's names; the paper's layout with published values: paper/{t['name']}.md\n"
        atomic_write_bytes(path, text.encode())
        written[t["name"]] = path
    return written


def comparisons_text(records: pd.DataFrame, summary: pd.DataFrame, table: dict) -> str:
    """The table's paired comparisons with its reference method, as its forest plot draws them."""
    rows = seed_forest_rows(records, table)
    if not rows:
        return ""
    margin = table_margin(summary, table)
    ref = table.get("reference", "student")
    body = [[r.group, r.label, row_text(r, margin)] for r in rows]
    return (f"\nPaired with `{ref}` (same seeds): mean difference [95% t-interval], n, p Holm-adjusted over "
            f"this table's comparisons; decided = differs (adjusted p ≤ 0.05) or equivalent (90% interval "
            f"inside ±{margin:g}), else undecided. Forest plot: {table['name']}_forest.png\n\n"
            + tabulate(body, ["pair", "comparison", "difference"], tablefmt="github") + "\n")


def table_margin(summary: pd.DataFrame, table: dict) -> float:
    """The table's δ: its ``margin``, else its dataset's default."""
    datasets = summary[summary.experiment.isin(table["experiments"])].dataset
    return float(table.get("margin") or default_margin(datasets.iloc[0] if len(datasets) else "",
                                                       table.get("metric", "acc_last")))


def data_root(suite: Suite, table: dict) -> str:
    """The data root of the table's (first) experiment's dataset."""
    exp = next(e for e in suite.config["experiments"] if e["name"] == table["experiments"][0])
    return suite.config["datasets"][exp["dataset"]]["root"]
