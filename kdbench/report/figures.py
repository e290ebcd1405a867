"""``kdbench figures``: the figures of a suite as PNG, drawn from the same cells as the tables.

Paper tables (``kdbench tables``' cells: same runs, same failed/missing accounting, same 95%
t-intervals), under ``results/<suite>/paper/``:

* ``<table>.png`` for a table with a ``figure:`` entry, drawn with matplotlib:
  ``lines`` (FKD Fig. 4): the groups' ``x`` on the horizontal axis (log₂ if ``log2_x``), one line
  per row, each point with its 95% t-interval as an error bar, the rows' points dodged sideways
  so no two bars overlap; published values as hollow diamonds on a dashed line of the row's
  colour. ``bars`` (KDA Fig. 3): one cluster per group, one bar per row with its 95% CI as an
  error bar, published values as black crosses. Intervals are never clipped: the axis covers
  every one, and values beyond 0 or 100% (which a t-interval of 2 seeds reaches) are greyed.
* ``<table>_forest.png`` for a table with a reference column: :mod:`kdbench.report.forest`.

Seed tables (``--seed-tables``, ``kdbench aggregate``'s layout), under ``results/<suite>/``:
``<table>_forest.png`` (each method − the table's ``reference``, default ``student``, per pair,
Holm over the table) and ``<table>_curves.png`` (:mod:`kdbench.report.curves`).

The legend gives each row's n (finished runs) per group where runs failed or are missing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from kdbench.core.io import atomic_save_figure
from kdbench.planning.rehearsal import MARK as REHEARSAL
from kdbench.planning.rehearsal import is_rehearsal_caption
from kdbench.report.curves import BANDS, CellCurves, draw_curves, epoch_accuracies
from kdbench.report.forest import ForestRow, _seed_cells, draw_forest, seed_forest_rows, seed_metric  # noqa: F401 (re-exported)
from kdbench.report.paper_layout import is_paper_table
from kdbench.report.paper_tables import METRICS, CellStat, TableResult, compute_tables, table_specs


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _label(row: str, cells: list[CellStat]) -> str:
    short = [c for c in cells if c.n_failed or c.n_missing]
    if not short:
        return row
    return f"{row} (" + ", ".join(f"{c.group}: n={c.n}/{c.n_expected}" for c in short) + ")"


def _shade_impossible(ax) -> None:
    """Keep every interval whole (no clipping) and grey out the impossible values beyond 0 and 100%
    that a t-interval over few seeds can reach."""
    lo, hi = ax.get_ylim()
    if lo < 0:
        ax.axhspan(lo, 0, color="0.9", zorder=0)
    if hi > 100:
        ax.axhspan(100, hi, color="0.9", zorder=0)
    ax.set_ylim(lo, hi)


def draw(res: TableResult, path: str | Path) -> Path:
    """Draw ``res`` (a table with a ``figure`` spec) into the PNG file ``path``."""
    return atomic_save_figure(figure(res), path)


def figure(res: TableResult):
    """The matplotlib figure of ``res`` (a table with a ``figure`` spec)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec, fig_cfg = res.spec, res.spec.figure or {"kind": "lines"}
    groups, rows = spec.groups, list(spec.rows)
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if fig_cfg["kind"] == "lines":
        xs = [g.x if g.x is not None else i + 1 for i, g in enumerate(groups)]
        log2 = bool(fig_cfg.get("log2_x"))
        for k, row in enumerate(rows):
            cells = [res.cell(row, g.label) for g in groups]
            col = colours[k % len(colours)]
            # dodge: each row's points sit a little left/right of the group's x, so bars never overlap
            shift = (k - (len(rows) - 1) / 2) * 0.07
            px = [x * 2 ** shift if log2 else x + shift for x in xs]
            pts = [(x, c) for x, c in zip(px, cells) if c.n]
            err = [[c.mean - c.lo if _ok(c.lo) else 0.0 for _, c in pts], [c.hi - c.mean if _ok(c.hi) else 0.0 for _, c in pts]]
            ax.errorbar([x for x, _ in pts], [c.mean for _, c in pts], yerr=err, fmt="o-", color=col, capsize=4,
                        lw=1.5, label=_label(row, cells))
            pub = [(x, c.published) for x, c in zip(px, cells) if c.published is not None]
            if pub:
                ax.plot(*zip(*pub), "D--", mfc="none", color=col, alpha=0.9, ms=6)
        if log2:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    elif fig_cfg["kind"] == "bars":
        width = 0.8 / max(len(rows), 1)
        for k, row in enumerate(rows):
            cells = [res.cell(row, g.label) for g in groups]
            pos = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
            means = [c.mean if c.n else 0.0 for c in cells]
            err = [[c.mean - c.lo if _ok(c.lo) else 0.0 for c in cells], [c.hi - c.mean if _ok(c.hi) else 0.0 for c in cells]]
            ax.bar(pos, means, width, yerr=err, capsize=3, color=colours[k % len(colours)], label=_label(row, cells))
            pub = [(p, c.published) for p, c in zip(pos, cells) if c.published is not None]
            if pub:
                ax.plot(*zip(*pub), "kx", markersize=8)
        ax.set_xticks(range(len(groups)), [g.label for g in groups])
    else:
        raise ValueError(f"table {spec.name!r}: figure kind {fig_cfg['kind']!r}; valid: lines, bars")
    if all(g.metric.startswith(("acc", "err")) for g in groups):
        _shade_impossible(ax)
    ax.set_xlabel(fig_cfg.get("xlabel", ""))
    ax.set_ylabel(fig_cfg.get("ylabel", ""))
    title = fig_cfg.get("title", spec.name) + ("  [STAND-IN: miniature runs]" if spec.stand_in else "")
    ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D
    mark = "D" if fig_cfg["kind"] == "lines" else "x"
    handles.append(Line2D([], [], marker=mark, ls="--" if mark == "D" else "", color="k",
                          mfc="none" if mark == "D" else "k"))
    labels.append("published")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.text(0.01, 0.01, "mean over seeds with its 95% t-interval (error bar; points dodged sideways so that no two "
                         "overlap); n<2: no interval; grey: outside 0–100%", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def write_figures(suite, out_dir: str | Path, only: list[str] | None = None) -> list[Path]:
    """Every paper figure (``figure:`` tables) and a forest plot of every paper table with a
    reference, under ``out_dir``: ``<table>.png``, ``<table>_forest.png``."""
    wanted, out = {s.name for s in table_specs(suite, only)}, []
    for res in compute_tables(suite):  # every table at once: one family per test, as the tables
        spec = res.spec
        if spec.name not in wanted:
            continue
        if spec.figure:
            out.append(draw(res, Path(out_dir) / f"{spec.name}.png"))
        if spec.reference:
            out.append(draw_paper_forest(res, Path(out_dir) / f"{spec.name}_forest.png"))
    return out


# ----------------------------------------------------------------------------- forest plots

def _margin(table: dict | None, dataset: str, metric: str) -> float:
    from kdbench.stats.verdict import default_margin
    return float((table or {}).get("margin") or default_margin(dataset, metric))


def _forest_row(label: str, group: str, test, p_adj: float = math.nan, correction: str = "",
                published: tuple[float, ...] = ()) -> ForestRow:
    return ForestRow(label, group, test.n, test.mean_diff, test.ci_lo, test.ci_hi, test.sd_diff, published,
                     p_adj, correction)


def forest_label(c, table: str) -> str:
    """A comparison's row label: which claim a primary row tests (and whose family holds a test
    another table claims or first shows), or that it is exploratory."""
    if c.family == "primary":
        what = f"claim {c.claim}" if c.claim else "primary"
    else:
        what = "exploratory"
    return f"{c.a} − {c.b} [{what}{'' if c.owner == table else f', family of {c.owner}'}]"


def paper_forest_rows(res: TableResult) -> list[ForestRow]:
    """The table's comparisons (its primary family first, then every other row − the reference),
    each with the published Δ where the paper prints both values. A test repeated on the same
    runs in several groups (a stand-in) is drawn once, labelled with all its groups and with each
    group's published Δ."""
    same: dict[tuple, list] = {}
    for c in res.comparisons:
        same.setdefault((c.family, c.key), []).append(c)
    rows = []
    for family in ("primary", "exploratory"):
        for (fam, _), comps in same.items():
            c = comps[0]
            if fam != family or c.test.n == 0:
                continue
            pub = []
            for x in comps:
                a, b = (res.cell(*cell) for cell in x.cells)
                if a.published is not None and b.published is not None:
                    pub.append(a.published - b.published)
            group = c.group if len(comps) == 1 else f"{c.group} (same runs as {len(comps) - 1} more groups)"
            if c.sequential:  # seeds the looks collected: their decision, not a fixed-n adjusted p
                rows.append(_forest_row(f"{forest_label(c, res.spec.name)} {c.sequential}", group, c.test,
                                        published=tuple(pub)))
            else:
                rows.append(_forest_row(forest_label(c, res.spec.name), group, c.test, c.p_adj, c.correction, tuple(pub)))
    return rows


def draw_paper_forest(res: TableResult, path: str | Path) -> Path:
    spec = res.spec
    metric = spec.groups[0].metric if spec.groups else "acc_last"
    note = ("Δ = row − row over shared seeds (paired t). p adjusted within its family: primary (the paper's claims, "
            "kdbench/reference/claims; [claim …] names the one a row tests) Holm, exploratory (vs the reference) BH; "
            "a test another table claims or shows first carries that table's family and p. "
            "Published Δ = the paper's same difference. "
            + ("STAND-IN: reproduced values from miniature runs; published values from the paper's setting."
               if spec.stand_in else ""))
    return draw_forest(paper_forest_rows(res), spec.margin_for(spec.groups[0]), path,
                       f"{spec.name}: paired differences" + ("  [STAND-IN]" if spec.stand_in else "")
                       + (f"  [{REHEARSAL}]" if is_rehearsal_caption(spec.caption) else ""),
                       f"Δ {METRICS[metric][0]}" + ("" if metric.startswith("kernel_gap") else " (pp)"), note)


def _seed_tables(suite, only: list[str] | None) -> list[dict]:
    return [t for t in suite.config.get("tables") or [] if only is None or t["name"] in only]


def seed_figure_names(suite, only: list[str] | None = None) -> list[str]:
    """The seed-table figures ``kdbench figures --seed-tables`` writes (file names): a forest plot
    of every seed table (not a paper table: those are under paper/) and the learning curves of
    every table that is not a stand-in (a stand-in shows runs another table already draws);
    ``only``: of these tables."""
    out = []
    for t in _seed_tables(suite, only):
        if not is_paper_table(t):
            out.append(f"{t['name']}_forest.png")
        if "stand_in" not in t:
            out.append(f"{t['name']}_curves.png")
    return out


def _budget_note(suite, table: dict) -> str:
    """The sequential design of the table's experiments whose seeds are a budget (kdbench.commands.looks)."""
    from kdbench.planning.budget import budget, state_path
    notes = []
    for exp in suite.config["experiments"]:
        b = budget(exp) if exp["name"] in table["experiments"] else None
        if b:
            rule = "O'Brien–Fleming" if b["spending"] == "obrien_fleming" else "Pocock"
            notes.append(f" {exp['name']}: seeds as a budget, looks at n = {', '.join(map(str, b['looks']))}, "
                         f"{rule}-type alpha spending of α = {b['alpha']:g}, Holm within each look "
                         f"(decisions: {state_path(suite.config).with_suffix('.md')}).")
    return "".join(notes)


def seed_curve_cells(suite, records, table: dict) -> list[CellCurves]:
    from kdbench.core.io import read_json
    cells = _seed_cells(records, table)
    multi = len(cells) > 1
    out = []
    for (exp, ds, t, s), cols in cells.items():
        for method, runs in cols.items():
            cc = CellCurves(f"{method} ({t} → {s})" if multi else method, method, (exp, ds, t, s))
            for r in runs:
                curve = epoch_accuracies(read_json(Path(suite.run_dir(r.run)) / "metrics.json"))
                if r.status == "ok" and curve:
                    cc.ok.append(curve)
                elif r.status == "failed":
                    cc.failed.append(curve)
                else:
                    cc.missing += 1
            out.append(cc)
    return out


def write_seed_figures(suite, out_dir: str | Path, band: str = "range", only: list[str] | None = None) -> list[Path]:
    """The forest plots and learning curves of :func:`seed_figure_names` under ``out_dir``."""
    from kdbench.report.aggregate import run_records
    records, out = run_records(suite), []
    for t in _seed_tables(suite, only):
        title = t["name"] + ("  [STAND-IN]" if "stand_in" in t else "") + (
            f"  [{REHEARSAL}]" if is_rehearsal_caption(t.get("caption")) else "")
        if not is_paper_table(t):
            metric = seed_metric(t)
            ds = records[records.experiment.isin(t["experiments"])].dataset
            margin = _margin(t, ds.iloc[0] if len(ds) else "", metric)
            out.append(draw_forest(seed_forest_rows(records, t), margin, Path(out_dir) / f"{t['name']}_forest.png",
                                   f"{title}: Δ vs `{t.get('reference', 'student')}`, paired by seed",
                                   f"Δ {METRICS[metric][0]} (pp)",
                                   "Δ = method − reference over the seeds both finished (paired t); p Holm-adjusted "
                                   "over this table's comparisons; decided = Holm p ≤ 0.05, or the 90% "
                                   "interval lies inside the margin." + _budget_note(suite, t)))
        if "stand_in" not in t:
            out.append(draw_curves(seed_curve_cells(suite, records, t), t.get("reference", "student"),
                                   Path(out_dir) / f"{t['name']}_curves.png", title, band))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kdbench figures",
        description="Draw a suite's figures as PNG from the runs' outputs. Default: the paper figures (tables with "
                    "a `figure:` entry: FKD Fig. 4, KDA Fig. 3) and a forest plot of every paper table "
                    "(<table>_forest.png: each method − the reference with its 95% paired t-interval, the margin, "
                    "the published Δ) under results/<suite>/paper. With --seed-tables: a forest plot of every seed "
                    "table and the learning curves of every table (<table>_curves.png) under results/<suite>.")
    p.add_argument("--suite", required=True, help="suite YAML file (workflow/suites/*.yaml)")
    p.add_argument("--out", help="output folder (default results/<suite name>/paper, or results/<suite name> "
                                 "with --seed-tables)")
    p.add_argument("--table", action="append", help="only this table (repeatable; a paper table, or with --seed-tables a seed table)")
    p.add_argument("--seed-tables", action="store_true", help="the seed tables' forest plots and learning curves")
    p.add_argument("--band", choices=BANDS, default="range",
                   help="learning-curve band over seeds: range (min-max, default), sd (±1 sd), ci95 (t-interval)")
    args = p.parse_args(argv)
    from kdbench.planning.suite import SuiteError, load_suite
    try:
        suite = load_suite(args.suite)
        if args.seed_tables:
            paths = write_seed_figures(suite, args.out or f"results/{suite.name}", args.band, args.table)
        else:
            paths = write_figures(suite, args.out or f"results/{suite.name}/paper", args.table)
    except (SuiteError, ValueError) as e:
        print(f"kdbench figures: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
