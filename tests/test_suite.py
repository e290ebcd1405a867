import subprocess
import sys

import pytest
import yaml

from kdbench.suite import SuiteError, load_suite

from conftest import REPO, write_suite

EXP = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["student", "kd"], "seeds": [0, 1]}


def test_smoke_suite_is_valid_and_enumerates_runs():
    suite = load_suite(REPO / "workflow/suites/smoke.yaml")
    kinds = [r.kind for r in suite.runs.values()]
    assert kinds.count("distill") >= 3 and kinds.count("train") >= 4


def test_runs_are_shared_and_named_by_what_defines_them(tiny_suite):
    suite = load_suite(tiny_suite)
    ids = list(suite.runs)
    # resnet8 teacher seed 0 and resnet8 plain student seed 0 are the same run
    assert len(ids) == 4, ids
    kd = [r for r in suite.runs.values() if r.kind == "distill"]
    assert all(r.id.startswith("cifar100/resnet8--resnet8/kd/seed") for r in kd)
    assert all(r.teacher_runs == (ids[0],) for r in kd)


@pytest.mark.parametrize("change, message", [
    ({"experiments": [{**EXP, "methods": ["student", "kdd"]}]}, "unknown method 'kdd'. Did you mean 'kd'"),
    ({"experiments": [{**EXP, "pairs": [["resnet8", "resnet9"]]}]}, "unknown architecture 'resnet9'"),
    ({"experiments": [{**EXP, "dataset": "cifar1000"}]}, "unknown dataset 'cifar1000'"),
    ({"recipe": {"epoch": 3}}, "Additional properties are not allowed"),
    ({"tables": [{"name": "t", "experiments": ["nope"]}]}, "unknown experiment 'nope'"),
])
def test_bad_suite_names_valid_choices(tmp_path, change, message):
    path = write_suite(tmp_path / "bad.yaml", tmp_path / "data", **change)
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert message in str(err.value)
    if "unknown method" in message:
        assert "Valid methods: " in str(err.value) and "crd" in str(err.value)
    if "architecture" in message:
        assert "resnet32x4" in str(err.value)
    if "Additional" in message:
        assert "epochs" in str(err.value)


def test_snakemake_refuses_bad_suite_before_any_job(tmp_path):
    bad = write_suite(tmp_path / "bad.yaml", tmp_path / "data", experiments=[{**EXP, "methods": ["kdd"]}])
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--cores", "1", "--config", f"suite_file={bad}"], capture_output=True, text=True)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "unknown method 'kdd'" in out and "Valid methods" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
