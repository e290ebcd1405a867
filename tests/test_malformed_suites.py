"""Every malformed suite is refused before any job, with a message that names the fix.

One file per case in ``tests/malformed_suites/``; its first line ``# expect: <text>`` is part of
the message the refusal must print (the valid choices or the change to make). Each case runs
``kdbench validate`` (which also checks that the files a suite needs exist) in an empty folder,
and nothing may be created there: no ``runs/`` and no ``data/``.
"""

import shutil
from pathlib import Path

import pytest

from kdbench.commands import cli

CASES = sorted((Path(__file__).parent / "malformed_suites").glob("*.yaml"))


def test_the_collection_covers_at_least_fifty_cases():
    assert len(CASES) >= 50


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_malformed_suite_is_refused_naming_the_fix(case, tmp_path, monkeypatch, capsys):
    expect = case.read_text().splitlines()[0].removeprefix("# expect: ").strip()
    work = tmp_path / "work"
    shutil.copytree(case.parent, work / "suites")
    monkeypatch.chdir(work)
    rc = cli.main(["validate", "--suite", f"suites/{case.name}"])
    err = capsys.readouterr().err
    assert rc == 2, f"{case.name} was accepted:\n{err}"
    assert expect in err, f"{case.name}: the message does not say {expect!r}:\n{err}"
    assert sorted(p.name for p in work.iterdir()) == ["suites"], "validation created files"


def test_unused_term_params_only_warn_when_suites_include_each_other(tmp_path):
    """A suite that includes others may set term_params for terms only the others use: a
    warning, not a refusal (the same entry without the include is refused, case
    term_params_for_unused_term)."""
    from kdbench.planning.suite import load_suite

    data = "datasets:\n  cifar100: {root: data/x, synthetic: {classes: 4, train_per_class: 10, test_per_class: 5}}\n"
    (tmp_path / "other.yaml").write_text(
        "name: other\n" + data + "experiments:\n  - {name: o, dataset: cifar100, pairs: [[resnet14, resnet8]], "
        "methods: [crd], seeds: [0]}\n")
    (tmp_path / "main.yaml").write_text(
        "name: main\ninclude: [other.yaml]\nterm_params: {crd: {nce_k: 100}}\n" + data + "experiments:\n"
        "  - {name: m, dataset: cifar100, pairs: [[resnet14, resnet8]], methods: [kd], seeds: [0]}\n")
    with pytest.warns(UserWarning, match="apply to nothing"):
        load_suite(tmp_path / "main.yaml")


def test_pipeline_refuses_a_missing_dataset_before_any_job_but_plans_it(tmp_path):
    """`snakemake` stops before its first job when a real dataset root is missing (a cluster would
    otherwise fail each job in turn); `snakemake -n` still plans the jobs."""
    import subprocess
    import sys

    from conftest import REPO

    suite = tmp_path / "s.yaml"
    suite.write_text((Path(__file__).parent / "malformed_suites" / "dataset_root_missing.yaml").read_text()
                     .replace("data/not-here", str(tmp_path / "not-here")))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none", "-d", str(tmp_path / "work"),
           "--cores", "1", "--config", f"suite_file={suite}"]
    plan = subprocess.run(cmd + ["-n"], capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr[-2000:]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode != 0 and f"kdbench fetch cifar100 --root {tmp_path / 'not-here'}" in run.stderr + run.stdout
    assert not (tmp_path / "work" / "runs").exists()
