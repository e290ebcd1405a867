"""Recovery on a (fake) SLURM cluster: `kdbench resume` after the controller was killed never
submits again a job the scheduler still has; `kdbench stop` cancels exactly this working
directory's jobs; a job that finds its run folder locked exits at once instead of holding its GPU."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import fake_slurm
from conftest import REPO, second_writer_order, write_suite
from kdbench.engine import run_folder
from kdbench.planning import scheduler
from test_slurm import cluster, snakemake_cmd, submissions  # noqa: F401 (cluster: the fixture)

SEEDS = [0, 1, 2]  # 3 plain students (seed 0 is the teacher), then 3 distillations that need seed 0


def tiny_suite(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_suite(folder / "tiny.yaml", folder / "data", recipe={"epochs": 1},
                       experiments=[{"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]],
                                     "methods": ["student", "kd"], "seeds": SEEDS}])


def wait_for(condition, timeout: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{log.read_text()[-3000:]}" if log else ""))


def kdbench(*args) -> list[str]:
    return [sys.executable, "-m", "kdbench.commands.cli", *args]


def fake(command: str, env: dict, *args) -> str:
    return subprocess.run([command, *args], env=env, capture_output=True, text=True, check=True).stdout


def test_resume_after_a_controller_kill_submits_no_job_the_scheduler_still_has(cluster):
    """The controller is killed with 2 jobs queued (held PENDING); one of them is then cancelled
    (it died with the controller). `kdbench resume` with the same arguments submits the cancelled
    one again and the runs never submitted once each, never the queued one; once the queued job
    has run, what needs it is submitted and every run finishes."""
    tmp, site, env = cluster
    work = tmp / "work"
    suite = tiny_suite(work)
    env = {**env, "FAKE_SLURM_RUN": "1", "FAKE_SLURM_HOLD": "1", "KDBENCH_SCHEDULER_POLL_S": "1"}
    args = ["--config", f"suite_file={suite}", "--jobs", "2", "--slurm-init-seconds-before-status-checks", "1"]
    try:
        resume_after_kill(tmp, work, site, env, args)
    finally:  # a job still held would wait for ever
        jobs = [line.split("|")[0] for line in fake("squeue", env, "--format=%i|%T").split()]
        if jobs:
            fake("scancel", env, *jobs)
    counts = Counter(s["comment"] for s in submissions(tmp / "slurm"))
    from kdbench.planning.suite import load_suite
    runs = load_suite(suite).runs
    assert set(counts) == {"rule_fit_wildcards_" + r.replace("/", "_") for r in runs}
    died, still = submissions(tmp / "slurm")[:2]
    assert counts[still["comment"]] == 1  # the queued job: never submitted again
    assert counts[died["comment"]] == 2  # the cancelled one: once more
    assert sum(counts.values()) == len(runs) + 1
    for r in runs:
        assert json.loads((work / "runs" / r / "metrics.json").read_text())["status"] == "ok", r
    assert (work / "results/tiny/main.md").is_file()


def resume_after_kill(tmp: Path, work: Path, site: Path, env: dict, args: list[str]) -> None:
    with open(tmp / "first.log", "w") as out:
        first = subprocess.Popen(snakemake_cmd(work, site, *args), env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            wait_for(lambda: len(submissions(tmp / "slurm")) == 2, 300, "2 submissions", tmp / "first.log")
            time.sleep(2)
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the controller dies; its jobs stay queued
            first.wait(timeout=60)
    queued = submissions(tmp / "slurm")
    assert len(queued) == 2 and fake("squeue", env, "--format=%i|%T").split() == [f"{s['job']}|PENDING" for s in queued]
    fake("scancel", env, queued[0]["job"])
    with open(tmp / "resume.log", "w") as out:
        resume = subprocess.Popen(kdbench("resume", *snakemake_cmd(work, site, *args)[3:]), env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:  # before any job runs: the died job and the never-submitted student, nothing else
            wait_for(lambda: len(submissions(tmp / "slurm")) == 4, 300, "the resume's submissions", tmp / "resume.log")
            time.sleep(3)
            assert len(submissions(tmp / "slurm")) == 4
            (tmp / "slurm/release").touch()  # the cluster starts the jobs
            resume.wait(timeout=600)
        finally:
            if resume.poll() is None:
                os.killpg(resume.pid, signal.SIGKILL)
    log = (tmp / "resume.log").read_text()
    assert resume.returncode == 0, log[-4000:]
    assert "the scheduler still has 1 job(s) of this pipeline" in log


def test_stop_cancels_this_workdirs_jobs_and_no_others(cluster):
    """Jobs stay RUNNING. One job of this working directory left by an earlier controller, one of
    another working directory, then a live controller's jobs: `kdbench stop -d WORK` ends the
    controller and every job of WORK is cancelled; the other directory's job runs on."""
    tmp, site, env = cluster
    work, other = tmp / "work", tmp / "other"
    suite = tiny_suite(work)
    other.mkdir()
    earlier = fake("sbatch", env, "--parsable", "--job-name", "earlier-uuid", "-D", str(work), "--comment",
                   "rule_fit_wildcards_x", "--wrap", "true").strip()
    foreign = fake("sbatch", env, "--parsable", "--job-name", "other-uuid", "-D", str(other), "--comment",
                   "rule_fit_wildcards_x", "--wrap", "true").strip()
    with open(tmp / "controller.log", "w") as out:
        controller = subprocess.Popen(snakemake_cmd(work, site, "--config", f"suite_file={suite}"), env=env,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: len(submissions(tmp / "slurm")) == 2 + len(SEEDS), 300, "the students' submissions",
                     tmp / "controller.log")
            stopped = subprocess.run(kdbench("stop", "-d", str(work)), env=env, capture_output=True, text=True,
                                     timeout=120)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            controller.wait(timeout=30)  # it is gone
        finally:
            if controller.poll() is None:
                os.killpg(controller.pid, signal.SIGKILL)
    mine = {earlier} | {s["job"] for s in submissions(tmp / "slurm") if s["comment"] != "rule_fit_wildcards_x"}
    assert len(mine) == 1 + len(SEEDS)
    calls = [json.loads(line) for line in (tmp / "slurm/calls.jsonl").read_text().splitlines()]
    cancelled = {a for c in calls if c["command"] == "scancel" for a in c["argv"] if not a.startswith("-")}
    assert cancelled == mine  # foreign never
    states = dict(line.split("|") for line in fake("squeue", env, "--states=all", "--format=%i|%T").split())
    assert {j: states[j] for j in mine} == dict.fromkeys(mine, "CANCELLED") and states[foreign] == "RUNNING"
    assert "stopped 1 snakemake controller(s)" in stopped.stdout, stopped.stdout
    first_cancel = next(i for i, c in enumerate(calls) if c["command"] == "scancel")
    assert not [c for c in calls[first_cancel:] if c["command"] == "sbatch"]  # nothing submitted once it stopped


def test_a_job_finding_its_folder_locked_exits_at_once_naming_the_run_and_its_holder(tmp_path, subprocess_env):
    """Inside a scheduler job (SLURM_JOB_ID set) `kdbench train-teacher` on a run whose folder a live
    process holds fails at once, names the run folder and the holder, and leaves the folder alone."""
    suite = tiny_suite(tmp_path)
    from kdbench.planning.suite import load_suite
    run_id = next(iter(load_suite(suite).runs))
    folder = tmp_path / "runs" / run_id
    env = {**subprocess_env, "SLURM_JOB_ID": "4242"}
    env.pop(run_folder.LOCKED_RUN, None)
    log = folder / "log.txt"
    with run_folder.claim(folder):  # this test process is the live writer, with its log
        log.write_text("epoch 1 of the live job\n")
        start = time.time()
        done = subprocess.run(kdbench("train-teacher", "--suite", str(suite), "--run", run_id, "--quiet",
                                      "--log", str(log)), env=env, capture_output=True, text=True, timeout=120)
        seconds = time.time() - start
        assert (folder / run_folder.HOLDER).is_file()  # the failing job did not touch the holder's note
        assert log.read_text() == "epoch 1 of the live job\n"  # nor its log (the rules' --log, not `> {log}`)
        log.unlink()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert run_id in done.stderr and f"process {os.getpid()} on " in done.stderr, done.stderr
    assert "exits at once" in done.stderr and "KDBENCH_LOCKED_RUN=wait" in done.stderr
    assert seconds < 60, seconds  # process start and imports; it never waits (the holder never lets go)
    assert sorted(p.name for p in folder.iterdir()) == ["spec.json"]  # no training, the note gone with its holder


def test_the_log_is_the_training_jobs_and_a_second_job_of_a_finished_run_leaves_it(tmp_path, subprocess_env):
    """--log (what the rules pass): the job that trains the run writes its log (emptied first); a job
    started again for the finished run (queued until the first finished) says so and keeps it."""
    suite = tiny_suite(tmp_path)
    from kdbench.planning.suite import load_suite
    run_id = next(iter(load_suite(suite).runs))
    log = tmp_path / "runs" / run_id / "log.txt"
    log.parent.mkdir(parents=True)
    log.write_text("a killed attempt's lines\n")
    subprocess.run(kdbench("make-data", "--suite", str(suite), "--dataset", "cifar100"), env=subprocess_env, check=True,
                   capture_output=True)
    cmd = kdbench("train-teacher", "--suite", str(suite), "--run", run_id, "--log", str(log))
    first = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    written = log.read_text()
    assert "main 1/1" in written and "killed attempt" not in written and "main 1/1" not in first.stderr, written
    again = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "is already finished" in again.stderr, again.stderr
    assert log.read_text() == written


def test_the_training_rules_let_kdbench_open_the_log():
    """rule fit's and the pack rules' shell pass --log; a shell `> {log}` would empty a run's log in
    every job started for it, a second one included."""
    rules = (REPO / "workflow/rules/train.smk").read_text()
    shells = re.findall(r'"\{params\.launch\} [^"]*"', rules)
    assert len(shells) == 2 and all(s.endswith('--log {log:q}"') for s in shells), shells
    assert "> {log" not in rules


def test_claim_waits_on_one_machine_and_raises_at_once_in_a_scheduler_job(tmp_path, monkeypatch):
    for var in run_folder.SCHEDULER_JOB:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(run_folder.LOCKED_RUN, raising=False)
    expected = {  # (scheduler job variable set, KDBENCH_LOCKED_RUN) -> waits
        (None, ""): True, (None, "wait"): True, (None, "exit"): False, (None, " Exit "): False,
        ("SLURM_JOB_ID", ""): False, ("PBS_JOBID", ""): False, ("LSB_JOBID", ""): False,
        ("SLURM_JOB_ID", "wait"): True, ("SLURM_JOB_ID", "exit"): False,
    }
    for (var, choice), waits in expected.items():
        with monkeypatch.context() as m:
            if var:
                m.setenv(var, "17")
            m.setenv(run_folder.LOCKED_RUN, choice)
            assert run_folder.waits_when_locked() is waits, (var, choice)
    monkeypatch.setenv(run_folder.LOCKED_RUN, "sometimes")
    with pytest.raises(ValueError, match="expected wait or exit"):
        run_folder.waits_when_locked()

    monkeypatch.setenv(run_folder.LOCKED_RUN, "")
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    with run_folder.claim(tmp_path):
        assert "(SLURM_JOB_ID 17)" in run_folder.holder(tmp_path)
        start = time.time()
        with pytest.raises(run_folder.RunFolderBusy, match=f"{tmp_path} is being written by process {os.getpid()} "):
            with run_folder.claim(tmp_path, poll_s=0.01):
                pass
        assert time.time() - start < 1
    assert not (tmp_path / run_folder.HOLDER).exists()

    monkeypatch.setenv(run_folder.LOCKED_RUN, "wait")  # explicitly: waits even inside a job
    assert second_writer_order(tmp_path) == ["first done", "second"]


def test_held_outputs_read_snakemakes_incomplete_markers(tmp_path):
    """Markers written by Snakemake's own FilePersistence._record_path (long keys split into
    "@"-prefixed folders): each output maps to the job id recorded in its marker."""
    from snakemake.persistence.file import FilePersistence

    class Short:  # a 16-character name limit forces the split of every key into folders
        _fetch_max_len = staticmethod(lambda subject: 16)

    markers = tmp_path / ".snakemake" / "incomplete"
    outputs = {"runs/a/metrics.json": "1001", str(tmp_path / "runs/b/seed0-9cca830c/metrics.json"): "1002",
               "runs/c/metrics.json": "1001", "runs/d/metrics.json": None}
    for output, job in outputs.items():
        path = Path(FilePersistence._record_path(Short, str(markers), output))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"external_jobid": job}))
    assert any(p.name.startswith("@") for p in markers.rglob("*"))
    held = scheduler.held_outputs(tmp_path, {"1001", "1002", "1003"})
    assert {k: sorted(v) for k, v in held.items()} == {
        "1001": ["runs/a/metrics.json", "runs/c/metrics.json"],
        "1002": [str(tmp_path / "runs/b/seed0-9cca830c/metrics.json")]}
    assert scheduler.held_outputs(tmp_path, {"1003"}) == {}
