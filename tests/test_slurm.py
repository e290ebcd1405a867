"""The paper suite submitted to a (fake) SLURM cluster as a user does it: a site profile of their
own (partition, account) layered under ours, jobs really submitted through the SLURM executor
plugin to fake ``sbatch``/``sacct``/... commands that record them (tests/fake_slurm.py); and a
job killed at its time limit, resubmitted, resuming from its checkpoint to the same metrics as an
uninterrupted run."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import fake_slurm
from conftest import write_suite

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "workflow/profiles/slurm"
LOCAL_RULES = ("aggregate", "seed_figures", "paper_tables", "paper_figures", "fetch_teacher", "synthetic_")


@pytest.fixture
def cluster(tmp_path, subprocess_env):
    """A fake cluster on PATH, a site profile and the environment to run snakemake in."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    fake_slurm.install(tmp_path / "bin")
    state = tmp_path / "slurm"
    state.mkdir()
    site = tmp_path / "site"
    site.mkdir()
    (site / "config.yaml").write_text(yaml.safe_dump({"default-resources": {"slurm_partition": "gpu",
                                                                           "slurm_account": "myproj"}}))
    env = {**subprocess_env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{subprocess_env['PATH']}",
           "FAKE_SLURM": str(state), "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{subprocess_env['PYTHONPATH']}"}
    return tmp_path, site, env


def snakemake_cmd(workdir, site, *args):
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--profile", str(site), "--workflow-profile", str(SLURM), *args]


def submissions(state: Path) -> list[dict]:
    """Every sbatch call: its options, the rule (from the plugin's --comment) and the run."""
    out = []
    path = state / "sbatch.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        argv = json.loads(line)["argv"]
        comment = fake_slurm._option(argv, "--comment")
        rule = re.match(r"rule_(.+?)(_wildcards_|$)", comment).group(1)
        out.append({"argv": argv, "rule": rule, "comment": comment, "job": json.loads(line)["job"]})
    return out


def test_paper_suite_submission_requests_what_the_site_and_the_runs_need(cluster):
    tmp, site, env = cluster
    work = tmp / "work"
    for root in ("cifar100", "cifar10", "svhn", "stl10", "tinyimagenet", "imagenet"):  # stand-ins: pre-flight
        (work / "data" / root).mkdir(parents=True)
    fake_kdbench = tmp / "bin" / "kdbench"  # local jobs (released-teacher downloads) are recorded, not run
    fake_kdbench.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp / 'local.txt'}\nexit 1\n")
    fake_kdbench.chmod(0o755)
    from kdbench.planning.suite import load_suite
    suite = load_suite(REPO / "workflow/suites/paper.yaml")
    ready = [r for r, run in suite.runs.items() if not run.needs and run.kind != "import"]  # need nothing
    out = open(tmp / "snakemake.log", "w")  # a file, not a pipe: nobody reads a pipe while it runs
    proc = subprocess.Popen(snakemake_cmd(work, site, "--config", "suite=paper", "fetch_teachers=download",
                                          "--jobs", "1000"), env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # bounded: every job stays RUNNING, so the submissions stop at the runs that need nothing
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and len(submissions(tmp / "slurm")) < len(ready):
            time.sleep(1)
        time.sleep(3)  # (a submission too many would show now)
    finally:  # nothing runs on the fake cluster: no job to cancel
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        out.close()
    log = (tmp / "snakemake.log").read_text()
    subs = submissions(tmp / "slurm")
    assert sorted(s["comment"] for s in subs) == sorted(
        "rule_fit_wildcards_" + r.replace("/", "_") for r in ready), log[-3000:]  # each once
    for s in subs:
        argv, opts = s["argv"], " ".join(s["argv"])
        assert (fake_slurm._option(argv, "-p"), fake_slurm._option(argv, "-A")) == ("gpu", "myproj")  # the site's
        assert s["rule"] == "fit" and not s["rule"].startswith(LOCAL_RULES)  # tables etc. are never submitted
        gpus = int(fake_slurm._option(argv, "--gpus"))
        assert gpus >= 1 and 15 <= int(fake_slurm._option(argv, "-t")) <= 24 * 60  # a GPU, under the cap
        assert "--nodes=1" in argv and "--mem" in opts
        if "_imagenet_" in s["comment"]:  # DDP: 4 GPUs on one node, 8 CPUs per GPU, one task (torchrun)
            assert gpus == 4 and "--cpus-per-task=32" in argv and not any("ntasks" in a for a in argv)
            assert fake_slurm._option(argv, "-t") == "1440"  # the 29.7 h estimate, capped
        else:
            assert gpus == 1
    assert any("_imagenet_" in s["comment"] for s in subs)
    local = (tmp / "local.txt").read_text().splitlines()
    assert local and all(line.startswith("fetch-teachers ") for line in local)  # downloads on the login node


def test_job_killed_at_its_time_limit_resumes_to_the_uninterrupted_metrics(cluster):
    """max_runtime=10 (minutes) is below the runs' estimate: each job asks for 10 minutes and may be
    submitted twice. The fake cluster kills the first job at its limit (after its first checkpoint);
    Snakemake resubmits it and it resumes. Its metrics equal those of the same runs done at once."""
    tmp, site, env = cluster
    experiment = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["kd"],
                  "seeds": [0]}
    suites = {}
    for name in ("straight", "cluster"):
        (tmp / name).mkdir()
        suites[name] = write_suite(tmp / name / "tiny.yaml", tmp / "data", recipe={"epochs": 4},
                                   experiments=[experiment])
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp / "straight"), "--workflow-profile", "none", "--cores", "1", "--config", f"suite_file={suites['straight']}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    env = {**env, "FAKE_SLURM_RUN": "1", "FAKE_SLURM_SECONDS_PER_MINUTE": "0.01",
           "FAKE_SLURM_CHECKPOINT": str(tmp / "cluster/runs/*/*/*/*/checkpoint.pt")}
    done = subprocess.run(snakemake_cmd(tmp / "cluster", site, "--config", f"suite_file={suites['cluster']}",
                                        "max_runtime=10", "--slurm-init-seconds-before-status-checks", "1"),
                          env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    subs = submissions(tmp / "slurm")
    assert all(fake_slurm._option(s["argv"], "-t") == "10" for s in subs)  # the cap, not the estimate
    events = [json.loads(line) for line in (tmp / "slurm/events.jsonl").read_text().splitlines()]
    assert len(events) == 1 and events[0]["state"] == "TIMEOUT" and events[0]["checkpoints"]
    killed = next(s for s in subs if s["job"] == events[0]["job"])
    assert [s["comment"] for s in subs].count(killed["comment"]) == 2  # resubmitted once
    assert len(subs) == 3  # teacher twice, student once
    for path in (tmp / "straight/runs").rglob("metrics.json"):
        reference = json.loads(path.read_text())
        resumed = json.loads((tmp / "cluster/runs" / path.relative_to(tmp / "straight/runs")).read_text())
        for key in ("status", "acc_last", "acc5_last", "acc_best", "epochs_done", "teacher_sha256", "curve"):
            assert resumed.get(key) == reference.get(key), key


@pytest.mark.parametrize("args, message", [
    (["--config", "suit=paper"], "unknown --config key(s) suit; valid keys: ddp_procs, fetch_teachers, max_runtime"),
    (["--configfile", str(REPO / "workflow/suites/crd.yaml")], "run a suite with --config suite_file=PATH"),
    (["--config", "suite=paper"], "dataset 'cifar100': its root data/cifar100 does not exist"),  # no data here
])
def test_a_config_typo_a_suite_as_configfile_and_a_missing_dataset_fail_before_any_job(cluster, args, message):
    tmp, site, env = cluster
    done = subprocess.run(snakemake_cmd(tmp / "work", site, *args), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and message in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    assert submissions(tmp / "slurm") == []


def test_missing_released_teachers_fail_the_pre_flight_listing_every_file_and_submit_nothing(cluster):
    """The CRD suite distils 875 runs from 5 released teachers: without their files and without a
    download source (this machine has no network; fetch_teachers=never says the same without the
    probe), the pre-flight refuses before any job, naming each file and where to get it."""
    tmp, site, env = cluster
    work = tmp / "work"
    for root in ("cifar100", "cifar10", "svhn", "stl10", "tinyimagenet", "imagenet"):
        (work / "data" / root).mkdir(parents=True)
    from kdbench.planning.suite import load_suite
    from kdbench.teachers.released import released_teacher
    suite = load_suite(REPO / "workflow/suites/crd.yaml")
    files = {released_teacher(r.spec.dataset, r.spec.student).file for r in suite.runs.values() if r.kind == "import"}
    assert len(files) >= 5
    (work / "teachers" / next(iter(sorted(files)))).parent.mkdir(parents=True)
    present = sorted(files)[0]
    (work / "teachers" / present).write_bytes(b"x")  # one already here: not listed
    for mode in ("never", "auto"):
        done = subprocess.run(snakemake_cmd(work, site, "--config", "suite=crd", f"fetch_teachers={mode}"), env=env,
                              capture_output=True, text=True, timeout=600)
        out = done.stdout + done.stderr
        assert done.returncode != 0 and f"{len(files) - 1} released teacher file(s)" in out, out[-3000:]
        assert all(f"teachers/{f}" in out for f in files - {present}) and f"teachers/{present}" not in out
        assert "fetch-teachers --suite" in out and "--list" in out and "Traceback" not in out
        assert submissions(tmp / "slurm") == []
