"""Forest plots and learning curves of the seed tables: the numbers they draw, pinned by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from kdbench.report import figures
from kdbench.report.aggregate import run_records
from kdbench.report.curves import band
from kdbench.report.forest import ForestRow, status
from kdbench.planning.suite import load_suite

T95_4, T975_4, T975_2, T975_1 = 2.131847, 2.776445, 4.302653, 12.706205  # t quantiles (tables)
STUDENT = {0: 70.0, 1: 71.0, 2: 72.5}
KD = {0: 74.0, 1: 74.5, 2: 77.0}  # differences 4, 3.5, 4.5
AT = {0: 70.5, 1: 70.0, 2: 73.0}  # differences 0.5, -1, 0.5


def test_forest_status_decided_undecided_and_no_interval():
    assert status(ForestRow("a", "g", 3, 2.0, 0.5, 3.5, 0.6), 0.5) == "differs"
    # the interval excludes 0, but not after the family's adjustment: not decided
    assert status(ForestRow("a", "g", 3, 2.0, 0.5, 3.5, 0.6, p_adj=0.3, correction="Holm"), 0.5) == "undecided"
    assert status(ForestRow("a", "g", 3, 2.0, 0.5, 3.5, 0.6, p_adj=0.01, correction="Holm"), 0.5) == "differs"
    # sd 0.2, n 5: 95% half-width 0.248 covers 0, 90% half-width 0.191 inside ±0.5
    h95 = T975_4 * 0.2 / math.sqrt(5)
    assert status(ForestRow("a", "g", 5, 0.05, 0.05 - h95, 0.05 + h95, 0.2), 0.5) == "equivalent (±0.5)"
    h95 = T975_4 * 1.0 / math.sqrt(5)  # covers 0 and reaches past the margin
    assert status(ForestRow("a", "g", 5, 0.3, 0.3 - h95, 0.3 + h95, 1.0), 0.5) == "undecided"
    assert status(ForestRow("a", "g", 1, 0.3, math.nan, math.nan), 0.5) == "no interval"
    assert T95_4 * 0.2 / math.sqrt(5) + 0.05 < 0.5  # the equivalence case really is inside the margin


def curve(final: float, epochs: int = 3) -> list[dict]:
    return [{"epoch": e, "test_acc": final * e / epochs} for e in range(1, epochs + 1)]


@pytest.fixture
def seed_suite(tmp_path):
    cfg = {"name": "seedfig", "device": "cpu", "runs_dir": str(tmp_path / "runs"),
           "datasets": {"cifar100": {"root": str(tmp_path / "data")}},
           "experiments": [{"name": "main", "dataset": "cifar100", "pairs": [["resnet14", "resnet8"]],
                            "methods": ["student", "kd", "at"], "seeds": [0, 1, 2]}],
           "tables": [{"name": "main", "experiments": ["main"]}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    suite = load_suite(path)
    acc = {"student": STUDENT, "kd": KD, "at": AT}
    for c in suite.cells:
        v = acc.get(c.column, {}).get(c.seed, 90.0)
        m = {"status": "ok", "acc_last": v, "acc_best": v, "curve": curve(v)}
        if c.column == "at" and c.seed == 2:
            m = {"status": "failed", "failure": "non-finite loss", "curve": curve(30.0, 2)}
        Path(suite.run_dir(c.run)).mkdir(parents=True, exist_ok=True)
        Path(suite.run_dir(c.run), "metrics.json").write_text(json.dumps(m))
    return suite


def test_seed_forest_rows_are_paired_t_intervals_with_holm(seed_suite):
    from scipy import stats
    rows = {r.label: r for r in figures.seed_forest_rows(run_records(seed_suite), seed_suite.config["tables"][0])}
    assert set(rows) == {"kd − student", "at − student"}
    kd, at = rows["kd − student"], rows["at − student"]
    d = np.array([4.0, 3.5, 4.5])
    half = T975_2 * d.std(ddof=1) / math.sqrt(3)
    assert kd.n == 3 and math.isclose(kd.diff, 4.0) and math.isclose(kd.lo, 4.0 - half, rel_tol=1e-6)
    d_at = np.array([0.5, -1.0])  # seed 2 of at failed: two pairs
    assert at.n == 2 and math.isclose(at.diff, -0.25)
    assert math.isclose(at.hi - at.lo, 2 * T975_1 * d_at.std(ddof=1) / math.sqrt(2), rel_tol=1e-6)
    p_kd = 2 * stats.t.sf(4.0 / (d.std(ddof=1) / math.sqrt(3)), 2)
    p_at = 2 * stats.t.sf(abs(d_at.mean()) / (d_at.std(ddof=1) / math.sqrt(2)), 1)
    assert p_kd < p_at  # Holm: the smaller p times 2, the larger at least that
    assert math.isclose(kd.p_adj, 2 * p_kd, rel_tol=1e-6) and math.isclose(at.p_adj, max(2 * p_kd, p_at), rel_tol=1e-6)
    assert status(kd, 0.5) == "differs" and status(at, 0.5) == "undecided"


def test_learning_curve_bands():
    mean, lo, hi = band([[10, 20, 30], [20, 40]], "range")  # truncated to the shorter curve
    assert mean.tolist() == [15, 30] and lo.tolist() == [10, 20] and hi.tolist() == [20, 40]
    _, lo, hi = band([[10, 20], [20, 40]], "ci95")
    assert np.allclose(hi - [15, 30], T975_1 * np.array([math.sqrt(50), math.sqrt(200)]) / math.sqrt(2))
    _, lo, _ = band([[10, 20], [20, 40]], "sd")
    assert np.allclose(lo, [15 - math.sqrt(50), 30 - math.sqrt(200)])
    with pytest.raises(ValueError, match="valid: range, sd, ci95"):
        band([[1.0]], "iqr")


def test_curves_of_runs_tested_every_few_epochs(tmp_path):
    """A run with ``test_every`` has epochs without test_acc: they read as NaN, and the panel draws
    the tested epochs at their epoch numbers (not as consecutive points)."""
    from kdbench.report.curves import CellCurves, draw_curves, epoch_accuracies
    metrics = {"curve": [{"epoch": e, "loss": 1.0, **({"test_acc": 10.0 * e} if e % 2 == 0 or e == 5 else {})}
                         for e in range(1, 6)]}
    acc = epoch_accuracies(metrics)
    assert [a for a in acc if not math.isnan(a)] == [20.0, 40.0, 50.0] and math.isnan(acc[0])
    mean, lo, _ = band([acc, [a + 2 for a in acc]], "range")
    assert np.isnan(mean[[0, 2]]).all() and mean[[1, 3, 4]].tolist() == [21.0, 41.0, 51.0] and lo[1] == 20.0
    cells = [CellCurves("student", "student", ("main",), ok=[acc]), CellCurves("kd", "kd", ("main",), ok=[acc], failed=[acc[:2]])]
    img = imread(draw_curves(cells, "student", tmp_path / "c.png", "main"))
    assert img[..., :3].std() > 0.05


def test_seed_curve_cells_count_failed_and_missing(seed_suite):
    Path(seed_suite.run_dir(next(c.run for c in seed_suite.cells if c.column == "kd" and c.seed == 1)),
         "metrics.json").unlink()
    cells = {c.column: c for c in figures.seed_curve_cells(seed_suite, run_records(seed_suite),
                                                           seed_suite.config["tables"][0])}
    assert (len(cells["kd"].ok), cells["kd"].missing) == (2, 1)
    assert (len(cells["at"].ok), len(cells["at"].failed)) == (2, 1) and cells["at"].failed[0] == [15.0, 30.0]
    assert cells["student"].ok[2] == [72.5 / 3, 2 * 72.5 / 3, 72.5]


def test_seed_figures_are_drawn(seed_suite, tmp_path):
    assert figures.seed_figure_names(seed_suite) == ["main_forest.png", "main_curves.png"]
    paths = figures.write_seed_figures(seed_suite, tmp_path / "out")
    assert [p.name for p in paths] == ["main_forest.png", "main_curves.png"]
    for p in paths:
        img = imread(p)
        assert img.shape[0] > 150 and img.shape[1] > 500 and img[..., :3].std() > 0.05
    assert figures.main(["--suite", str(seed_suite.path), "--seed-tables", "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["main_curves.png", "main_forest.png"]


def test_smoke_draws_seed_figures_for_its_seed_tables_only():
    """The default job's seed tables get a forest plot and learning curves; its stand-ins (paper
    tables in miniature, forest plots under paper/) get neither."""
    from conftest import REPO
    smoke = load_suite(REPO / "workflow/suites/smoke.yaml")
    assert figures.seed_figure_names(smoke) == ["main_forest.png", "main_curves.png",
                                                "methods_forest.png", "methods_curves.png"]


def test_seed_table_markdown_lists_its_paired_comparisons(seed_suite, tmp_path):
    """main.md shows what its forest plot draws: each method − student, its interval and status."""
    from kdbench.report.aggregate import aggregate

    text = aggregate(seed_suite, tmp_path / "out")["main"].read_text()
    h = T975_2 * 0.5 / math.sqrt(3)  # kd − student: differences 4, 3.5, 4.5 (sd 0.5)
    assert f"kd − student | +4.00 [+{4 - h:.2f}, +{4 + h:.2f}]  n=3" in text
    assert "at − student | " in text and "n=2" in text and "main_forest.png" in text
    assert "· differs" in text
