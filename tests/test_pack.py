"""Packing (kdbench/engine/pack.py): K runs trained together equal the same runs one by one."""

import json
from pathlib import Path

import pytest
import torch

from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.engine.checkpoint import save_model
from kdbench.engine.pack import PackError, check_packable, fit_packed, main
from kdbench.engine.spec import Execution, Recipe, RunSpec
from kdbench.engine.train import fit
from kdbench.models import build_model
from kdbench.suite import load_suite

from conftest import write_suite

RECIPE = Recipe.from_config({"epochs": 2, "batch_size": 16})


def spec(tiny, method, seed, recipe=RECIPE, **overrides):
    return RunSpec("cifar100", str(tiny / "data"), "resnet8", method, seed, "resnet8",
                   (str(tiny / "t.pt"),) if method != "student" else (), method_overrides=overrides, recipe=recipe)


def strip(metrics):
    """What must agree: everything but wall times and provenance."""
    drop = {"wall_time_s", "provenance", "run"}
    return {k: v for k, v in metrics.items() if k not in drop}


def assert_same(a, b, rel):
    assert a.keys() == b.keys()
    for k in a:
        if k in ("curve", "init_curve"):
            assert len(a[k]) == len(b[k])
            for ra, rb in zip(a[k], b[k]):
                for key in ra:
                    if isinstance(ra[key], float):
                        assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-9), (k, key)
                    else:
                        assert rb[key] == ra[key], (k, key)
        elif isinstance(a[k], float):
            assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-9), k
        else:
            assert b[k] == a[k], k


def test_packed_runs_equal_runs_one_by_one(tiny, tmp_path):
    """KD, CRD (feature bank + negatives) and FitNet (teacher stage features), different seeds;
    an AB run with its initialisation stage; a plain student with no teacher at all."""
    specs = [spec(tiny, "kd", 0), spec(tiny, "crd", 1, params={"crd": {"nce_k": 16}}), spec(tiny, "fitnet", 2),
             spec(tiny, "ab", 0, params={"ab": {"init_epochs": 1}}), spec(tiny, "student", 3)]
    alone = [fit(s, tmp_path / f"alone{k}", "cpu", progress=False) for k, s in enumerate(specs)]
    packed = fit_packed(specs, [tmp_path / f"pack{k}" for k in range(len(specs))], "cpu")
    for k, (a, b) in enumerate(zip(alone, packed)):
        # observed bit for bit on CPU; the teacher's convolutions at batch 16·K may round differently
        assert_same(strip(a), strip(b), rel=1e-5)
        on_disk = json.loads((tmp_path / f"pack{k}" / "metrics.json").read_text())
        assert on_disk["status"] == "ok" and on_disk["hash"] == specs[k].config_hash()
        m_a = torch.load(tmp_path / f"alone{k}" / "model.pt", weights_only=True)["state_dict"]
        m_b = torch.load(tmp_path / f"pack{k}" / "model.pt", weights_only=True)["state_dict"]
        for name in m_a:
            torch.testing.assert_close(m_b[name], m_a[name], rtol=1e-5, atol=1e-6)
    assert packed[3]["init_curve"] and not packed[0]["init_curve"]
    # a packed run's checkpoint is fit's: fit finds the run complete and reports the same result
    again = fit(specs[1], tmp_path / "pack1", "cpu", progress=False)
    assert again["acc_last"] == packed[1]["acc_last"] and again["curve"] == packed[1]["curve"]


def test_runs_of_different_lengths_and_the_teacher_cache(tiny, tmp_path):
    long = Recipe.from_config({"epochs": 3, "batch_size": 16})
    specs = [RunSpec("cifar100", str(tiny / "data"), "resnet8", m, s, "resnet8", (str(tiny / "t.pt"),), recipe=r,
                     execution=Execution(teacher_cache="fp32")) for m, s, r in (("kd", 0, RECIPE), ("dkd", 1, long))]
    alone = [fit(s, tmp_path / f"alone{k}", "cpu", progress=False) for k, s in enumerate(specs)]
    packed = fit_packed(specs, [tmp_path / f"pack{k}" for k in range(2)], "cpu")
    assert [len(m["curve"]) for m in packed] == [2, 3]
    for a, b in zip(alone, packed):
        assert_same(strip(a), strip(b), rel=1e-5)


def test_a_failing_run_does_not_stop_the_others(tiny, tmp_path):
    diverges = spec(tiny, "kd", 1, recipe=Recipe.from_config({"epochs": 2, "batch_size": 16, "lr": 1e12}))
    fine = spec(tiny, "kd", 0)
    result = fit_packed([diverges, fine], [tmp_path / "a", tmp_path / "b"], "cpu")
    assert result[0]["status"] == "failed" and "non-finite" in result[0]["failure"]
    assert result[1]["status"] == "ok" and (tmp_path / "b" / "model.pt").exists()
    broken = RunSpec("cifar100", str(tiny / "data"), "resnet8", "kd", 0, "resnet8", (str(tiny / "t.pt"),),
                     method_overrides={"params": {"kd": {"temperature": 4}}}, recipe=RECIPE)
    with pytest.raises(PackError, match="1 of 2 packed runs failed.*temperature"):
        fit_packed([broken, fine], [tmp_path / "c", tmp_path / "d"], "cpu", run_ids=["broken", "fine"])
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["status"] == "ok"


def test_unpackable_runs_are_refused_with_the_reason(tiny, tmp_path):
    torch.manual_seed(1)
    save_model(tmp_path / "t2.pt", build_model("resnet8", 5), "resnet8", 5, "cifar100")
    other_teacher = RunSpec("cifar100", str(tiny / "data"), "resnet8", "kd", 0, "resnet8", (str(tmp_path / "t2.pt"),),
                            recipe=RECIPE)
    with pytest.raises(ValueError, match="must share their teacher"):
        check_packable([spec(tiny, "kd", 0), other_teacher])
    with pytest.raises(ValueError, match="different execution"):
        check_packable([spec(tiny, "kd", 0), RunSpec("cifar100", str(tiny / "data"), "resnet8", "kd", 0, "resnet8",
                                                     (str(tiny / "t.pt"),), recipe=RECIPE,
                                                     execution=Execution(precision="bf16"))])
    with pytest.raises(ValueError, match="batch sizes"):
        check_packable([spec(tiny, "kd", 0), spec(tiny, "kd", 1, recipe=Recipe.from_config({"batch_size": 8}))])
    with pytest.raises(ValueError, match="nothing to pack"):
        check_packable([])


def test_pack_command_trains_suite_runs(tmp_path):
    suite_file = write_suite(tmp_path / "s.yaml", tmp_path / "data")
    ensure_synthetic("cifar100", str(tmp_path / "data"), {"classes": 5, "train_per_class": 20, "test_per_class": 10, "seed": 0})
    suite = load_suite(suite_file)
    teachers = [r for r in suite.runs.values() if r.kind == "train"]
    for r in teachers:
        if "resnet8/seed0" in r.id:
            fit(r.spec, suite.run_dir(r.id), "cpu", progress=False)
    distill = [r.id for r in suite.runs.values() if r.kind == "distill" and "/kd/" in r.id]
    assert len(distill) == 2
    assert main(["--suite", str(suite_file), *sum((["--run", r] for r in distill), [])]) == 0
    for r in distill:
        assert json.loads((Path(suite.run_dir(r)) / "metrics.json").read_text())["status"] == "ok"
    with pytest.raises(SystemExit, match="not in suite"):
        main(["--suite", str(suite_file), "--run", "nope"])
