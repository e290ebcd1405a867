"""Learning curves per table cell, from the per-epoch ``curve`` every ``metrics.json`` holds.

One small panel per cell (method, in each teacher → student pair of the table): the test accuracy
after each epoch, its mean over the cell's finished seeds as a line and the band over seeds
around it, with the table's reference method (its mean) dashed in grey for comparison. Failed
runs are drawn as thin red lines up to the epoch they stopped at; missing runs are counted in the
panel's title.

Choice (``band``): ``range`` (default) shades min–max over seeds — descriptive, and honest at the
2–5 seeds of a smoke table, where a 95% t-band would be ±12.7 sd wide at n = 2; ``sd`` shades
mean ± 1 sd; ``ci95`` the 95% t-interval of the mean at each epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from kdbench.core.io import atomic_save_figure

BANDS = ("range", "sd", "ci95")


@dataclass
class CellCurves:
    """The test-accuracy curves (one list per seed) of one cell."""

    title: str  # "kd" or "kd (resnet14 → resnet8)"
    column: str
    pair: tuple
    ok: list[list[float]] = field(default_factory=list)
    failed: list[list[float]] = field(default_factory=list)
    missing: int = 0


def band(curves: list[list[float]], kind: str = "range") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) per epoch over the seeds' curves (truncated to the shortest)."""
    if kind not in BANDS:
        raise ValueError(f"band {kind!r}: valid: {', '.join(BANDS)}")
    n_ep = min(len(c) for c in curves)
    a = np.array([c[:n_ep] for c in curves], float)
    mean = a.mean(axis=0)
    if len(a) < 2:
        return mean, mean, mean
    if kind == "range":
        return mean, a.min(axis=0), a.max(axis=0)
    sd = a.std(axis=0, ddof=1)
    half = sd if kind == "sd" else stats.t.ppf(0.975, len(a) - 1) * sd / math.sqrt(len(a))
    return mean, mean - half, mean + half


def epoch_accuracies(metrics: dict | None) -> list[float]:
    """Test accuracy after each epoch; NaN after an epoch without a test pass (``test_every``)."""
    return [math.nan if e.get("test_acc") is None else e["test_acc"] for e in (metrics or {}).get("curve") or []]


def _tested(values) -> tuple[np.ndarray, np.ndarray]:
    """(epochs from 1, values) at the epochs that had a test pass."""
    v = np.asarray(values, float)
    ep = np.arange(1, len(v) + 1)
    return ep[np.isfinite(v)], v[np.isfinite(v)]


def draw_curves(cells: list[CellCurves], reference: str | None, path: str | Path, title: str,
                kind: str = "range") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = min(6, max(len(cells), 1))
    nrow = math.ceil(len(cells) / ncol) or 1
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.4 * ncol + 0.4, 1.9 * nrow + 0.8), dpi=100,
                             sharey=True, squeeze=False)
    refs = {c.pair: band(c.ok, kind)[0] for c in cells if c.column == reference and c.ok}
    for ax, c in zip(axes.flat, cells):
        for f in c.failed:
            ax.plot(*_tested(f), color="tab:red", lw=0.8)
        ref = refs.get(c.pair)
        if ref is not None and c.column not in (reference, "teacher"):
            ax.plot(*_tested(ref), "--", color="0.55", lw=1)
        if c.ok:
            mean, lo, hi = band(c.ok, kind)
            tested = np.isfinite(mean)
            ep = np.arange(1, len(mean) + 1)[tested]
            ax.fill_between(ep, lo[tested], hi[tested], color="tab:blue", alpha=0.25, lw=0)
            ax.plot(ep, mean[tested], "-", color="tab:blue", lw=1.5, marker="." if len(ep) < 12 else None)
            ax.set_xticks(ep if len(ep) <= 6 else np.linspace(ep[0], ep[-1], 5).round().astype(int))
        extra = "".join(f", {k} {v}" for k, v in (("failed", len(c.failed)), ("missing", c.missing)) if v)
        ax.set_title(f"{c.title} (n={len(c.ok)}{extra})", fontsize=7.5)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    what = {"range": "min–max over seeds", "sd": "±1 sd over seeds", "ci95": "95% t-interval of the mean"}[kind]
    ref_note = f"; dashed grey: `{reference}` (mean)" if reference else ""
    fig.suptitle(f"{title}: test accuracy (%) after each tested epoch\nline: mean over finished seeds; band: {what}{ref_note}",
                 fontsize=8.5, x=0.01, y=1 - 0.05 / (1.9 * nrow + 0.8), ha="left", va="top")
    fig.supxlabel("epoch", fontsize=8)
    fig.tight_layout()
    return atomic_save_figure(fig, path)
