"""Forest plots: each method's paired difference from a table's reference, against the margin.

One row per comparison (method − reference, in one teacher → student pair or paper group): the
mean of the per-seed differences with its 95% paired t-interval (a bar), the table's margin ±δ
shaded around 0, and, in paper tables, the published Δ (published method − published reference)
as a red diamond. A row is drawn dark when its comparison is **decided** and orange when not:

* decided: a difference (the family's adjusted p ≤ 0.05, shown beside the row; without an
  adjusted p, the interval excludes 0), or the 90% t-interval lies inside ±δ (equivalent within
  the margin, TOST at 5%);
* undecided: anything else — the interval covers 0 and reaches past the margin;
* no interval (n < 2, or every difference equal): drawn as a hollow point, labelled why.

Choice: the bar is the unadjusted 95% t-interval (what the tables print); the adjusted p of the
table's family stands beside it, so a reader sees both the size and the decision.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from kdbench.core.io import atomic_save_figure
from kdbench.stats.paired import holm, paired_test


@dataclass(frozen=True)
class ForestRow:
    """One comparison: ``label`` (e.g. "kd − student") in ``group``, over ``n`` paired seeds."""

    label: str
    group: str
    n: int
    diff: float
    lo: float  # 95% paired t-interval of the mean difference (NaN: none)
    hi: float
    sd: float = math.nan  # sd of the per-seed differences
    published: tuple[float, ...] = ()  # published Δ (one per group of a repeated test), where printed
    p_adj: float = math.nan  # the table family's adjusted p (NaN: not tested)
    correction: str = ""  # "Holm", "BH", ...

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)


def status(row: ForestRow, margin: float, alpha: float = 0.05) -> str:
    """``differs`` / ``equivalent (±δ)`` (decided), ``undecided``, or ``no interval``. A difference
    needs the family's adjusted p ≤ ``alpha`` where the row has one (else the interval excluding 0)."""
    if not row.has_interval:
        return "no interval"
    if (row.p_adj <= alpha) if math.isfinite(row.p_adj) else (row.lo > 0 or row.hi < 0):
        return "differs"
    h90 = stats.t.ppf(0.95, row.n - 1) * row.sd / math.sqrt(row.n)
    if -margin < row.diff - h90 and row.diff + h90 < margin:
        return f"equivalent (±{margin:g})"
    return "undecided"


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def row_text(row: ForestRow, margin: float) -> str:
    if not row.has_interval:
        why = "n < 2" if row.n < 2 else "every difference equal"
        return f"{_signed(row.diff) if math.isfinite(row.diff) else '—'}  (n={row.n}; no interval: {why})"
    text = f"{_signed(row.diff)} [{_signed(row.lo)}, {_signed(row.hi)}]  n={row.n}"
    if math.isfinite(row.p_adj):
        p = f"{row.p_adj:.3f}" if row.p_adj >= 1e-3 else f"{row.p_adj:.0e}"
        text += f"  p({row.correction or 'adj'})={p}"
    return f"{text}  · {status(row, margin)}"


def draw_forest(rows: list[ForestRow], margin: float, path: str | Path, title: str, xlabel: str,
                note: str = "") -> Path:
    """Draw ``rows`` (grouped by ``group``, in order) into the PNG ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = list(dict.fromkeys(r.group for r in rows))
    multi = len(groups) > 1 or any("same runs" in g for g in groups)
    lines: list[tuple[str, ForestRow | None]] = []  # y positions top to bottom: group headers, rows
    for g in groups:
        if multi:
            lines.append((g, None))
        lines += [(r.label, r) for r in rows if r.group == g]
    note_lines = textwrap.wrap(note, 200)
    top, bottom = 0.45, 0.95 + 0.11 * len(note_lines)  # inches: title; x label, legend and note
    height = top + bottom + 0.3 * max(len(lines), 1)
    fig, ax = plt.subplots(figsize=(10, height), dpi=110)
    ax.axvspan(-margin, margin, color="0.85", zorder=0)
    ax.axvline(0, color="0.4", lw=0.8, zorder=1)
    xs = [0.0, -margin, margin]
    for i, (text, row) in enumerate(lines):
        y = len(lines) - 1 - i
        if row is None:
            ax.text(0.0, y, text, transform=ax.get_yaxis_transform(), ha="left", va="center", fontsize=8,
                    fontweight="bold")
            continue
        decided = status(row, margin) not in ("undecided", "no interval")
        colour = "black" if decided else "tab:orange"
        if row.has_interval:
            ax.plot([row.lo, row.hi], [y, y], color=colour, lw=2, solid_capstyle="butt", zorder=3)
            xs += [row.lo, row.hi]
        if math.isfinite(row.diff):
            ax.plot(row.diff, y, "o", color=colour, mfc=colour if row.has_interval else "white", ms=6, zorder=4)
            xs.append(row.diff)
        pub = [p for p in row.published if math.isfinite(p)]
        if pub:
            ax.plot(pub, [y] * len(pub), "D", color="tab:red", mfc="none", ms=6, mew=1.4, ls="", zorder=5)
            xs += pub
        ax.text(1.01, y, row_text(row, margin), transform=ax.get_yaxis_transform(), va="center", fontsize=7.5)
    lo, hi = min(xs), max(xs)
    pad = 0.06 * (hi - lo or 1.0)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(-0.7, len(lines) - 0.3)
    ax.set_yticks([len(lines) - 1 - i for i, (_, r) in enumerate(lines) if r is not None],
                  [t for t, r in lines if r is not None], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10, loc="left")
    handles = [Line2D([], [], color="black", marker="o", lw=2, label="decided: mean difference, 95% t-interval"),
               Line2D([], [], color="tab:orange", marker="o", lw=2, label="undecided"),
               plt.Rectangle((0, 0), 1, 1, color="0.85", label=f"margin ±{margin:g}")]
    if any(r.published for r in rows):
        handles.append(Line2D([], [], color="tab:red", marker="D", mfc="none", ls="", label="published Δ"))
    fig.legend(handles=handles, fontsize=7, loc="lower left", bbox_to_anchor=(0.01, (0.12 + 0.11 * len(note_lines)) / height),
               ncol=len(handles), frameon=False)
    if note_lines:
        fig.text(0.01, 0.05 / height, "\n".join(note_lines), fontsize=6.5, va="bottom")
    fig.subplots_adjust(left=0.2, right=0.58, top=1 - top / height, bottom=bottom / height)
    return atomic_save_figure(fig, path)


# ---- seed tables (kdbench aggregate's tables): each method against the table's reference ----------

def seed_metric(table: dict) -> str:
    """The accuracy a seed table aggregates (as ``kdbench aggregate``: errors are shown as accuracies)."""
    return "acc_best" if table.get("metric", "acc_last").endswith("_best") else "acc_last"


def _seed_cells(records, table: dict) -> dict[tuple, dict[str, list]]:
    """(experiment, dataset, teacher, student) -> column -> its rows of ``runs.csv``."""
    out: dict[tuple, dict[str, list]] = {}
    for r in records[records.experiment.isin(table["experiments"])].itertuples():
        out.setdefault((r.experiment, r.dataset, r.teacher, r.student), {}).setdefault(r.method, []).append(r)
    return out


def seed_forest_rows(records, table: dict) -> list[ForestRow]:
    """Each method − the table's ``reference`` (default ``student``) per pair, paired by seed;
    Holm over the table's tests (each distinct pair of run sets counted once)."""
    metric, ref = seed_metric(table), table.get("reference", "student")
    cells = _seed_cells(records, table)
    multi = len({k[:2] for k in cells}) > 1
    tests = []  # (group, label, test, key: the two sides' runs — the same test counts once)
    for (exp, ds, t, s), cols in cells.items():
        if ref not in cols:
            continue
        group = f"{exp}/{ds}: {t} → {s}" if multi else f"{t} → {s}"
        base = {r.seed: getattr(r, metric) for r in cols[ref] if r.status == "ok"}
        for method, runs in cols.items():
            if method not in (ref, "teacher"):
                test = paired_test({r.seed: getattr(r, metric) for r in runs if r.status == "ok"}, base)
                tests.append((group, f"{method} − {ref}", test, (tuple(r.run for r in runs), tuple(r.run for r in cols[ref]))))
    distinct = {key: test.p for _, _, test, key in tests}
    adjusted = dict(zip(distinct, holm(list(distinct.values()))))
    return [ForestRow(label, group, test.n, test.mean_diff, test.ci_lo, test.ci_hi, test.sd_diff, p_adj=float(adjusted[key]),
                      correction="Holm") for group, label, test, key in tests]
