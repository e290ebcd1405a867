"""The DAG end to end through Snakemake: data -> teacher -> runs -> tables."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO, child_env, kdbench_cmd, write_suite


def snakemake(workdir, suite, *extra):
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none", "-d", str(workdir),
                           "--cores", "2", "--config", f"suite_file={suite}", *extra],
                          capture_output=True, text=True, timeout=900)


def test_dag_runs_and_rerun_recomputes_only_what_changed(tmp_path):
    suite = write_suite(tmp_path / "tiny.yaml", tmp_path / "data")
    proc = snakemake(tmp_path, suite)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = pd.read_csv(tmp_path / "results/tiny/runs.csv")
    summary = pd.read_csv(tmp_path / "results/tiny/summary.csv")
    assert set(runs.status) == {"ok"}
    kd = summary[summary.method == "kd"].iloc[0]
    assert kd.n == 2 and kd.acc_last_ci_lo <= kd.acc_last_mean <= kd.acc_last_ci_hi
    table = (tmp_path / "results/tiny/main.md").read_text()
    assert "resnet8 → resnet8" in table and "(n=2)" in table

    # delete one distilled run's output: only it and the tables are recomputed
    victim = runs[(runs.method == "kd") & (runs.seed == 1)].run.iloc[0]
    (tmp_path / "runs" / victim / "metrics.json").unlink()
    dry = snakemake(tmp_path, suite, "-n", "--quiet", "rules")
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout + dry.stderr
    assert "fit" in out and "aggregate" in out and "synthetic" not in out
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    assert jobs == {"fit": "1", "aggregate": "1", "seed_figures": "1", "all": "1", "total": "4"}


def test_failed_teacher_corrupt_metrics_and_table_spec_changes(tmp_path):
    """Issue 18: a diverged teacher's students are failed runs and the tables are still written; a
    corrupt metrics.json is reported as corrupt and a rerun repairs it; a changed table spec reruns
    the tables."""
    from kdbench.report.aggregate import run_records
    from kdbench.planning.suite import load_suite

    exp = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["student", "kd"],
           "seeds": [0, 1], "teacher_recipe": {"epochs": 2, "lr": 1.0e12}}
    suite = write_suite(tmp_path / "tiny.yaml", tmp_path / "data", experiments=[exp])
    proc = snakemake(tmp_path, suite)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = pd.read_csv(tmp_path / "results/tiny/runs.csv")
    assert dict(runs.groupby("method").status.agg(set)) == {"teacher": {"failed"}, "student": {"ok"}, "kd": {"failed"}}
    (teacher,) = runs[runs.method == "teacher"].run
    for run in runs[runs.method == "kd"].run:
        m = json.loads((tmp_path / "runs" / run / "metrics.json").read_text())
        assert m["failure"].startswith(f"teacher {teacher} failed: non-finite loss")
    kd = pd.read_csv(tmp_path / "results/tiny/summary.csv").set_index("method").loc["kd"]
    assert kd.n == 0 and kd.n_failed == 2
    assert "2 failed" in (tmp_path / "results/tiny/main.md").read_text()

    # a corrupt metrics.json: reported as corrupt, and the next snakemake rewrites it from the checkpoint
    student = runs[(runs.method == "student") & (runs.seed == 1)].run.iloc[0]
    path = tmp_path / "runs" / student / "metrics.json"
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:100])
    status = run_records(load_suite(suite)).set_index("run").status
    assert status[student] == "corrupt"
    proc = snakemake(tmp_path, suite)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "was corrupt: moved to metrics.json.corrupt" in proc.stdout + proc.stderr
    repaired = json.loads(path.read_text())
    assert repaired["status"] == "ok" and repaired["curve"] == good["curve"]

    # the table's spec changes (metric, caption): the tables and the seed figures (the forest plot
    # reads the metric) are rewritten, no run is redone
    write_suite(tmp_path / "tiny.yaml", tmp_path / "data", experiments=[exp],
                tables=[{"name": "main", "experiments": ["main"], "metric": "acc_best", "caption": "Best epoch"}])
    dry = snakemake(tmp_path, suite, "-n", "--quiet", "rules")
    assert dict(re.findall(r"^(\w+)\s+(\d+)$", dry.stdout + dry.stderr, flags=re.M)) == {
        "aggregate": "1", "seed_figures": "1", "all": "1", "total": "3"}
    proc = snakemake(tmp_path, suite)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Best epoch" in (tmp_path / "results/tiny/main.md").read_text()


RESULTS_COLUMNS = ["experiment", "method", "seed", "status", "run", "acc_last", "acc_best", "acc5_last", "epoch_best"]


def kill_test_pipeline(folder):
    """The suite of the kill tests (4 epochs, so that snakemake can be killed mid-run) in ``folder``."""
    folder.mkdir()
    suite = write_suite(folder / "tiny.yaml", folder / "data", recipe={"epochs": 4})
    return suite, ["-s", str(REPO / "Snakefile"), "--workflow-profile", "none", "-d", str(folder), "--cores", "2", "--config", f"suite_file={suite}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The kill tests' pipeline run once without interruption (their reference)."""
    folder = tmp_path_factory.mktemp("straight") / "straight"
    _, args = kill_test_pipeline(folder)
    done = subprocess.run([sys.executable, "-m", "snakemake", *args], env=child_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.mark.parametrize("kill", ["group", "snakemake"])
def test_one_command_recovers_a_killed_snakemake(tmp_path, subprocess_env, uninterrupted, kill):
    """Issues 13 and 18: snakemake is SIGKILLed mid-pipeline — with its jobs (a crash of the
    machine), or alone while its jobs run on (their run folders stay locked until they end). A
    plain rerun refuses (on the lock, or on outputs it did not see finish); `kdbench resume` with
    the same arguments finishes the pipeline, and its tables equal an uninterrupted pipeline's."""
    suite, args = kill_test_pipeline(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args], env=subprocess_env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "killed/runs").glob("**/checkpoint.pt")):
        time.sleep(0.1)
    if kill == "group":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed/results/tiny/runs.csv").exists(), "the pipeline finished before it could be killed"
    plain = snakemake(tmp_path / "killed", suite)
    said = (plain.stdout + plain.stderr).lower()  # the lock, or (jobs that ran on) their unrecorded outputs
    assert plain.returncode != 0 and ("lock" in said or "incomplete" in said), plain.stderr[-3000:]
    resumed = subprocess.run(kdbench_cmd("resume", *args), env=subprocess_env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs, ref = (pd.read_csv(d / "results/tiny/runs.csv") for d in (tmp_path / "killed", uninterrupted))
    assert set(runs.status) == {"ok"} and len(runs) == 5
    pd.testing.assert_frame_equal(runs[RESULTS_COLUMNS], ref[RESULTS_COLUMNS])
    assert (tmp_path / "killed/results/tiny/main.md").read_text() == (uninterrupted / "results/tiny/main.md").read_text()
