"""The DAG end to end through Snakemake: data -> teacher -> runs -> tables."""

import re
import subprocess
import sys

import pandas as pd

from conftest import REPO, write_suite


def snakemake(workdir, suite, *extra):
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
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
    assert jobs == {"fit": "1", "aggregate": "1", "all": "1", "total": "3"}
