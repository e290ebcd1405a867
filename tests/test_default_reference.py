"""The default suite's RepDistiller reference: the recorded file, its provenance, and the verdicts
the main table prints against it (kdbench/report/reference.py, benchmarks/repdistiller_reference.py)."""

import hashlib
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.planning.suite import load_suite
from kdbench.report import reference

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "workflow/suites/smoke.yaml"
spec = importlib.util.spec_from_file_location("repdistiller_reference", ROOT / "benchmarks/repdistiller_reference.py")
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)


def smoke_reference_tables():
    return [t for t in yaml.safe_load(SMOKE.read_text())["tables"] if t.get("reproduces")]


# --- the recorded reference -------------------------------------------------------------------

def test_the_default_main_table_has_a_reference():
    assert [t["name"] for t in smoke_reference_tables()] == ["main"]


@pytest.mark.parametrize("table", smoke_reference_tables(), ids=lambda t: t["name"])
def test_recorded_reference_matches_the_suite_files_recipe_methods_and_seeds_of_today(table, tmp_path):
    runs, prov = reference.load_reference(table["reproduces"])
    suite = load_suite(SMOKE)
    (exp_name,) = table["experiments"]
    exp = next(e for e in suite.config["experiments"] if e["name"] == exp_name)
    params = suite.config["datasets"][exp["dataset"]]["synthetic"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["repdistiller"]["commit"])
    assert prov["synthetic"] == params and prov["experiment"] == exp_name
    assert prov["cpu"] and prov["torch"] and prov["date"] and len(prov["commands"]) == len(runs)
    # the files the synthetic writer produces for the suite today are those RepDistiller read
    ensure_synthetic(exp["dataset"], str(tmp_path), params)
    assert harness.data_checksums(tmp_path) == prov["data_sha256"]
    # the same methods as kdbench's experiment, at least as many runs as it has seeds (RepDistiller's
    # are repeated runs, seeded 0..n-1), and the same recipe
    cells = [c for c in suite.cells if c.experiment == exp_name]
    counts = runs.groupby("method").run.agg(list).to_dict()
    assert set(counts) == {c.column for c in cells}
    for method, ran in counts.items():
        assert ran == list(range(len(ran))) and len(ran) >= sum(c.column == method for c in cells), method
    student = next(c for c in cells if c.column == "student")
    teacher = next(c for c in cells if c.column == "teacher")
    assert prov["recipe"]["student"] == harness.recipe_args(suite.runs[student.run].spec.recipe, student.student)[:-4]
    assert prov["recipe"]["teacher"] == harness.recipe_args(suite.runs[teacher.run].spec.recipe, teacher.teacher)[:-4]
    assert runs.acc_last.between(0, 100).all() and (runs.acc_best >= runs.acc_last).all()
    # RepDistiller's students distilled from kdbench's teacher run of today's suite, which it
    # evaluated as kdbench did (the harness stops otherwise)
    assert prov["teacher"]["source"] == "kdbench" and prov["teacher"]["run"] == teacher.run
    assert re.fullmatch(r"[0-9a-f]{64}", prov["teacher"]["model_sha256"])
    assert abs(prov["teacher"]["repdistiller_acc"] - prov["teacher"]["kdbench_acc"]) <= 0.05
    recipes = [suite.runs[(teacher if m == "teacher" else student).run].spec.recipe for m in runs.method]
    assert (runs.epochs == [r.epochs for r in recipes]).all()  # trained every epoch of kdbench's recipe
    assert (runs.tested_epochs == [r.test_passes() for r in recipes]).all()  # and tested as kdbench does


def test_recipe_args_are_repdistillers_options_for_kdbenchs_recipe():
    from kdbench.core.spec import Recipe
    r = Recipe.from_config({"epochs": 12, "milestones": [8, 10], "batch_size": 32})
    assert harness.recipe_args(r, "resnet8") == [
        "--epochs", "12", "--learning_rate", "0.05", "--lr_decay_epochs", "8,10", "--lr_decay_rate", "0.1",
        "--weight_decay", "0.0005", "--momentum", "0.9", "--batch_size", "32", "--num_workers", "0", "--save_freq", "12"]
    assert harness.recipe_args(r, "ShuffleV2")[3] == "0.01"  # both use 0.01 for the small archs


def test_log_parser_keeps_validations_only():
    log = "\n".join([
        "==> loading teacher model", "Test: [0/2]\tAcc@1 12.5", " * Acc@1 40.000 Acc@5 90.000", "teacher accuracy:  tensor(40.)",
        "Epoch: [1][0/2]\tLoss 0.6", " * Acc@1 3.750 Acc@5 53.750",  # a training epoch's summary
        "Test: [0/2]\tAcc@1 12.5", " * Acc@1 12.500 Acc@5 52.500",
        "Epoch: [2][0/2]\tLoss 0.4", " * Acc@1 2.500 Acc@5 55.000",
        "Test: [0/2]\tAcc@1 12.5", " * Acc@1 15.250 Acc@5 60.000", "best accuracy: tensor(15.25)"])
    assert harness.test_accuracies(log) == [40.0, 12.5, 15.25]


# --- the verdicts the table prints -------------------------------------------------------------

def write_reference(folder: Path, values: dict, data_root: Path) -> None:
    rows = [{"experiment": "main", "teacher": "resnet20", "student": "resnet8", "method": m, "run": i,
             "acc_last": v, "acc_best": v, "epochs": 3, "wall_s": 1.0} for m, vs in values.items() for i, v in enumerate(vs)]
    pd.DataFrame(rows).to_csv(folder / "ref_test.csv", index=False)
    (folder / "ref_test.json").write_text(json.dumps({
        "repdistiller": {"commit": "b84f547c5db6a35318d4671d7d5c4de74c822403"},
        "data_sha256": harness.data_checksums(data_root)}))


def records(values: dict) -> pd.DataFrame:
    return pd.DataFrame([{"experiment": "main", "teacher": "resnet20", "student": "resnet8", "method": m, "seed": i,
                          "status": "ok", "acc_last": v, "acc_best": v} for m, vs in values.items() for i, v in enumerate(vs)])


def welch(a, b, margin):
    """Hand-computed Welch Δ, 90% CI and TOST decision (independent of kdbench.stats.verdict)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    d = a.mean() - b.mean()
    h = stats.t.ppf(0.95, df) * se
    return d, d - h, d + h, abs(d) + h < margin


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    ensure_synthetic("cifar100", str(root), {"classes": 10, "train_per_class": 2, "test_per_class": 1})
    monkeypatch.setattr(reference, "REFERENCE_DIR", tmp_path)
    return root


def row_of(text: str, method: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("|") and f"| {method} " in line)


def test_verdicts_are_welch_tost_of_kdbench_against_the_reference_runs(data_root, tmp_path):
    rng = np.random.default_rng(0)
    ref = {"student": list(80 + rng.normal(0, 0.4, 5)), "kd": list(84 + rng.normal(0, 0.4, 5)), "teacher": [88.0]}
    mine = {"student": list(80.1 + rng.normal(0, 0.4, 5)),  # reproduces
            "kd": list(81 + rng.normal(0, 0.4, 5)),          # 3 points off: differs
            "teacher": [88.3]}
    write_reference(tmp_path, ref, data_root)
    text = reference.reference_text(records(mine), {"experiments": ["main"], "reproduces": "ref_test"}, 1.0, data_root)
    for method, want in (("student", "reproduced (±1)"), ("kd", "differs")):
        d, lo, hi, equivalent = welch(mine[method], ref[method], 1.0)
        assert equivalent == (want.startswith("reproduced"))
        row = row_of(text, method)
        assert f"Δ {d:+.2f} [{lo:+.2f}, {hi:+.2f}] · {want}".replace("-", "−") in row, row
    assert "no verdict: n < 3" in row_of(text, "teacher")
    assert "δ = 1 pp" in text and "b84f547" in text


def test_a_stale_reference_prints_no_verdict(data_root, tmp_path):
    vals = {"student": [80.0, 80.5, 79.5, 80.2], "kd": [82.0, 82.4, 81.8, 82.1]}
    write_reference(tmp_path, vals, data_root)
    (data_root / "cifar-100-python" / "test").write_bytes(b"another task")
    text = reference.reference_text(records(vals), {"experiments": ["main"], "reproduces": "ref_test"}, 1.0, data_root)
    for method in vals:
        assert "no verdict: the data files differ from those the reference read (cifar-100-python/test)" in row_of(text, method)


def test_an_unknown_reference_names_the_known_ones(data_root, tmp_path):
    write_reference(tmp_path, {"student": [1.0, 2.0, 3.0]}, data_root)
    with pytest.raises(FileNotFoundError, match=r"'nope'.*known references: ref_test"):
        reference.load_reference("nope")
