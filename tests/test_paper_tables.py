"""Paper-layout tables from run records written by hand (no training): values, failures, tests."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from kdbench.report import paper_tables as pt
from kdbench.stats.paired import paired_test, pooled_sd, seeds_needed
from kdbench.stats.verdict import classify
from kdbench.planning.suite import SuiteError, load_suite

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


def write_suite(path, pair=("resnet32x4", "resnet8x4"), tables=None, name="t", primary=None):
    cfg = {"name": name, "device": "cpu", "runs_dir": str(path.parent / "runs"),
           "datasets": {"cifar100": {"root": str(path.parent / "data")}},
           "experiments": [{"name": "e", "dataset": "cifar100", "pairs": [list(pair)],
                            "methods": ["student", "kd", "crd"], "seeds": [0, 1, 2, 3]}],
           "tables": tables if tables is not None else [{
               "name": "t1", "experiments": ["e"], "metric": "acc_last",
               "published": {"paper": "tian2020_crd", "table": CRD_T1},
               "rows": {"Teacher": "teacher", "Student": "student", "KD": "kd", "CRD": "crd"},
               "groups": [{"pair": list(pair)}], **({"primary": primary} if primary else {})}]}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fake_runs(suite, acc=ACC, acc5_offset=None):
    """metrics.json for every cell listed in ``acc`` (acc_best = acc_last + 0.5)."""
    for c in suite.cells:
        v = acc.get(c.column, {}).get(c.seed)
        if v is None:
            continue
        d = suite.runs_dir + "/" + c.run
        if v == "failed":
            m = {"status": "failed", "failure": "non-finite loss in epoch 3", "acc_last": None}
        elif v == "nan":  # finished, but its accuracy is not a number
            m = {"status": "ok", "acc_last": float("nan"), "acc_best": float("nan"), "acc5_last": 90.0, "acc5_best": 90.0}
        else:
            m = {"status": "ok", "acc_last": v, "acc_best": v + 0.5, "acc5_last": v + 15.0, "acc5_best": v + 15.5}
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
    # CRD prints no spread nor run count: one published run with s_p = s_r, df = n_r − 1; δ = 0.5 on CIFAR-100
    s = np.std(list(x), ddof=1)
    se = s * math.sqrt(1 / 4 + 1)
    h90 = stats.t.ppf(0.95, 3) * se
    assert math.isclose(crd.check.se, se) and crd.check.df == 3 and crd.check.margin == 0.5
    assert math.isclose(crd.check.ci90[0], crd.delta - h90) and math.isclose(crd.check.ci90[1], crd.delta + h90)
    assert crd.verdict == classify(crd.delta, se, 3, 0.5)[0] == "inconclusive"
    # one published run with our sd 0.40: its noise alone puts the 90% half-width (≥ 1.645·0.40) past δ
    assert crd.check.more_seeds is None and "not decided by 100 more seeds" in pt.cell_text(crd)
    teacher = res.cell("Teacher", "resnet32x4 → resnet8x4")
    assert teacher.n == 1 and teacher.verdict == "no verdict: n < 3" and teacher.published == 79.42
    assert res.cell("KD", "resnet32x4 → resnet8x4").verdict == "no verdict: n < 3"  # two finished seeds


def test_published_runs_sets_the_assumed_n_p(tmp_path):
    tables = [{"name": "t1", "experiments": ["e"], "published": {"paper": "tian2020_crd", "table": CRD_T1},
               "rows": {"CRD": "crd"}, "groups": [{"pair": ["resnet32x4", "resnet8x4"]}], "published_runs": 8}]
    suite = load_suite(write_suite(tmp_path / "t.yaml", tables=tables))
    fake_runs(suite)
    crd = pt.compute(pt.table_specs(suite)[0], suite).cell("CRD", "resnet32x4 → resnet8x4")
    s = np.std(list(ACC["crd"].values()), ddof=1)  # 8 stated runs, no spread: SE = s_r·√(1/4 + 2²/8)
    assert math.isclose(crd.check.se, s * math.sqrt(1 / 4 + 4 / 8)) and "n_p = 8 stated by the suite" in crd.check.assumption


def test_published_values_print_as_printed_with_their_spread_type(tmp_path):
    tables = [{"name": "t2", "experiments": ["e"], "layout": "methods_as_columns",
               "published": {"paper": "he2022_fkd", "table": "Table 2 (submission version)"},
               "rows": {"Student (from Tian et al. 2020)": "student", "KD (from Tian et al. 2020)": "kd",
                        "FKD": "crd"}, "groups": [{"pair": ["resnet32x4", "resnet8x4"]}]}]
    suite = load_suite(write_suite(tmp_path / "t.yaml", tables=tables))
    fake_runs(suite)
    res = pt.compute(pt.table_specs(suite)[0], suite)
    g = "resnet32x4 → resnet8x4"
    student, kd, fkd = (res.cell(r, g) for r in ("Student (from Tian et al. 2020)", "KD (from Tian et al. 2020)", "FKD"))
    assert "pub 72.50" in pt.cell_text(student) and student.spread_type == "none"  # not 72.5
    assert "pub 73.33 ± 0.22 (type unknown)" in pt.cell_text(kd)
    assert "pub 75.57 ± 0.22 (95% CI, n=5)" in pt.cell_text(fkd)
    # FKD's ± is a 95% CI over 5 students: s_p = 0.22·√5 / t_{0.975,4}, Welch with n_p = 5
    s_p, s_r = 0.22 * math.sqrt(5) / stats.t.ppf(0.975, 4), np.std(list(ACC["crd"].values()), ddof=1)
    assert math.isclose(fkd.check.se, math.sqrt(s_r ** 2 / 4 + s_p ** 2 / 5))
    assert pt.cells_frame(res).set_index("row").loc["Student (from Tian et al. 2020)", "published"] == "72.50"


def test_failed_and_missing_seeds_are_counted_and_shown(table):
    _, res = table
    kd = res.cell("KD", "resnet32x4 → resnet8x4")
    assert (kd.n, kd.n_failed, kd.n_missing, kd.n_expected) == (2, 1, 1, 4)
    assert math.isclose(kd.mean, 73.2)  # the failed and the missing seed are never averaged
    md = pt.markdown(res)
    assert "73.20 ± " in md and "(n=2) [failed 1, missing 1]" in md
    cells = pt.cells_frame(res).set_index("row")
    assert cells.loc["KD", "n_failed"] == 1 and cells.loc["KD", "n_missing"] == 1 and cells.loc["KD", "seeds"] == "0 2"


def test_primary_family_holm_and_exploratory_bh(tmp_path):
    suite = load_suite(write_suite(tmp_path / "t.yaml", primary={"CRD": ["KD", "Student"]}))
    fake_runs(suite)
    res = pt.compute(pt.table_specs(suite)[0], suite)
    s, c = ACC["student"], ACC["crd"]
    p_crd_kd = stats.ttest_rel([c[0], c[2]], [73.0, 73.4]).pvalue  # only seeds 0 and 2 finished on both sides
    p_crd_s = stats.ttest_rel(list(c.values()), list(s.values())).pvalue
    p_kd_s = stats.ttest_rel([73.0, 73.4], [s[0], s[2]]).pvalue
    by = {(k.a, k.b): k for k in res.comparisons}
    assert set(by) == {("CRD", "KD"), ("CRD", "Student"), ("KD", "Student")}
    assert by[("CRD", "KD")].family == by[("CRD", "Student")].family == "primary"
    lo, hi = sorted([p_crd_kd, p_crd_s])  # Holm, m = 2: 2·p_(1), then max(2·p_(1), p_(2))
    holm = {lo: min(1, 2 * lo), hi: max(min(1, 2 * lo), hi)}
    assert math.isclose(by[("CRD", "KD")].p_adj, holm[p_crd_kd]) and math.isclose(by[("CRD", "Student")].p_adj, holm[p_crd_s])
    kd = by[("KD", "Student")]  # the other method against the reference: exploratory, BH (a family of 1)
    assert kd.family == "exploratory" and kd.correction == "BH" and math.isclose(kd.p_adj, p_kd_s)
    assert res.cell("KD", "resnet32x4 → resnet8x4").test.seeds == (0, 2)
    assert res.cell("Teacher", "resnet32x4 → resnet8x4").test is None  # teachers are not paired with students
    # seeds needed: δ = 0.5 at α/m, the sd of the differences pooled over the primary family
    sd = pooled_sd([by[k].test.sd_diff for k in (("CRD", "KD"), ("CRD", "Student"))], [2, 4])
    assert res.seeds_plan.n == seeds_needed(0.5, sd, 0.025) and math.isclose(res.seeds_plan.alpha, 0.025)
    md = pt.markdown(res)
    assert "Primary family" in md and "Holm at α = 0.05 over 2 distinct test(s)" in md and "Benjamini–Hochberg" in md


def test_primary_family_names_must_be_rows(tmp_path):
    with pytest.raises(SuiteError, match="primary: 'CDR' is not a row label. Did you mean 'CRD'"):
        pt.table_specs(load_suite(write_suite(tmp_path / "t.yaml", primary={"CDR": ["KD"]})))


def test_non_finite_accuracy_counts_as_failed_never_averaged(tmp_path):
    from kdbench.report.aggregate import run_records, summarise
    suite = load_suite(write_suite(tmp_path / "t.yaml"))
    fake_runs(suite, {**ACC, "student": {**ACC["student"], 3: "nan"}})
    cell = pt.compute(pt.table_specs(suite)[0], suite).cell("Student", "resnet32x4 → resnet8x4")
    assert (cell.n, cell.n_failed) == (3, 1) and math.isclose(cell.mean, np.mean([72.1, 72.6, 71.9]))
    row = summarise(run_records(suite)).set_index("method").loc["student"]  # kdbench aggregate counts it alike
    assert (row.n, row.n_failed, row.n_missing) == (3, 1, 0) and math.isclose(row.acc_last_mean, cell.mean)


def test_identical_seeds_get_no_verdict(tmp_path):
    suite = load_suite(write_suite(tmp_path / "t.yaml"))
    fake_runs(suite, {**ACC, "crd": {0: 75.5, 1: 75.5, 2: 75.5, 3: 75.5}})
    res = pt.compute(pt.table_specs(suite)[0], suite)
    assert res.cell("CRD", "resnet32x4 → resnet8x4").verdict == "no verdict: sd 0 (every seed equal)"


def test_layout_csv_has_the_papers_rows_and_columns(table, tmp_path):
    suite, _ = table
    written = pt.write_tables(suite, tmp_path / "out")
    layout = pd.read_csv(written["t1.csv"])
    assert list(layout.iloc[:, 0]) == ["Teacher", "Student", "KD", "CRD"]
    g = "resnet32x4 → resnet8x4"
    assert {f"{g} | mean", f"{g} | ci95_half_width", f"{g} | n", f"{g} | failed", f"{g} | published", f"{g} | verdict"} <= set(layout.columns)
    assert layout.set_index(layout.columns[0]).loc["KD", f"{g} | failed"] == 1
    md = written["t1.md"].read_text()
    assert "last epoch" in md and CRD_T1 in md and "Benjamini–Hochberg" in md


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
    assert all(c.check is None for c in res.cells) and "No reproduction verdicts" in pt.markdown(res)
    assert not any(v in pt.markdown(res) for v in ("reproduced (", "inconclusive", "differs"))


def test_stand_in_repeating_one_test_counts_it_once(tmp_path):
    paperish = [{"name": "t1", "experiments": ["e"], "published": {"paper": "tian2020_crd", "table": CRD_T1},
                 "rows": {"Student": "student", "KD": "kd", "CRD": "crd"}, "primary": {"CRD": ["KD"]},
                 "groups": [{"pair": ["resnet32x4", "resnet8x4"]}, {"pair": ["vgg13", "vgg8"]}]}]
    write_suite(tmp_path / "paperish.yaml", tables=paperish)
    mini = write_suite(tmp_path / "mini.yaml", ("resnet8", "resnet8"), name="mini",
                       tables=[{"name": "t1", "like": {"suite": "paperish.yaml"}, "experiments": ["e"], "stand_in": {}}])
    suite = load_suite(mini)
    fake_runs(suite)
    res = pt.compute(pt.table_specs(suite)[0], suite)
    primary = [k for k in res.comparisons if k.family == "primary"]
    assert len(primary) == 2 and primary[0].key == primary[1].key  # the same runs in both groups
    p = paired_test(ACC["crd"], {s: v for s, v in ACC["kd"].items() if v != "failed"}).p
    assert all(math.isclose(k.p_adj, p) for k in primary)  # Holm over m = 1, not 2


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
    from kdbench.report import compare
    suite, _ = table
    row, = compare.compare(suite, "crd", "kd")
    assert (row["pairs"], row["seeds"], row["kd_failed"], row["kd_missing"]) == (2, [0, 2], 1, 1)
    assert math.isclose(row["diff"], np.mean([75.2 - 73.0, 75.0 - 73.4]))
    assert math.isclose(row["p"], stats.ttest_rel([75.2, 75.0], [73.0, 73.4]).pvalue)
    # prospective seeds needed: δ = 0.5 (CIFAR-100), one pair so α = 0.05 and the pooled sd is this pair's
    assert row["seeds_needed"] == seeds_needed(0.5, row["sd_diff"], 0.05) and row["seeds_needed_effect"] == 0.5
    assert compare.compare(suite, "crd", "kd", effect=2.0)[0]["seeds_needed"] == seeds_needed(2.0, row["sd_diff"], 0.05)
    assert compare.main(["crd", "kd", "--suite", str(suite.path)]) == 0
    out = capsys.readouterr().out
    assert "crd − kd" in out and "kd: 1 failed, 1 missing" in out
    assert compare.main(["crd", "kdd", "--suite", str(suite.path)]) == 2
    assert "Did you mean 'kd'" in capsys.readouterr().err


def test_all_equal_cell_prints_no_zero_width_interval(tmp_path):
    suite = load_suite(write_suite(tmp_path / "t.yaml"))
    fake_runs(suite, {**ACC, "crd": {0: 75.5, 1: 75.5, 2: 75.5, 3: 75.5}})
    text = pt.cell_text(pt.compute(pt.table_specs(suite)[0], suite).cell("CRD", "resnet32x4 → resnet8x4"))
    assert "± 0.00" not in text and "75.50 (n=4, every seed equal)" in text and "no verdict: sd 0" in text


def test_a_test_two_tables_show_is_one_test_with_one_p(tmp_path):
    """Table a claims CRD vs KD and CRD vs Student (Holm, m = 2); table b shows KD − CRD (reversed,
    its reference is CRD): the same runs and metric, so b prints a's Holm p and names a's family."""
    rows = {"Student": "student", "KD": "kd", "CRD": "crd"}
    base = {"experiments": ["e"], "published": {"paper": "tian2020_crd", "table": CRD_T1},
            "groups": [{"pair": ["resnet32x4", "resnet8x4"]}], "rows": rows}
    tables = [{"name": "a", **base, "primary": {"CRD": ["KD", "Student"]}},
              {"name": "b", **base, "reference": "crd"}]
    suite = load_suite(write_suite(tmp_path / "t.yaml", tables=tables))
    fake_runs(suite)
    a, b = pt.compute_tables(suite)
    in_a = next(c for c in a.comparisons if (c.a, c.b) == ("CRD", "KD"))
    in_b = next(c for c in b.comparisons if (c.a, c.b) == ("KD", "CRD"))
    p_kd = stats.ttest_rel([75.2, 75.0], [73.0, 73.4]).pvalue
    p_s = stats.ttest_rel(list(ACC["crd"].values()), list(ACC["student"].values())).pvalue
    holm = min(1, 2 * p_kd) if p_kd <= p_s else max(min(1, 2 * p_s), p_kd)
    assert math.isclose(in_a.p_adj, holm) and in_b.p_adj == in_a.p_adj
    assert in_b.family == "primary" and in_b.owner == "a" and math.isclose(in_b.test.mean_diff, -in_a.test.mean_diff)
    assert "family of a" in pt.markdown(b)
    # b's other test, Student − CRD, is a's claim CRD vs Student reversed: a's family too
    own = next(c for c in b.comparisons if (c.a, c.b) == ("Student", "CRD"))
    assert own.owner == "a" and own.family == "primary" and own.p_adj == next(
        c for c in a.comparisons if (c.a, c.b) == ("CRD", "Student")).p_adj
