import subprocess
import sys

import pytest
import yaml

from kdbench.planning.suite import SuiteError, load_suite

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
    assert all(r.needs == (ids[0],) for r in kd)


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
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none", "-d", str(tmp_path),
                           "--cores", "1", "--config", f"suite_file={bad}"], capture_output=True, text=True)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "unknown method 'kdd'" in out and "Valid methods" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_include_unions_suites_and_shares_runs(tmp_path):
    a = write_suite(tmp_path / "a.yaml", tmp_path / "data", name="a", recipe={"epochs": 2})
    b = write_suite(tmp_path / "b.yaml", tmp_path / "data", name="b", recipe={"epochs": 3},
                    experiments=[{**EXP, "name": "other", "methods": ["kd", "crd"]}],
                    tables=[{"name": "other", "experiments": ["other"]}])
    union = tmp_path / "u.yaml"
    union.write_text(yaml.safe_dump({"name": "u", "runs_dir": str(tmp_path / "runs"), "include": ["a.yaml", "b.yaml"]}))
    sa, sb, su = load_suite(a), load_suite(b), load_suite(union)
    assert set(su.runs) == set(sa.runs) | set(sb.runs)
    # each included suite keeps its own recipe: b's 3-epoch runs differ from a's 2-epoch runs
    assert {r.spec.recipe.epochs for r in su.runs.values()} == {2, 3}
    assert [t["name"] for t in su.config["tables"]] == ["main", "other"]


def test_include_conflicts_are_reported(tmp_path):
    write_suite(tmp_path / "a.yaml", tmp_path / "data", name="a", recipe={"epochs": 2})
    write_suite(tmp_path / "b.yaml", tmp_path / "data", name="b", recipe={"epochs": 3})  # same experiment name
    union = tmp_path / "u.yaml"
    union.write_text(yaml.safe_dump({"name": "u", "include": ["a.yaml", "b.yaml"]}))
    with pytest.raises(SuiteError, match="defined differently"):
        load_suite(union)


def test_cross_dataset_distill_refuses_logit_methods(tmp_path):
    datasets = {"cifar100": {"root": "d100"}, "cifar10": {"root": "d10"}}
    exp = {**EXP, "dataset": "cifar10", "teacher_dataset": "cifar100", "methods": ["student", "fkd", "kd"]}
    bad = write_suite(tmp_path / "bad.yaml", tmp_path / "data", datasets=datasets, experiments=[exp])
    with pytest.raises(SuiteError, match=r"kd read the teacher's logits.*label spaces differ.*Methods that can: .*fkd"):
        load_suite(bad)
    good = write_suite(tmp_path / "good.yaml", tmp_path / "data", datasets=datasets,
                       experiments=[{**exp, "methods": ["student", "fkd", "rkd", "sp"]}])
    suite = load_suite(good)
    teacher = [r for r in suite.runs.values() if r.spec.dataset == "cifar100"]
    assert len(teacher) == 1
    fkd = [r for r in suite.runs.values() if r.spec.method == "fkd"]
    assert all(r.id.startswith("cifar10/cifar100.resnet8--resnet8/fkd/") for r in fkd)
    assert all(r.spec.teacher_dataset == "cifar100" and r.needs == (teacher[0].id,) for r in fkd)


def test_method_checks_see_the_overrides(tmp_path):
    """The suite's early checks read what a run's overrides make a method read: OT on a stage map
    (term_params or method_overrides) with a teacher ensemble, and KDA after the FC (the logits)
    across datasets, fail when the suite loads, not when the run starts."""
    stage_ot = [{"term_params": {"remd": {"layers": ["stage:-1"]}}},
                {"method_overrides": {"remd": {"params": {"remd": {"layers": ["stage:-1"]}}}}}]
    for k, extra in enumerate(stage_ot):
        bad = write_suite(tmp_path / f"e{k}.yaml", tmp_path / "data",
                          experiments=[{**EXP, "teacher_seeds": [0, 1], "methods": ["remd"], **extra}])
        with pytest.raises(SuiteError, match="remd read the teacher's stage features"):
            load_suite(bad)
    with pytest.raises(SuiteError, match="remd read the teacher's stage features"):  # OT's default: the stages
        load_suite(write_suite(tmp_path / "st.yaml", tmp_path / "data",
                               experiments=[{**EXP, "teacher_seeds": [0, 1], "methods": ["remd"]}]))
    load_suite(write_suite(tmp_path / "ok.yaml", tmp_path / "data",
                           experiments=[{**EXP, "teacher_seeds": [0, 1], "methods": ["remd"],
                                         "term_params": {"remd": {"layers": "pooled"}}}]))
    datasets = {"cifar100": {"root": "d100"}, "cifar10": {"root": "d10"}}
    cross = {**EXP, "dataset": "cifar10", "teacher_dataset": "cifar100", "methods": ["kda_before", "kda_after"]}
    with pytest.raises(SuiteError, match=r"student\): kda_after read the teacher's logits"):  # kda_before passes
        load_suite(write_suite(tmp_path / "x.yaml", tmp_path / "data", datasets=datasets, experiments=[cross]))


def test_unlabeled_stream_reaches_distillations_and_is_checked_at_load(tmp_path):
    datasets = {"cifar100": {"root": "d100"}, "stl10": {"root": "dstl"}}
    exp = {**EXP, "dataset": "stl10", "teacher_dataset": "cifar100", "methods": ["student", "fkd", "rkd"],
           "unlabeled": {"split": "unlabeled", "batch_size": 32}}
    suite = load_suite(write_suite(tmp_path / "s.yaml", tmp_path / "data", datasets=datasets, experiments=[exp]))
    distill = [r for r in suite.runs.values() if r.kind == "distill"]
    assert len(distill) == 4 and all(r.spec.unlabeled["batch_size"] == 32 for r in distill)
    assert all(r.spec.unlabeled is None for r in suite.runs.values() if r.kind == "train")
    assert suite.packs(12) == {}  # runs with a stream are never packed
    with pytest.raises(SuiteError, match="'crd' reads labels.*Methods that can: .*fkd"):
        load_suite(write_suite(tmp_path / "b.yaml", tmp_path / "data", datasets=datasets,
                               experiments=[{**exp, "methods": ["crd"]}]))
    with pytest.raises(SuiteError, match="split"):
        load_suite(write_suite(tmp_path / "c.yaml", tmp_path / "data", datasets=datasets,
                               experiments=[{**exp, "unlabeled": {"split": "extra"}}]))
    fkd = load_suite(REPO / "workflow/suites/fkd.yaml")
    stl = [r for r in fkd.runs.values() if r.spec.dataset == "stl10" and r.kind == "distill"]
    assert stl and all(r.spec.unlabeled == {"split": "unlabeled", "batch_size": 512, "terms_on": "unlabeled",
                                            "bn": "joint"} for r in stl)


def test_linear_probe_runs_follow_each_model(tmp_path):
    datasets = {"cifar100": {"root": "d100"}, "cifar10": {"root": "d10"}}
    exp = {**EXP, "linear_probe": {"datasets": ["cifar10"]}}
    suite = load_suite(write_suite(tmp_path / "s.yaml", tmp_path / "data", datasets=datasets, experiments=[exp]))
    probes = [r for r in suite.runs.values() if r.kind == "probe"]
    sources = [r for r in suite.runs.values() if r.kind != "probe"]
    assert len(probes) == len(sources) == 4
    for p in probes:
        assert p.spec.dataset == "cifar10" and p.spec.recipe.weight_decay == 0.0
        assert p.needs[0] in suite.runs and p.spec.init_ckpt.endswith(f"{p.needs[0]}/model.pt")
    assert {c.column for c in suite.cells if c.dataset == "cifar10"} == {"teacher", "student", "kd"}


def test_imported_teacher_checkpoints_replace_teacher_runs(tmp_path):
    teacher = tmp_path / "resnet8.pt"
    teacher.write_bytes(b"its content names it in run ids")  # the file must exist (tests/test_run_identity.py)
    exp = {**EXP, "teacher_checkpoints": {"resnet8": str(teacher)}}
    suite = load_suite(write_suite(tmp_path / "s.yaml", tmp_path / "data", experiments=[exp]))
    kd = [r for r in suite.runs.values() if r.kind == "distill"]
    assert kd and all(r.spec.teacher_ckpts == (str(teacher),) and r.needs == () for r in kd)
    assert "teacher" not in {c.column for c in suite.cells}


def test_ensemble_teacher_refuses_stage_feature_methods(tmp_path):
    bad = write_suite(tmp_path / "s.yaml", tmp_path / "data",
                      experiments=[{**EXP, "teacher_seeds": [0, 1], "methods": ["kd", "fkd", "at"]}])
    with pytest.raises(SuiteError, match="at read the teacher's stage features"):
        load_suite(bad)
    ok = load_suite(write_suite(tmp_path / "t.yaml", tmp_path / "data",
                                experiments=[{**EXP, "teacher_seeds": [0, 1], "methods": ["kd", "fkd"]}]))
    kd = [r for r in ok.runs.values() if r.kind == "distill"]
    assert all(len(r.spec.teacher_ckpts) == 2 and len(r.needs) == 2 for r in kd)


def test_execution_options_reach_runs_and_only_result_changing_ones_rename_them(tmp_path):
    plain = load_suite(write_suite(tmp_path / "a.yaml", tmp_path / "data"))
    fast = load_suite(write_suite(tmp_path / "b.yaml", tmp_path / "data",
                                  execution={"channels_last": True, "teacher_cache": "fp32"}))
    bf16 = load_suite(write_suite(tmp_path / "c.yaml", tmp_path / "data", execution={"precision": "bf16"}))
    assert list(fast.runs) == list(plain.runs)
    assert all(r.spec.execution.channels_last for r in fast.runs.values())
    assert not set(bf16.runs) & set(plain.runs)
    with pytest.raises(SuiteError, match="precision"):
        load_suite(write_suite(tmp_path / "d.yaml", tmp_path / "data", execution={"precision": "fp8"}))
