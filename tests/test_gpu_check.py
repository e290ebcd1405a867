"""benchmarks/gpu_check.sh (issue 16) in its dry mode on the CPU, so that the GPU check cannot rot."""

import json
import subprocess

import pytest

from conftest import REPO

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
    assert kd["reference_sps"] > 0 and set(kd["engine"]) == {"plain", "fast"}
    assert kd["pack"]["k"] == 2 and kd["pack+fuse"]["fused"] is True


def test_projection_counts_crd_tables_1_and_2(report):
    p = report["steps"]["projection"]
    # by hand from workflow/suites/crd.yaml: Table 1 six pairs × 15 methods + wrn_40_1 × 14 (no FSP),
    # Table 2 six pairs × 14 methods; 5 seeds; 240 epochs of ceil(50000 / 64) = 782 steps
    assert p["runs"] == (6 * 15 + 14 + 6 * 14) * 5 == 940
    assert p["steps"] == 940 * 240 * 782
    for k, sps in p["steps_per_s"].items():
        assert p["gpu_hours"][k] == pytest.approx(p["steps"] / sps / 3600)
