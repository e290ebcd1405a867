"""Every published number is a cell of some paper table of the `paper` suite, or is excluded
once, with a reason, in kdbench/reference/coverage.yaml."""

import pandas as pd
import pytest
import yaml

from kdbench.report import paper_tables as pt
from kdbench.planning.suite import load_suite

from conftest import REPO

PUBLISHED = pd.read_csv(REPO / "kdbench/reference/published.csv")


@pytest.fixture(scope="module")
def paper():
    return load_suite(REPO / "workflow/suites/paper.yaml")


def test_reference_copy_extends_the_shared_one():
    """kdbench's copy starts with the shared reference's rows, their values unchanged; it may add
    rows (DKD's tables, from recipes.md §5.2) and columns."""
    shared = REPO.parent / "shared/reference/published.csv"
    if shared.is_file():
        ref = pd.read_csv(shared, dtype=str, keep_default_na=False)
        ours = pd.read_csv(REPO / "kdbench/reference/published.csv", dtype=str, keep_default_na=False)
        key = ["paper", "table", "dataset", "teacher", "student", "method", "metric", "value"]
        pd.testing.assert_frame_equal(ours.loc[:len(ref) - 1, key], ref[key])


def test_every_published_row_is_shown_or_excluded_once(paper):
    shown = pt.published_coverage(paper)
    excluded = pt.exclusions()
    rows = set(PUBLISHED.index)
    assert set(shown) | set(excluded) == rows, PUBLISHED.loc[sorted(rows - set(shown) - set(excluded))].to_string()
    assert not set(shown) & set(excluded), "a row is both shown by a table and excluded"
    assert all(len(reasons) == 1 and len(reasons[0].split()) >= 8 for reasons in excluded.values())
    text, problems = pt.coverage_report(paper)
    assert problems == 0 and len(text.splitlines()) == len(PUBLISHED)


def test_every_exclusion_matches_rows_and_has_a_reason():
    entries = yaml.safe_load((REPO / "kdbench/reference/coverage.yaml").read_text())["excluded"]
    for e in entries:
        assert set(e) == {"match", "reason"} and e["reason"].strip()
        assert len(pt.match_published(e["match"])) >= 1, e["match"]


def test_shown_rows_are_cells_the_suite_runs(paper):
    """A shown row's table cell exists: its column ran for the row's pair in the table's experiments."""
    rec = pt.Records(paper)
    for spec in pt.table_specs(paper):
        for g in spec.groups:
            for label, row in spec.rows.items():
                column = g.rows.get(label, row["column"])
                matched = pt.match_published(pt._published_filter(spec, g, label))
                if len(matched) and column != "teacher_ensemble":
                    assert pt.group_cells(rec, g, column), (spec.name, label, g.label)


def test_every_paper_table_has_a_suite_and_a_statistic(paper):
    names = {s.name for s in pt.table_specs(paper)}
    assert names == {"crd_table1", "crd_table2", "crd_transfer", "kda_table2", "kda_table3", "kda_fig3",
                     "fkd_table2", "fkd_fig4", "fkd_table1", "ot_cifar100", "ot_imagenet", "ot_svhn",
                     "dkd_same_family", "dkd_cross_family"}
    metric = {s.name: {g.metric for g in s.groups} for s in pt.table_specs(paper)}
    assert metric["crd_table1"] == metric["ot_cifar100"] == {"acc_last"}  # CRD, OT: last epoch
    assert metric["kda_table2"] == {"acc_best"}  # KDA's code keeps the best checkpoint
    assert metric["dkd_same_family"] == metric["dkd_cross_family"] == {"acc_best"}  # mdistiller: best epoch
    assert metric["ot_imagenet"] == {"err_last", "err5_last"}


def test_published_spreads_have_a_type_and_run_count():
    """Every ± has its type (statistics.md §4): FKD's own rows are 95% CIs over 5 students, KDA's and
    the CRD numbers FKD quotes are of unknown type; a row without a ± is `none`."""
    df = pd.read_csv(REPO / "kdbench/reference/published.csv", dtype=str, keep_default_na=False)
    assert "ci95" not in df.columns and {"spread", "spread_type", "n_runs"} <= set(df.columns)
    assert set(df.spread_type) <= {"ci95", "sd", "unknown", "none"}
    assert ((df.spread == "") == (df.spread_type == "none")).all()
    assert (df.spread_type == "unknown").sum() == 52  # KDA (36) and FKD's quotes of CRD (16)
    ci = df[df.spread_type == "ci95"]
    assert len(ci) == 8 and set(ci.method) == {"FKD", "FKD w.o. FR"} and set(ci.n_runs) == {"5"}
    fig4 = df[df.table.str.startswith("Figure 4") & df.method.isin(["KD", "FKD", "Student (no distillation)"])]
    assert set(fig4.n_runs) == {"10"}
    assert set(df[df.paper.str.startswith("qian2020_kda") & (df.spread != "")].spread_type) == {"unknown"}


def test_fkd_table2_is_laid_out_as_the_paper(paper):
    """FKD's Table 2 prints methods as rows and teacher → student pairs as columns, as CRD's tables."""
    spec = next(s for s in pt.table_specs(paper) if s.name == "fkd_table2")
    assert spec.layout == "methods_as_rows" and spec.groups[0].label == "resnet32x4 → resnet8x4"


def test_paper_tables_declare_the_papers_claims(paper):
    primary = {s.name: {(t.a, t.b) for t in s.primary} for s in pt.table_specs(paper)}
    assert {("CRD", b) for b in ("KD", "FitNet", "FSP")} <= primary["crd_table1"] and len(primary["crd_table1"]) == 12
    assert {("IPOT+KD", "KD"), ("REMD+KD", "KD"), ("IPOT+KD", "FitNet+KD")} <= primary["ot_cifar100"]
    assert ("FKD", "KD (from Tian et al. 2020)") in primary["fkd_table2"]
    assert ("KDA (after FC)", "KD (after FC)") in primary["kda_table2"]
    assert all(s.claims and all(t.claim for t in s.primary) for s in pt.table_specs(paper))
