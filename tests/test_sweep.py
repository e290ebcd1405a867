"""Held-out validation split (``RunSpec.validation``, the experiment key ``validation``) and
hyper-parameter sweeps (the experiment key ``sweep``)."""

import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import REPO, write_suite
from kdbench.data import holdout_indices, holdout_split, load_dataset
from kdbench.core.spec import Execution, Recipe, RunSpec
from kdbench.planning.suite import SuiteError, load_suite


# --- the split -----------------------------------------------------------------------------------

def test_holdout_is_deterministic_stratified_and_sized():
    labels = np.repeat(np.arange(10), [100, 100, 100, 100, 100, 50, 50, 50, 50, 50])  # 750, unbalanced
    idx = holdout_indices(labels, 150, seed=3)
    assert len(idx) == 150 and len(set(idx.tolist())) == 150
    np.random.seed(1), torch.manual_seed(7)  # global RNG state (what a run seed sets) plays no part
    assert np.array_equal(idx, holdout_indices(labels, 150, seed=3))  # the split's seed alone decides
    assert not np.array_equal(idx, holdout_indices(labels, 150, seed=4))
    per_class = Counter(labels[idx].tolist())
    assert per_class == {**{c: 20 for c in range(5)}, **{c: 10 for c in range(5, 10)}}  # proportional
    odd = holdout_indices(labels, 7, seed=0)  # largest remainders: exact size, ≤ 1 off each share
    shares = Counter(labels[odd].tolist())
    assert len(odd) == 7 and all(abs(shares.get(c, 0) - 7 * n / 750) < 1 for c, n in Counter(labels.tolist()).items())
    for bad in (0, 750, 751):
        with pytest.raises(ValueError, match="validation.size"):
            holdout_indices(labels, bad, seed=0)


def test_holdout_split_of_a_dataset_is_disjoint_and_leaves_the_test_set(tiny):
    data = load_dataset("cifar100", str(tiny / "data"))  # 5 classes × 8 train, × 4 test
    split = holdout_split(data, 10, seed=0)
    assert len(split.train.labels) == 30 and len(split.test.labels) == 10
    assert Counter(split.test.labels.tolist()) == {c: 2 for c in range(5)}
    flat = lambda a: {x.tobytes() for x in a}  # noqa: E731
    assert flat(split.train.images).isdisjoint(flat(split.test.images))  # synthetic images are distinct
    assert flat(split.train.images) | flat(split.test.images) == flat(data.train.images)
    assert flat(split.test.images).isdisjoint(flat(data.test.images))  # the test set is not read
    assert split.num_classes == data.num_classes
    train_loader, test_loader = split.loaders(8, 16, "cpu")
    assert train_loader.num_samples == 30 and test_loader.num_samples == 10 and not test_loader.train
    seen = {x.tobytes() for x in (train_loader.images[:, :, 4:-4, 4:-4].permute(0, 2, 3, 1).numpy())}
    assert seen == flat(split.train.images) and seen.isdisjoint(flat(split.test.images))


# --- the run spec --------------------------------------------------------------------------------

def test_run_ids_without_validation_are_unchanged():
    """Hashes computed before RunSpec.validation existed."""
    a = RunSpec("cifar100", "data/x", "resnet8")
    b = RunSpec("cifar100", "data/x", "resnet8", "kd", 1, "resnet14", ("t.pt",), ("cifar100/scratch/resnet14/seed0-abc",),
                {"terms": {"kd": 0.9}}, Recipe(epochs=2))
    c = RunSpec("stl10", "d", "vgg8", "fkd", 0, "vgg13", ("t",), ("tid",), {}, teacher_dataset="cifar100",
                unlabeled={"batch_size": 512})
    d = RunSpec("cifar100", "d", "resnet8", "kd", 0, "resnet8", ("t",), ("tid",), execution=Execution(precision="bf16"))
    assert [s.config_hash() for s in (a, b, c, d)] == ["3d919c89", "a2da40a0", "1f5df033", "0029dca7"]
    v = RunSpec("cifar100", "data/x", "resnet8", validation={"size": 10})
    assert v.validation == {"size": 10, "seed": 0} and v.config_hash() not in {a.config_hash()}
    assert v.config_hash() == RunSpec("cifar100", "data/x", "resnet8", validation={"size": 10, "seed": 0}).config_hash()
    assert RunSpec.from_dict(v.to_dict()) == v
    for bad in ({"size": 0}, {"seed": 1}, {"size": 5, "sed": 1}, 5):
        with pytest.raises(ValueError, match="validation"):
            RunSpec("cifar100", "d", "resnet8", validation=bad)


def test_smoke_suite_ids_are_unchanged():
    suite = load_suite(REPO / "workflow/suites/smoke.yaml")
    assert all(r.spec.validation is None for r in suite.runs.values())
    assert "cifar100/scratch/resnet14/seed0-" in "\n".join(suite.runs)


def test_a_validation_run_trains_and_reports_the_holdout(tiny, tmp_path):
    from kdbench.engine.fit import fit
    spec = RunSpec("cifar100", str(tiny / "data"), "resnet8", "kd", 0, "resnet8", (str(tiny / "t.pt"),), ("t",),
                   recipe=Recipe(epochs=1, batch_size=8), validation={"size": 10, "seed": 0})
    m = fit(spec, tmp_path / "run", device="cpu", progress=False)
    assert m["status"] == "ok"
    on_disk = json.loads((tmp_path / "run/metrics.json").read_text())
    assert on_disk["eval_split"] == "validation" and on_disk["eval_samples"] == 10  # not the 20 test images
    assert on_disk["holdout"] == {"size": 10, "seed": 0, "train_samples": 30}
    assert on_disk["spec"]["validation"] == {"size": 10, "seed": 0}
    assert abs(m["acc_last"] / 10 - round(m["acc_last"] / 10)) < 1e-6  # a multiple of 10 %: 1 of 10 images
    # the saved model, evaluated by hand on the holdout, gives the recorded accuracy
    from kdbench.engine.checkpoint import load_model
    from kdbench.engine.step import evaluate
    split = holdout_split(load_dataset("cifar100", str(tiny / "data")), 10, 0)
    model = load_model(tmp_path / "run/model.pt", "resnet8", 5)
    assert evaluate(model, split.loaders(8, 16, "cpu")[1])["top1"] == pytest.approx(m["acc_last"])
    plain = fit(RunSpec("cifar100", str(tiny / "data"), "resnet8", recipe=Recipe(epochs=1, batch_size=8)),
                tmp_path / "plain", device="cpu", progress=False)
    assert plain["eval_split"] == "test" and plain["eval_samples"] == 20 and "holdout" not in plain


# --- sweeps in a suite ---------------------------------------------------------------------------

def sweep_suite(tmp_path, **exp):
    base = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]],
            "methods": ["student", "kd", "fkd"], "seeds": [0, 1], "validation": {"size": 10, "seed": 0}}
    return write_suite(tmp_path / "tiny.yaml", tmp_path / "data", experiments=[{**base, **exp}])


def test_sweep_grid_columns_and_overrides(tmp_path):
    suite = load_suite(sweep_suite(tmp_path, sweep={"fkd": [1, 10.0], "fkd.ensemble": ["kernel_mean", "correlation_mean"],
                                                    "feature_reg": [0.001]}))
    cols = Counter(c.column for c in suite.cells)
    assert cols["teacher"] == 1 and cols["student"] == 2 and cols["kd"] == 2  # no swept term: one column, unchanged
    fkd = sorted(c for c in cols if c.startswith("fkd["))
    assert len(fkd) == 2 * 2 * 1 and all(cols[c] == 2 for c in fkd)  # the grid × seeds
    # keys in the file's order (write_suite sorts them), values as written (10.0 -> 10)
    assert "fkd[feature_reg=0.001,fkd=1,fkd.ensemble=kernel_mean]" in fkd
    assert "fkd[feature_reg=0.001,fkd=10,fkd.ensemble=correlation_mean]" in fkd
    runs = {c.column: suite.runs[c.run].spec for c in suite.cells if c.seed == 0}
    s = runs["fkd[feature_reg=0.001,fkd=10,fkd.ensemble=correlation_mean]"]
    assert s.method_overrides["terms"] == {"fkd": 10.0, "feature_reg": 0.001}
    assert s.method_overrides["params"] == {"fkd": {"ensemble": "correlation_mean"}}
    assert all(sp.validation == {"size": 10, "seed": 0} for col, sp in runs.items() if col != "teacher")
    assert runs["teacher"].validation is None  # the teacher trains on the full training set
    assert len(suite.runs) == 1 + 2 + 2 + 8  # every value and seed its own run
    assert not suite.packs(4)  # validation runs are not packed (a pack shares the full-set loaders)


def test_sweep_ce_and_the_kd_weight(tmp_path):
    suite = load_suite(sweep_suite(tmp_path, methods=["student", "kd"], sweep={"ce": [0.5, 1], "kd": [0.9]}))
    cols = sorted({c.column for c in suite.cells})
    assert cols == ["kd[ce=0.5,kd=0.9]", "kd[ce=1,kd=0.9]", "student", "teacher"]
    spec = next(suite.runs[c.run].spec for c in suite.cells if c.column == "kd[ce=0.5,kd=0.9]")
    assert spec.method_overrides["ce"] == 0.5 and spec.method_overrides["terms"]["kd"] == 0.9


@pytest.mark.parametrize("sweep, match", [
    ({"fdk": [1]}, r"no method of this experiment has the term 'fdk' \(no such distillation term\)\. Did you mean 'fkd'\?.*terms feature_reg, fkd, kd"),
    ({"crd": [1]}, r"no method of this experiment has the term 'crd'\. Valid keys"),
    ({"fkd.lam": [1]}, r"'fkd' has no parameter 'lam'; valid: ensemble"),
    ({"fkd": ["big"]}, r"a loss weight takes numbers"),
    ({"fkd": [1, 1]}, r"repeated values"),
])
def test_bad_sweep_keys_are_refused(tmp_path, sweep, match):
    with pytest.raises(SuiteError, match=match):
        load_suite(sweep_suite(tmp_path, sweep=sweep))


def test_sweep_without_validation_is_refused(tmp_path):
    path = write_suite(tmp_path / "tiny.yaml", tmp_path / "data", experiments=[
        {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["kd"], "seeds": [0],
         "sweep": {"kd": [0.5, 0.9]}}])
    with pytest.raises(SuiteError, match="needs `validation.*never on the test set"):
        load_suite(path)


def test_validation_without_sweep_and_schema_errors(tmp_path):
    suite = load_suite(sweep_suite(tmp_path))
    assert {c.column for c in suite.cells} == {"teacher", "student", "kd", "fkd"}
    with pytest.raises(SuiteError, match="validation"):
        load_suite(sweep_suite(tmp_path, validation={"seed": 0}))  # size is required


@pytest.mark.parametrize("name,paper,columns", [
    ("tune_fkd", "fkd", {"teacher": 2, "student": 6, "fkd[fkd=1]": 3, "fkd[fkd=10]": 3, "fkd[fkd=100]": 3,
                         "fkd[fkd=1000]": 3, **{f"fkd[fkd={lam},feature_reg={fr}]": 3 for lam in (1, 10, 100, 1000)
                                                for fr in ("5e-05", "0.0005", "0.005")}}),
    ("tune_ot", "ot", {"teacher": 1, "student": 3, "kd": 3, **{f"{m}_kd[{m}={v},{m}.layers={la}]": 3
                                                               for m in ("remd", "ipot") for v in ("0.1", "1", "10")
                                                               for la in ("stages", "stages+pooled", "pooled")}}),
    ("tune_kda", "kda", {"teacher": 1, "student": 3, "kda_before": 3, "kda_before_kd[kd=0.25]": 3,
                         "kda_before_kd[kd=1]": 3, "kda_before_kd[kd=4]": 3}),
])
def test_tuning_suites_load(name, paper, columns):
    """Each tuning suite sweeps its paper's unpublished weights on a 5,000-image holdout, with the
    paper suite's own teacher run (trained on the full training set)."""
    suite = load_suite(REPO / f"workflow/suites/{name}.yaml")
    assert Counter(c.column for c in suite.cells) == columns
    teachers = {c.run for c in suite.cells if c.column == "teacher"}
    assert teachers <= set(load_suite(REPO / f"workflow/suites/{paper}.yaml").runs)
    assert all(r.spec.validation == {"size": 5000, "seed": 0} for r in suite.runs.values() if r.id not in teachers)


def test_sweep_dry_run_lists_its_jobs(tmp_path):
    path = sweep_suite(tmp_path, methods=["student", "kd"], sweep={"kd": [0.5, 0.9, 1.0]})
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none", "-d", str(tmp_path),
                           "--cores", "1", "--config", f"suite_file={path}", "-n", "--quiet", "rules"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, flags=re.M))
    # 1 teacher + 2 students + 3 values × 2 seeds of kd
    assert jobs["fit"] == str(1 + 2 + 6), jobs
