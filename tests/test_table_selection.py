"""One table, one target (issue 27): `--config tables=A,B` plans the runs those tables read and
their table and figure jobs, nothing else; a table written so equals the one a full run writes."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench.planning.suite import SuiteError, load_suite

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "workflow/suites"


def dry_run(workdir: Path, *config: str) -> subprocess.CompletedProcess:
    """`snakemake -n -p` of a suite, printing every job's command; no profile (its retries)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--workflow-profile", "none", "-n", "-p", "--config", *config]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def jobs(output: str) -> dict[str, list[str]]:
    """rule -> the job blocks of a dry run's listing (each block: its input/output/shell lines)."""
    out: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", output)[1:]:
        out.setdefault(re.match(r"(?:local)?rule (\w+):", block).group(1), []).append(block)
    return out


def fit_runs(listing: dict[str, list[str]]) -> set[str]:
    return {re.search(r"wildcards: run=(\S+)", b).group(1) for b in listing.get("fit", [])}


def needed(suite, experiments) -> set[str]:
    """The runs of the experiments' cells and, transitively, the runs they need (teachers, probed
    models), from the suite's cells alone."""
    todo = [c.run for c in suite.cells if c.experiment in experiments]
    seen: set[str] = set()
    while todo:
        r = todo.pop()
        if r not in seen:
            seen.add(r)
            todo += suite.runs[r].needs
    return seen


def outputs(block: str) -> list[str]:
    return re.search(r"output: (.*)", block).group(1).split(", ")


def test_one_crd_table_plans_only_its_runs_and_its_table_jobs(tmp_path):
    suite = load_suite(SUITES / "crd.yaml")
    full = jobs((done := dry_run(tmp_path / "all", "suite=crd")).stdout)
    assert done.returncode == 0, done.stderr[-3000:]
    one = dry_run(tmp_path / "one", "suite=crd", "tables=crd_table1")
    assert one.returncode == 0, one.stderr[-3000:]
    listing = jobs(one.stdout)

    table = next(t for t in suite.config["tables"] if t["name"] == "crd_table1")
    want = needed(suite, table["experiments"])
    imports = {r for r in want if suite.runs[r].kind == "import"}  # released teachers: rule fetch_teacher
    assert fit_runs(listing) == want - imports
    assert {re.search(r"run=(\S+)", b).group(1) for b in listing["fetch_teacher"]} == imports
    # 6 + 1 pairs x 15 or 14 methods x 5 seeds, the 6 students shared by pairs: 485 distillations + 30 students
    assert len(fit_runs(listing)) == 515 and len(fit_runs(full)) == len(suite.runs) - 6 == 982
    assert not any(r.startswith(("stl10/", "tinyimagenet/")) for r in fit_runs(listing))  # crd_transfer's probes

    assert sorted(listing) == ["aggregate", "all", "fetch_teacher", "fit", "paper_figures", "paper_tables", "seed_figures"]
    for rule in ("aggregate", "paper_tables", "paper_figures", "seed_figures"):
        (block,) = listing[rule]
        assert all(Path(f).name.startswith("crd_table1") for f in outputs(block)), block
        assert " --table crd_table1 " in block  # the command writes that table alone
    paper = outputs(listing["paper_tables"][0])
    assert sorted(Path(f).name for f in paper) == ["crd_table1.csv", "crd_table1.md", "crd_table1_cells.csv"]
    assert sorted(Path(f).name for f in outputs(listing["seed_figures"][0])) == ["crd_table1_curves.png"]
    # the table jobs read exactly the selected runs
    (paper_block,) = listing["paper_tables"]
    read = set(re.search(r"input: (.*)", paper_block).group(1).split(", "))
    assert read == {f"runs/{r}/metrics.json" for r in want if r in {c.run for c in suite.cells}}

    two = jobs(dry_run(tmp_path / "two", "suite=crd", "tables=crd_table1,crd_table2").stdout)
    table2 = next(t for t in suite.config["tables"] if t["name"] == "crd_table2")
    want2 = needed(suite, table["experiments"] + table2["experiments"])
    assert fit_runs(two) == {r for r in want2 if suite.runs[r].kind != "import"}
    assert " --table crd_table1 --table crd_table2 " in two["paper_tables"][0]


def test_a_seed_table_plans_its_runs_and_its_aggregate(tmp_path):
    suite = load_suite(SUITES / "smoke.yaml")
    done = dry_run(tmp_path, "suite=smoke", "tables=main")
    assert done.returncode == 0, done.stderr[-3000:]
    listing = jobs(done.stdout)
    assert fit_runs(listing) == needed(suite, ["main"]) and len(fit_runs(listing)) == 15  # 1 teacher + 2 x 7 seeds
    assert "paper_tables" not in listing and "paper_figures" not in listing and "kernel_gap" not in listing
    (agg,) = listing["aggregate"]
    assert [Path(f).name for f in outputs(agg)] == ["main.md"] and " --table main " in agg  # no runs.csv
    assert sorted(Path(f).name for f in outputs(listing["seed_figures"][0])) == ["main_curves.png", "main_forest.png"]


def test_an_unknown_table_is_refused_with_the_valid_names(tmp_path):
    done = dry_run(tmp_path, "suite=crd", "tables=crd_table1,crd_tabel2")
    assert done.returncode != 0
    msg = done.stdout + done.stderr
    assert "no table 'crd_tabel2'" in msg and "Did you mean 'crd_table2'" in msg
    assert "Its tables: crd_table1, crd_table2, crd_transfer" in msg and "Traceback" not in msg
    from kdbench.report.selection import select_tables
    with pytest.raises(SuiteError, match="Did you mean 'main'"):
        select_tables(load_suite(SUITES / "smoke.yaml"), ["mian"])


def _fake_metrics(suite, rng) -> None:
    """Every run finished: each method its own mean (so that the tests are decided and their
    adjusted p depends on the family's size), seeds ±1 around it."""
    column = {c.run: c.column for c in suite.cells}
    means = {m: rng.uniform(50, 70) for m in sorted(set(column.values()))}
    for r in suite.runs:
        acc = means.get(column.get(r), 60.0) + rng.uniform(-1, 1)
        m = {"status": "ok", "acc_last": acc, "acc_best": acc + rng.uniform(0, 2),
             "acc5_last": acc + 15, "acc5_best": acc + 16}
        path = Path(suite.run_dir(r)) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(m))


def _written(suite, out: Path, name: str) -> dict[str, str]:
    from kdbench.report.paper_tables import write_tables
    return {p.name: p.read_text() for p in write_tables(suite, out, [name]).values()}


@pytest.mark.parametrize("suite_name, only, widened", [("smoke", None, 0), ("paper", ["fkd_table2"], 1)])
def test_a_selected_table_equals_the_full_runs_table(tmp_path, monkeypatch, suite_name, only, widened):
    """Each paper table, written with only its selection's runs finished, is byte-identical to the
    one written with every run finished. The smoke suite's stand-ins share their runs and tests; the
    paper suite's FKD Table 2 and OT CIFAR-100 show tests that CRD's tables own (same runs, planned
    there first), so they read CRD runs of their own cells' pairs too: without those owners' runs
    their adjusted p would differ (checked: the family matters; in the smoke suite the owners' own
    runs are a 1-seed row, whose tests have no p either way)."""
    from kdbench.report.paper_tables import compute_tables, table_specs
    from kdbench.report.selection import _Unread, select_tables

    monkeypatch.chdir(tmp_path)
    suite = load_suite(SUITES / f"{suite_name}.yaml")
    names = only or [s.name for s in table_specs(suite)]
    own_cells = {r.spec.name: {x for c in r.cells for x in c.run_ids} for r in compute_tables(suite, _Unread(suite))}
    seen = 0
    for i, name in enumerate(names):
        _fake_metrics(suite, random.Random(i))
        full = _written(suite, tmp_path / "full", name)
        sel = select_tables(suite, [name])
        assert sel.paper == (name,) and name in sel.family
        for r in suite.runs:
            if r not in sel.runs:
                (Path(suite.run_dir(r)) / "metrics.json").unlink()
        assert _written(suite, tmp_path / "selected", name) == full, name
        owners_only = {r for n in sel.family for r in own_cells[n]} - own_cells[name]
        if widened and owners_only:  # the owner tables' runs beyond this table's own cells
            seen += 1
            for r in owners_only:
                (Path(suite.run_dir(r)) / "metrics.json").unlink(missing_ok=True)
            assert _written(suite, tmp_path / "own", name) != full, name
    assert seen == widened


def test_the_seed_table_commands_write_the_chosen_table_alone(tmp_path, monkeypatch):
    """`kdbench aggregate --table` writes that table's .md (as the full aggregate writes it) and no
    suite-wide CSV; `kdbench figures --seed-tables --table` draws that table's figures alone."""
    from kdbench.commands.cli import main as kdbench
    from kdbench.report.figures import main as figures

    monkeypatch.chdir(tmp_path)
    suite = load_suite(SUITES / "smoke.yaml")
    _fake_metrics(suite, random.Random(0))
    assert kdbench(["aggregate", "--suite", str(suite.path), "--out", "full"]) == 0
    assert kdbench(["aggregate", "--suite", str(suite.path), "--out", "one", "--table", "main"]) == 0
    assert [p.name for p in Path("one").iterdir()] == ["main.md"]
    assert Path("one/main.md").read_text() == Path("full/main.md").read_text()
    assert figures(["--seed-tables", "--suite", str(suite.path), "--out", "figs", "--table", "main"]) == 0
    assert sorted(p.name for p in Path("figs").iterdir()) == ["main_curves.png", "main_forest.png"]


def test_the_pre_flight_checks_only_the_files_the_chosen_tables_runs_read(tmp_path):
    """crd_table1 reads CIFAR-100 alone: its run does not stop on the transfer table's STL-10 and
    Tiny-ImageNet roots (missing here), which the whole suite's run names."""
    def run(*config):
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--workflow-profile", "none", "--cores", "1", "--config", "suite=crd", *config]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        return done.stdout + done.stderr

    whole, one = run(), run("tables=crd_table1")
    assert all(f"dataset {d!r}: its root data/{d} does not exist" in whole for d in ("cifar100", "stl10", "tinyimagenet"))
    assert "dataset 'cifar100': its root data/cifar100 does not exist" in one
    assert "stl10" not in one and "tinyimagenet" not in one
