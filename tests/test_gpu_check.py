"""benchmarks/gpu_check.sh (issue 16) in its dry mode on the CPU, so that the GPU check cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

EXPECTED_STEPS = ["environment", "cuda_tests", "fast_path", "bench", "projection"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    r = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--dry", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "gpu_check.log").stat().st_size > 0
    return json.loads((out / "gpu_check.json").read_text())


def test_every_step_runs_in_order_and_passes(report):
    assert report["dry"] is True and report["ok"] is True
    assert list(report["steps"]) == EXPECTED_STEPS
    assert {name: s["status"] for name, s in report["steps"].items()} == dict.fromkeys(EXPECTED_STEPS, "ok")


def test_environment_names_versions_and_the_sgd_path(report):
    env = report["steps"]["environment"]
    import torch
    from kdbench.engine.optim import fused_sgd_kernel
    assert env["torch"] == torch.__version__ and env["fused_sgd_kernel"] == fused_sgd_kernel()
    assert "nvidia_smi" in env and isinstance(env["missing_packages"], list)


def test_cuda_tests_are_selected_and_skipped_on_cpu(report):
    tests = report["steps"]["cuda_tests"]
    assert "skipped" in tests["summary"] and "passed" not in tests["summary"] and "failed" not in tests["summary"]
    assert any("CUDA graphs need a GPU" in s for s in tests["outcomes"]["skipped"])
    assert tests["not_collected"] == []


def test_fast_path_compares_with_seed_noise_and_records_what_ran(report):
    fp = report["steps"]["fast_path"]
    assert set(fp["checks"]) == {"fast_acc_within_seed_noise", "fast_loss_close", "graph_equals_eager"}
    assert all(fp["checks"].values())
    assert fp["fast"]["used"]["execution"]["channels_last"] is True and fp["fast"]["used"]["sgd_kernel"] == "foreach"
    assert fp["plain"]["seconds_per_epoch"] > 0 and len(fp["plain"]["loss"]) == fp["sizes"]["epochs"]


def test_bench_runs_kd_crd_and_a_feature_method_with_a_packed_grid(report):
    b = report["steps"]["bench"]
    assert [b[m]["result"]["method"] for m in ("kd", "crd", "fitnet")] == ["kd", "crd", "fitnet"]
    kd = b["kd"]["result"]
    assert set(kd["engine"]) == {"plain", "fast"} and kd["reference"]["run_s"]["median"] > 0
    assert b["crd"]["result"]["nce_k"] == 100  # --nce-k: the data sized for it
    grid = b["grid"]["result"]
    assert grid["k"] == 2 and grid["pack+fuse"]["fused"] is True and grid["sequential"]["run_s"]["median"] > 0
    assert grid["pack"]["identity"]["within"] and "one after another, kdbench" in b["kd"]["printed"]


def test_record_is_written_and_the_dry_one_is_refused_by_the_planner(report, tmp_path):
    from kdbench.planning import cost
    folder = Path(report["record"]).parent
    assert report["record"].endswith("results/gpu/cpu.json") and (folder / "cpu.md").read_text().startswith("# GPU check")
    assert json.loads(Path(report["record"]).read_text())["steps"]["bench"]["kd"]["result"]["method"] == "kd"
    with pytest.raises(ValueError, match="dry run"):
        cost.read_bench_record(report["record"])


def test_the_planner_reads_a_gpu_record_of_this_format(report, tmp_path):
    """The record gpu_check writes, as a GPU run would write it (device and pair replaced), gives
    the planner the engine's plain median step per method, and it costs the matching runs."""
    from gpu_check import gpu_kind
    from kdbench.commands.plan import plan
    from kdbench.commands.plan import suite_path
    from kdbench.planning import cost
    from kdbench.planning.suite import load_suite
    rec = json.loads(json.dumps(report))
    rec["dry"] = False
    for job in ("kd", "crd", "fitnet"):
        rec["steps"]["bench"][job]["result"].update(device="cuda:0", device_name="NVIDIA H100 80GB HBM3",
                                                    pair=["resnet32x4", "resnet8x4"])
    assert gpu_kind("NVIDIA H100 80GB HBM3") == "h100" and gpu_kind("Tesla V100-SXM2-16GB") == "v100"
    (tmp_path / "h100.json").write_text(json.dumps(rec))
    found = {m.method: m for m in cost.device_records("h100", tmp_path)}
    assert set(found) == {"kd", "crd", "fitnet"}
    for m, meas in found.items():
        sps = rec["steps"]["bench"][m]["result"]["engine"]["plain"]["sps"]
        assert meas.seconds_per_step == pytest.approx(1 / sps["median"]) and meas.pair == ("resnet32x4", "resnet8x4")
    p = plan(load_suite(suite_path("paper")), "h100", 8, tables=["crd_table1", "crd_table2"], records_dir=str(tmp_path))
    assert 0 < p["total"]["measured_steps"] < p["total"]["steps"]  # KD, CRD, FitNet of that pair: measured


def test_projection_is_the_planners_of_crd_tables_and_paper(report):
    p = report["steps"]["projection"]
    assert p["gpu"] == "h100" and p["crd_tables"]["records"] == []  # dry: the model alone
    assert list(p["crd_tables"]["tables"]) == ["crd_table1", "crd_table2"]
    crd, paper = p["crd_tables"]["total"], p["paper"]["total"]
    assert crd["measured_steps"] == 0 and 0 < crd["runs"] < paper["runs"] and 0 < crd["gpu_hours"] < paper["gpu_hours"]
    # each run once: the total is no more than the tables' sum, less exactly their shared runs' double count
    t1, t2 = p["crd_tables"]["tables"].values()
    assert crd["runs"] <= t1["runs"] + t2["runs"] and crd["runs"] >= max(t1["runs"], t2["runs"])
    assert "crd_table1" in p["crd_tables_printed"] and "total (each run once)" in p["paper_printed"]
