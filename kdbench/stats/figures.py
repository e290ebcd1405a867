"""``kdbench figures``: the paper figures as PNG, drawn from the same cells as the tables.

A paper table with a ``figure:`` entry (suite schema) is computed by
:func:`kdbench.stats.paper_tables.compute` — same runs, same failed/missing accounting, same
95% t-intervals — and drawn with matplotlib:

* ``lines`` (FKD Fig. 4): the groups' ``x`` on the horizontal axis (log₂ if ``log2_x``), one line
  per row with its 95% CI as a band (a single-value cell has no band), published values as
  hollow markers on a dashed line of the same colour;
* ``bars`` (KDA Fig. 3): one cluster per group, one bar per row with its 95% CI as an error bar,
  published values as black crosses on their bars.

The legend gives each row's n (finished runs) per group where runs failed or are missing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .paper_tables import CellStat, Records, TableResult, compute, table_specs


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _label(row: str, cells: list[CellStat]) -> str:
    short = [c for c in cells if c.n_failed or c.n_missing]
    if not short:
        return row
    return f"{row} (" + ", ".join(f"{c.group}: n={c.n}/{c.n_expected}" for c in short) + ")"


def draw(res: TableResult, path: str | Path) -> Path:
    """Draw ``res`` (a table with a ``figure`` spec) into the PNG file ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec, fig_cfg = res.spec, res.spec.figure or {"kind": "lines"}
    groups, rows = spec.groups, list(spec.rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if fig_cfg["kind"] == "lines":
        xs = [g.x if g.x is not None else i + 1 for i, g in enumerate(groups)]
        for k, row in enumerate(rows):
            cells = [res.cell(row, g.label) for g in groups]
            col = colours[k % len(colours)]
            pts = [(x, c) for x, c in zip(xs, cells) if c.n]
            ax.plot([x for x, _ in pts], [c.mean for _, c in pts], "o-", color=col, label=_label(row, cells))
            band = [(x, c) for x, c in pts if _ok(c.lo)]
            if band:
                ax.fill_between([x for x, _ in band], [c.lo for _, c in band], [c.hi for _, c in band], color=col, alpha=0.2)
            pub = [(x, c.published) for x, c in zip(xs, cells) if c.published is not None]
            if pub:
                ax.plot(*zip(*pub), "o--", mfc="none", color=col, alpha=0.8)
        if fig_cfg.get("log2_x"):
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
    if all(g.metric.startswith(("acc", "err")) for g in groups):  # CI bands of 2 seeds can leave [0, 100]
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, 0.0), min(hi, 100.0))
    ax.set_xlabel(fig_cfg.get("xlabel", ""))
    ax.set_ylabel(fig_cfg.get("ylabel", ""))
    title = fig_cfg.get("title", spec.name) + ("  [STAND-IN: miniature runs]" if spec.stand_in else "")
    ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D
    mark = "o" if fig_cfg["kind"] == "lines" else "x"
    handles.append(Line2D([], [], marker=mark, ls="--" if mark == "o" else "", color="k",
                          mfc="none" if mark == "o" else "k"))
    labels.append("published")
    ax.legend(handles, labels, fontsize=8)
    fig.text(0.01, 0.01, "mean over seeds with its 95% t-interval (band / error bar); n<2: no interval", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def write_figures(suite, out_dir: str | Path, only: list[str] | None = None) -> list[Path]:
    records = Records(suite)
    return [draw(compute(spec, suite, records), Path(out_dir) / f"{spec.name}.png")
            for spec in table_specs(suite, only) if spec.figure]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kdbench figures",
        description="Draw the paper figures of a suite (its tables with a `figure:` entry: FKD Fig. 4, KDA Fig. 3) "
                    "as PNG from the runs' outputs, with 95% CIs over seeds and the published values.")
    p.add_argument("--suite", required=True, help="suite YAML file (workflow/suites/*.yaml)")
    p.add_argument("--out", help="output folder (default results/<suite name>/paper)")
    p.add_argument("--table", action="append", help="only this figure's table (repeatable)")
    args = p.parse_args(argv)
    from ..suite import SuiteError, load_suite
    try:
        suite = load_suite(args.suite)
        paths = write_figures(suite, args.out or f"results/{suite.name}/paper", args.table)
    except (SuiteError, ValueError) as e:
        print(f"kdbench figures: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
