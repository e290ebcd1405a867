"""A second scheduler end to end: the PBS profile (workflow/profiles/pbs, the generic cluster executor
plugin) submits a suite's jobs to a fake ``qsub`` (tests/fake_pbs.py) that runs them; every non-local
job asks PBS for exactly the standard resources its rule declares, local rules are never submitted,
and every run finishes as it does locally."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fake_pbs
from conftest import write_suite

REPO = Path(__file__).resolve().parents[1]
PBS = REPO / "workflow/profiles/pbs"


def test_a_suite_runs_through_pbs_with_each_rules_standard_resources(tmp_path, subprocess_env):
    pytest.importorskip("snakemake_executor_plugin_cluster_generic")
    from kdbench.planning.launch import job_resources
    from kdbench.planning.suite import load_suite

    fake_pbs.install(tmp_path / "bin")
    (tmp_path / "pbs").mkdir()
    env = {**subprocess_env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{subprocess_env['PATH']}",
           "FAKE_PBS": str(tmp_path / "pbs")}
    experiment = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["kd"],
                  "seeds": [0]}
    suite_file = write_suite(tmp_path / "tiny.yaml", tmp_path / "data", recipe={"epochs": 1},
                             experiments=[experiment])
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--workflow-profile", str(PBS), "--jobs", "4", "--latency-wait", "5",
                           "--config", f"suite_file={suite_file}"],
                          env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]

    suite = load_suite(suite_file)
    subs = [json.loads(line) for line in (tmp_path / "pbs/qsub.jsonl").read_text().splitlines()]
    submitted = {}
    for s in subs:
        argv = s["argv"]
        rule = fake_pbs.option(argv, "-N")[0].removeprefix("kdbench.")
        assert rule == "fit", rule  # tables, figures and synthetic data stay on the login node
        run_id = re.search(r"--target-jobs .fit:run=([^']+)'", s["script"]).group(1)
        submitted[run_id] = submitted.get(run_id, 0) + 1
        want = job_resources(suite.runs[run_id], suite.config, {})
        select, walltime = fake_pbs.option(argv, "-l")
        assert select == (f"select={want['nodes']}:ncpus={want['cpus_per_task']}:mem={want['mem_mb']}mb:"
                          f"ngpus={want['gpu']}")
        assert walltime == f"walltime={want['runtime']}:00"
    assert submitted == {r: 1 for r in suite.runs}  # every run, once
    for run_id in suite.runs:
        metrics = json.loads((tmp_path / "runs" / run_id / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["epochs_done"] == 1
