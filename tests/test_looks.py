"""Seeds as a budget: alpha-spending boundaries, decisions per look, the state the suite reads,
and the loop end to end through Snakemake."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from kdbench.commands import looks
from kdbench.planning.suite import SuiteError, load_suite

from conftest import REPO, write_suite


def test_obrien_fleming_boundaries_match_the_published_tables():
    # Lan-DeMets O'Brien-Fleming-type, two-sided alpha 0.05, equally spaced looks
    # (Jennison & Turnbull 2000, Table 7.6; gsDesign/rpact give the same)
    assert np.allclose(looks.boundaries([1, 2, 3]), [3.7103, 2.5114, 1.9930], atol=3e-3)
    assert np.allclose(looks.boundaries([1, 2, 3, 4, 5]), [4.877, 3.357, 2.680, 2.290, 2.031], atol=3e-3)


@pytest.mark.parametrize("spending", ["pocock", "obrien_fleming"])
def test_boundaries_spend_alpha_as_declared_by_simulation(spending):
    """Brownian motion at the looks n = 3, 5, 10 (unequal spacing): the share of paths first
    crossing at each look is the spending function's increment; in all, alpha."""
    n_looks = [3, 5, 10]
    c = looks.boundaries(n_looks, 0.05, spending)
    rng = np.random.default_rng(0)
    t = np.array(n_looks) / 10
    paths = np.cumsum(rng.standard_normal((400_000, 3)) * np.sqrt(np.diff(t, prepend=0)), axis=1)
    z = np.abs(paths / np.sqrt(t))
    crossed = z >= np.array(c)
    first = np.where(crossed.any(axis=1), crossed.argmax(axis=1), -1)
    spent = np.diff([0.0] + [looks.spent(x, 0.05, spending) for x in t])
    for k in range(3):
        share = np.mean(first == k)
        assert abs(share - spent[k]) < 4 * math.sqrt(spent[k] / 400_000) + 1e-4, (k, share, spent[k])
    assert math.isclose(spent.sum(), 0.05, rel_tol=1e-9)


def test_paired_p_values_against_scipy_one_sample_tests():
    a, b = {0: 71.0, 1: 73.0, 2: 72.5, 3: 70.0}, {0: 70.0, 1: 71.5, 2: 72.0, 3: 70.2}
    d = np.array([1.0, 1.5, 0.5, -0.2])
    n, diff, p, tost = looks.paired_p_values(a, b, margin=2.0)
    assert n == 4 and math.isclose(diff, d.mean())
    assert math.isclose(p, stats.ttest_1samp(d, 0).pvalue, rel_tol=1e-9)
    lower = stats.ttest_1samp(d, -2.0, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, 2.0, alternative="less").pvalue
    assert math.isclose(tost, max(lower, upper), rel_tol=1e-9)
    n, _, p, tost = looks.paired_p_values({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}, 0.5)  # equal differences
    assert p == 0.5 and math.isnan(tost)  # the exact sign-flip p (2/2^2), never 0


STUDENT = {0: 70.0, 1: 71.0, 2: 72.0, 3: 70.5, 4: 71.5}
DIFF = {"kd": [10.0, 10.1, 9.9], "at": [0.01, -0.01, 0.0], "fitnet": [2.0, -1.0, 0.5, 1.5, -0.5]}


def budget_suite(tmp_path, seeds=None):
    cfg = {"name": "budget", "device": "cpu", "runs_dir": str(tmp_path / "runs"),
           "datasets": {"cifar100": {"root": str(tmp_path / "data")}},
           "experiments": [{"name": "main", "dataset": "cifar100", "pairs": [["resnet14", "resnet8"]],
                            "methods": ["student", "kd", "at", "fitnet"],
                            "seeds": seeds or {"min": 3, "looks": [3, 5], "margin": 0.5}}],
           "tables": [{"name": "main", "experiments": ["main"]}]}
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_results(suite):
    for c in suite.cells:
        v = STUDENT[c.seed] + (DIFF[c.column][c.seed] if c.column in DIFF else 0.0) if c.column != "teacher" else 90.0
        folder = Path(suite.run_dir(c.run))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({"status": "ok", "acc_last": v, "acc_best": v}))


def seeds_of(suite):
    out = {}
    for c in suite.cells:
        out.setdefault(c.column, set()).add(c.seed)
    return {k: sorted(v) for k, v in out.items()}


def test_next_look_adds_seeds_only_to_undecided_cells(tmp_path):
    path = budget_suite(tmp_path)
    suite = load_suite(path)
    assert seeds_of(suite) == {"teacher": [0], "student": [0, 1, 2], "kd": [0, 1, 2], "at": [0, 1, 2],
                               "fitnet": [0, 1, 2]}
    write_results(suite)
    state = looks.next_look(suite)["main"]
    level = looks.look_level([3, 5], 0, 0.05, "obrien_fleming")  # the α the first look spends
    decided = {d["method"]: d["decision"] for d in state["decisions"]}
    assert decided == {"kd": "differs", "at": "equivalent", "fitnet": "undecided"}
    assert all(d["level"] == level for d in state["decisions"]) and level < 0.05 / 3
    # Holm over the family of 3: kd's p passes the first look's level of a design spending α/3
    assert looks.paired_p_values({s: STUDENT[s] + DIFF["kd"][s] for s in range(3)},
                                 {s: STUDENT[s] for s in range(3)}, 0.5)[2] <= looks.look_level([3, 5], 0, 0.05 / 3,
                                                                                                "obrien_fleming")
    suite = load_suite(path)  # the suite reads the state: only fitnet and its reference get seeds 3, 4
    assert seeds_of(suite) == {"teacher": [0], "student": [0, 1, 2, 3, 4], "kd": [0, 1, 2], "at": [0, 1, 2],
                               "fitnet": [0, 1, 2, 3, 4]}
    assert "O'Brien–Fleming-type" in (tmp_path / "runs/looks/budget.md").read_text()
    with pytest.raises(ValueError, match="have not finished"):
        looks.next_look(suite)
    write_results(suite)
    state = looks.next_look(suite)["main"]
    assert state["done"] and [d["method"] for d in state["decisions"]] == ["kd", "at", "fitnet", "fitnet"]
    assert state["decisions"][-1]["n"] == 5 and state["decisions"][-1]["level"] == looks.look_level([3, 5], 1, 0.05, "obrien_fleming")
    assert seeds_of(load_suite(path))["fitnet"] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seeds, message", [
    ({"looks": [3, 3]}, "must be increasing seed counts"),
    ({"min": 2, "looks": [3, 5]}, "min 2 is the first look's seed count"),
])
def test_bad_budgets_are_refused_with_the_fix(tmp_path, seeds, message):
    with pytest.raises(SuiteError, match=message):
        load_suite(budget_suite(tmp_path, seeds))


def test_a_budget_changed_after_a_look_is_refused(tmp_path):
    suite = load_suite(budget_suite(tmp_path))
    write_results(suite)
    looks.next_look(suite)
    with pytest.raises(SuiteError, match="delete .*budget.json to start the looks again"):
        load_suite(budget_suite(tmp_path, {"looks": [3, 10], "margin": 0.5}))


def test_looks_loop_end_to_end_through_snakemake(tmp_path):
    """1-epoch resnet8 runs on tiny synthetic data: look 1 at 2 seeds cannot decide anything at
    O'Brien–Fleming's first level (df 1), so kd and student get a third seed; then the last look."""
    suite = write_suite(tmp_path / "tiny.yaml", tmp_path / "data", recipe={"epochs": 1})
    cfg = yaml.safe_load(suite.read_text())
    cfg["experiments"][0]["seeds"] = {"looks": [2, 3], "margin": 0.001}
    suite.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "kdbench.commands.cli", "looks", "--suite", str(suite), "--cores", "2",
                           "--", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    state = json.loads((tmp_path / "runs/looks/tiny.json").read_text())["main"]
    assert state["done"] and [d["decision"] for d in state["decisions"]] == ["undecided", "undecided"]
    runs = pd.read_csv(tmp_path / "results/tiny/runs.csv")
    assert sorted(runs[runs.method == "kd"].seed) == [0, 1, 2] and set(runs.status) == {"ok"}
    assert (tmp_path / "results/tiny/main_forest.png").is_file()
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "--cores", "1", "--config", f"suite_file={suite}", "-n"], capture_output=True, text=True)
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.parametrize("values, decision, seeds", [
    ({0: 72.50, 1: 72.51, 2: 72.49}, "equivalent", [0, 1, 2]),  # reproduced within ±0.5 already at look 1
    ({0: 70.0, 1: 75.0, 2: 72.5}, "undecided", [0, 1, 2, 3, 4]),  # inconclusive: more seeds
])
def test_reproduction_verdicts_drive_the_looks(tmp_path, values, decision, seeds):
    """A paper-table cell (OT's CIFAR-100 table, Student 72.50, no published spread: s_p = s_r
    assumed) gets the next look's seeds only while its verdict is undecided."""
    cfg = {"name": "repro", "device": "cpu", "runs_dir": str(tmp_path / "runs"),
           "datasets": {"cifar100": {"root": str(tmp_path / "data")}},
           "experiments": [{"name": "main", "dataset": "cifar100", "pairs": [["resnet32x4", "resnet8x4"]],
                            "methods": ["student"], "seeds": {"looks": [3, 5]}}],
           "tables": [{"name": "ot", "experiments": ["main"], "margin": 0.5,
                       "published": {"paper": "lohit2022_ot", "table": "CIFAR-100 table"},
                       "rows": {"Student": "student"}}]}
    path = tmp_path / "repro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    suite = load_suite(path)
    for c in suite.cells:
        v = values[c.seed] if c.column == "student" else 79.0
        Path(suite.run_dir(c.run)).mkdir(parents=True, exist_ok=True)
        Path(suite.run_dir(c.run), "metrics.json").write_text(json.dumps({"status": "ok", "acc_last": v}))
    state = looks.next_look(suite)["main"]
    [d] = state["decisions"]
    assert d["reference"].startswith("published (ot: Student") and d["decision"] == decision
    x = np.array(list(values.values()))
    se = x.std(ddof=1) * math.sqrt(1 / 3 + 1)  # no spread, run count unpublished: one run with s_p = s_r
    assert math.isclose(d["p"], 2 * stats.t.sf(abs(x.mean() - 72.50) / se, 2), rel_tol=1e-6)
    assert seeds_of(load_suite(path))["student"] == seeds
    from kdbench.report import paper_tables as pt
    suite = load_suite(path)
    cell = pt.compute(pt.table_specs(suite)[0], suite).cell("Student", "resnet32x4 → resnet8x4")
    assert f"looks: {decision} (look 1, n = 3)" in pt.cell_text(cell)


def test_the_primary_family_drives_the_looks(tmp_path):
    """A table with a primary family (here the suite's own `primary:`; a paper table's comes from its
    claims file): the looks test its claims, not every method − reference, and give the next look's
    seeds to both sides of an undecided claim only."""
    path = budget_suite(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["tables"] = [{"name": "main", "experiments": ["main"], "reference": "student",
                      "rows": {"Student": "student", "KD": "kd", "AT": "at", "FitNet": "fitnet"},
                      "primary": {"FitNet": ["AT"], "KD": ["Student"]}}]
    path.write_text(yaml.safe_dump(cfg))
    suite = load_suite(path)
    write_results(suite)
    state = looks.next_look(suite)["main"]
    tests = {d["test"]: d["decision"] for d in state["decisions"]}
    assert set(tests) == {"main: FitNet − AT (resnet14 → resnet8)", "main: KD − Student (resnet14 → resnet8)"}
    assert tests["main: KD − Student (resnet14 → resnet8)"] == "differs"
    assert tests["main: FitNet − AT (resnet14 → resnet8)"] == "undecided"
    assert seeds_of(load_suite(path)) == {"teacher": [0], "student": [0, 1, 2], "kd": [0, 1, 2], "at": [0, 1, 2, 3, 4],
                                          "fitnet": [0, 1, 2, 3, 4]}
    assert "Holm over the whole family at every look" in (tmp_path / "runs/looks/budget.md").read_text()
    # the table then prints the looks' decision, never a fixed-n p on the adaptively collected seeds
    from kdbench.report import paper_tables as pt
    suite = load_suite(path)
    md = pt.markdown(pt.compute(pt.table_specs(suite)[0], suite))
    assert "looks: differs (look 1, n = 3)" in md and "looks: undecided (look 1, n = 3)" in md
    assert "— (adaptive n)" in md and "n is adaptive" in md


def test_a_first_look_that_cannot_stop_is_warned_before_any_run(tmp_path, capsys):
    """O'Brien–Fleming at looks 3, 5, 10: the first look needs |t| ≥ 108 at 3 seeds; `kdbench looks`
    says so before it trains anything. Looks 3, 5 (|t| ≥ 11 suffices for one test) pass silently."""
    path = budget_suite(tmp_path, {"looks": [3, 5, 10], "margin": 0.5})
    [why] = looks.warn_first_looks(str(path))
    assert "experiment 'main'" in why and "can decide nothing" in why and "108" in capsys.readouterr().err
    assert looks.warn_first_looks(str(budget_suite(tmp_path))) == []
