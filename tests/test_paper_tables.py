"""Paper-layout tables from run records written by hand (no training): values, failures, tests."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from kdbench.stats import paper_tables as pt
from kdbench.suite import SuiteError, load_suite

from conftest import REPO

PUBLISHED = pd.read_csv(REPO / "kdbench/reference/published.csv")
CRD_T1 = "Table 1 (same architecture family)"
# per column: seed -> last-epoch accuracy, "failed", or absent (missing: never ran)
ACC = {"teacher": {0: 79.0},
       "student": {0: 72.1, 1: 72.6, 2: 71.9, 3: 72.8},
       "kd": {0: 73.0, 1: "failed", 2: 73.4},
       "crd": {0: 75.2, 1: 75.9, 2: 75.0, 3: 75.6}}


def published(table, teacher, student, method, metric="top1_acc_pct"):
    r = PUBLISHED[(PUBLISHED.table == table) & (PUBLISHED.teacher == teacher) & (PUBLISHED.student == student)
                  & (PUBLISHED.method == method) & (PUBLISHED.metric == metric)]
    assert len(r) == 1
    return float(r.value.iloc[0])


def write_suite(path, pair=("resnet32x4", "resnet8x4"), tables=None, name="t"):
    cfg = {"name": name, "device": "cpu", "runs_dir": str(path.parent / "runs"),
           "datasets": {"cifar100": {"root": str(path.parent / "data")}},
           "experiments": [{"name": "e", "dataset": "cifar100", "pairs": [list(pair)],
                            "methods": ["student", "kd", "crd"], "seeds": [0, 1, 2, 3]}],
           "tables": tables if tables is not None else [{
               "name": "t1", "experiments": ["e"], "metric": "acc_last",
               "published": {"paper": "tian2020_crd", "table": CRD_T1},
               "rows": {"Teacher": "teacher", "Student": "student", "KD": "kd", "CRD": "crd"},
               "groups": [{"pair": list(pair)}]}]}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fake_runs(suite, acc=ACC, acc5_offset=None):
    """metrics.json for every cell listed in ``acc`` (acc_best = acc_last + 0.5)."""
    for c in suite.cells:
        v = acc.get(c.column, {}).get(c.seed)
        if v is None:
            continue
        d = suite.runs_dir + "/" + c.run
        m = {"status": "failed", "failure": "non-finite loss in epoch 3", "acc_last": None} if v == "failed" else \
            {"status": "ok", "acc_last": v, "acc_best": v + 0.5, "acc5_last": v + 15.0, "acc5_best": v + 15.5}
        Path(d).mkdir(parents=True, exist_ok=True)
        Path(d, "metrics.json").write_text(json.dumps(m))


@pytest.fixture
def table(tmp_path):
    suite = load_suite(write_suite(tmp_path / "t.yaml"))
    fake_runs(suite)
    spec, = pt.table_specs(suite)
    return suite, pt.compute(spec, suite)


def test_cell_values_published_delta_and_verdict(table):
    _, res = table
    crd = res.cell("CRD", "resnet32x4 → resnet8x4")
    x = ACC["crd"].values()
    lo, hi = stats.t.interval(0.95, 3, loc=np.mean(list(x)), scale=stats.sem(list(x)))
    pub = published(CRD_T1, "resnet32x4", "resnet8x4", "CRD")
    assert crd.n == 4 and math.isclose(crd.mean, np.mean(list(x))) and math.isclose(crd.lo, lo) and math.isclose(crd.hi, hi)
    assert crd.published == pub and math.isclose(crd.delta, np.mean(list(x)) - pub)
    assert crd.verdict == ("within CI" if lo <= pub <= hi else "pub above CI" if pub > hi else "pub below CI")
    teacher = res.cell("Teacher", "resnet32x4 → resnet8x4")
    assert teacher.n == 1 and teacher.verdict == "n<2: no CI" and teacher.published == 79.42


def test_failed_and_missing_seeds_are_counted_and_shown(table):
    _, res = table
    kd = res.cell("KD", "resnet32x4 → resnet8x4")
    assert (kd.n, kd.n_failed, kd.n_missing, kd.n_expected) == (2, 1, 1, 4)
    assert math.isclose(kd.mean, 73.2)  # the failed and the missing seed are never averaged
    md = pt.markdown(res)
    assert "73.20 ± " in md and "(n=2) [failed 1, missing 1]" in md
    cells = pt.cells_frame(res).set_index("row")
    assert cells.loc["KD", "n_failed"] == 1 and cells.loc["KD", "n_missing"] == 1 and cells.loc["KD", "seeds"] == "0 2"


def test_paired_tests_against_reference_with_holm(table):
    _, res = table
    kd, crd = res.cell("KD", "resnet32x4 → resnet8x4"), res.cell("CRD", "resnet32x4 → resnet8x4")
    s = ACC["student"]
    p_kd = stats.ttest_rel([73.0, 73.4], [s[0], s[2]]).pvalue  # only seeds 0 and 2 finished on both sides
    p_crd = stats.ttest_rel(list(ACC["crd"].values()), list(s.values())).pvalue
    assert kd.test.seeds == (0, 2) and math.isclose(kd.test.p, p_kd) and math.isclose(crd.test.p, p_crd)
    lo, hi = sorted([p_kd, p_crd])  # Holm, m = 2: 2·p_(1), then max(2·p_(1), p_(2))
    holm_lo, holm_hi = min(1, 2 * lo), max(min(1, 2 * lo), hi)
    assert math.isclose(min(kd.p_holm, crd.p_holm), holm_lo) and math.isclose(max(kd.p_holm, crd.p_holm), holm_hi)
    assert res.cell("Teacher", "resnet32x4 → resnet8x4").test is None  # teachers are not paired with students


def test_layout_csv_has_the_papers_rows_and_columns(table, tmp_path):
    suite, _ = table
    written = pt.write_tables(suite, tmp_path / "out")
    layout = pd.read_csv(written["t1.csv"])
    assert list(layout.iloc[:, 0]) == ["Teacher", "Student", "KD", "CRD"]
    g = "resnet32x4 → resnet8x4"
    assert {f"{g} | mean", f"{g} | ci95", f"{g} | n", f"{g} | failed", f"{g} | published", f"{g} | verdict"} <= set(layout.columns)
    assert layout.set_index(layout.columns[0]).loc["KD", f"{g} | failed"] == 1
    md = written["t1.md"].read_text()
    assert "last epoch" in md and CRD_T1 in md and "Holm" in md


def test_error_metric_and_methods_as_columns(tmp_path):
    tables = [{"name": "imnet", "experiments": ["e"], "layout": "methods_as_columns",
               "published": {"paper": "lohit2022_ot", "table": "ImageNet table"},
               "rows": {"Student": "student", "KD": "kd"},
               "groups": [{"label": "top-1 err", "metric": "err_last", "published": {"teacher": "ResNet34", "student": "ResNet18"}},
                          {"label": "top-5 err", "metric": "err5_last", "published": {"teacher": "ResNet34", "student": "ResNet18"}}]}]
    suite = load_suite(write_suite(tmp_path / "t.yaml", ("imagenet_resnet34", "imagenet_resnet18"), tables))
    fake_runs(suite)
    res = pt.compute(pt.table_specs(suite)[0], suite)
    top5 = res.cell("Student", "top-5 err")
    assert math.isclose(top5.mean, 100 - np.mean([v + 15 for v in ACC["student"].values()]))
    assert top5.published == published("ImageNet table", "ResNet34", "ResNet18", "Student", "top5_err_pct")
    header = pt.markdown(res).split("\n")[2]
    assert header.index("Student") < header.index("KD")  # methods are the columns


def test_stand_in_reuses_layout_and_published_values(tmp_path):
    write_suite(tmp_path / "paperish.yaml")
    mini = write_suite(tmp_path / "mini.yaml", ("resnet8", "resnet8"), name="mini",
                       tables=[{"name": "t1", "like": {"suite": "paperish.yaml"}, "experiments": ["e"], "stand_in": {}}])
    suite = load_suite(mini)
    fake_runs(suite)
    res = pt.compute(pt.table_specs(suite)[0], suite)
    assert [g.label for g in res.spec.groups] == ["resnet32x4 → resnet8x4"] and list(res.spec.rows) == ["Teacher", "Student", "KD", "CRD"]
    cell = res.cell("CRD", "resnet32x4 → resnet8x4")
    assert cell.published == published(CRD_T1, "resnet32x4", "resnet8x4", "CRD") and cell.n == 4
    assert res.spec.groups[0].pair == ("resnet8", "resnet8") and "STAND-IN" in pt.markdown(res)


def test_ambiguous_published_filter_is_refused(tmp_path):
    tables = [{"name": "amb", "experiments": ["e"], "published": {"metric": "top1_acc_pct"},
               "rows": {"Student": "student"}, "groups": [{"pair": ["wrn_40_2", "wrn_16_2"]}]}]
    suite = load_suite(write_suite(tmp_path / "t.yaml", ("wrn_40_2", "wrn_16_2"), tables))
    n = len(PUBLISHED[(PUBLISHED.teacher == "wrn_40_2") & (PUBLISHED.student == "wrn_16_2")
                      & (PUBLISHED.method == "Student") & (PUBLISHED.metric == "top1_acc_pct")])
    assert n > 1  # CRD Table 1, the OT CIFAR-100 and SVHN tables
    with pytest.raises(SuiteError, match=f"matches {n} rows"):
        pt.compute(pt.table_specs(suite)[0], suite)


def test_bad_table_config_names_valid_choices(tmp_path):
    tables = [{"name": "bad", "experiments": ["e"], "rows": {"KD": "kd"}, "metric": "acc_lats"}]
    with pytest.raises(SuiteError, match="acc_last"):
        load_suite(write_suite(tmp_path / "t.yaml", tables=tables))
    tables = [{"name": "bad", "experiments": ["e"], "rows": {"KD": "kd"}, "groups": [{"experiments": ["nope"]}]}]
    with pytest.raises(SuiteError, match="unknown experiment 'nope'; valid: e"):
        pt.table_specs(load_suite(write_suite(tmp_path / "t.yaml", tables=tables)))


def test_cli_writes_every_output(table, tmp_path, capsys):
    suite, _ = table
    assert pt.main(["--suite", str(suite.path), "--out", str(tmp_path / "cli")]) == 0
    assert {p.name for p in (tmp_path / "cli").iterdir()} == {"t1.md", "t1.csv", "t1_cells.csv"}


def test_typos_in_columns_and_pairs_are_refused(tmp_path):
    tables = [{"name": "bad", "experiments": ["e"], "rows": {"KD": "kdd"}}]
    with pytest.raises(SuiteError, match="unknown column 'kdd'. Did you mean 'kd'"):
        pt.table_specs(load_suite(write_suite(tmp_path / "t.yaml", tables=tables)))
    tables = [{"name": "bad", "experiments": ["e"], "rows": {"KD": "kd"}, "groups": [{"pair": ["resnet32x4", "resnet8"]}]}]
    with pytest.raises(SuiteError, match="no pair \\['resnet32x4', 'resnet8'\\].*resnet32x4 -> resnet8x4 on cifar100"):
        pt.table_specs(load_suite(write_suite(tmp_path / "t.yaml", tables=tables)))


def test_compare_two_methods_from_disk(table, capsys):
    from kdbench.stats import compare
    suite, _ = table
    row, = compare.compare(suite, "crd", "kd")
    assert (row["pairs"], row["seeds"], row["kd_failed"], row["kd_missing"]) == (2, [0, 2], 1, 1)
    assert math.isclose(row["diff"], np.mean([75.2 - 73.0, 75.0 - 73.4]))
    assert math.isclose(row["p"], stats.ttest_rel([75.2, 75.0], [73.0, 73.4]).pvalue)
    assert compare.main(["crd", "kd", "--suite", str(suite.path)]) == 0
    out = capsys.readouterr().out
    assert "crd − kd" in out and "kd: 1 failed, 1 missing" in out
    assert compare.main(["crd", "kdd", "--suite", str(suite.path)]) == 2
    assert "Did you mean 'kd'" in capsys.readouterr().err
