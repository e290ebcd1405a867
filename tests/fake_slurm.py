"""A fake SLURM for tests: ``sbatch``, ``srun``, ``sacct``, ``squeue``, ``scontrol``, ``sinfo``,
``sacctmgr``, ``sshare`` and ``scancel`` as links to this script in a bin folder put first on PATH.

Every ``sbatch`` call is recorded (its arguments, one JSON line in ``$FAKE_SLURM/sbatch.jsonl``) and
answered with a job id. With ``FAKE_SLURM_RUN=1`` the job runs, detached, as SLURM would run it
(the ``--wrap`` command; ``srun`` just runs its command) and is killed at its time limit: ``-t``
minutes of ``FAKE_SLURM_SECONDS_PER_MINUTE`` seconds each, but never before the file
``FAKE_SLURM_CHECKPOINT`` (a glob, if set) exists, so a slow machine still kills it after a
checkpoint. Only the first job that reaches its limit is killed (state TIMEOUT, recorded in
``$FAKE_SLURM/events.jsonl``); ``sacct`` reports COMPLETED, FAILED or TIMEOUT from the job's state
file. Without ``FAKE_SLURM_RUN`` every job stays RUNNING. With ``FAKE_SLURM_HOLD=1`` a job that
runs stays PENDING (queued) until the file ``$FAKE_SLURM/release`` exists.

``squeue`` answers as SLURM's does for the options kdbench and the plugin use: ``--format`` with
``%i`` (job id), ``%T`` (state), ``%j`` (job name), ``%k`` (comment) and ``%Z`` (working
directory, sbatch's ``-D``), ``--name``, ``--jobs``; without ``--states=all`` only live jobs
(PENDING, RUNNING). ``scancel ID...`` ends those jobs (state CANCELLED; a running one's processes
are killed); every call of every command is recorded in ``$FAKE_SLURM/calls.jsonl``.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "squeue", "scontrol", "sinfo", "sacctmgr", "sshare", "scancel")


def install(bin_dir: Path) -> None:
    """Links every fake command in ``bin_dir`` to this script (run by this Python)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / "_fake_slurm"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} \"$@\"\n")
    launcher.chmod(0o755)
    for name in COMMANDS:
        (bin_dir / name).write_text(f"#!/bin/sh\nFAKE_SLURM_COMMAND={name} exec {launcher} \"$@\"\n")
        (bin_dir / name).chmod(0o755)


def state_dir() -> Path:
    return Path(os.environ["FAKE_SLURM"])


def _append(name: str, record: dict) -> None:
    with open(state_dir() / name, "a") as f:
        f.write(json.dumps(record) + "\n")


def _set_state(job_id: str, state: str) -> None:
    """Replaces the job's state file at once (a reader never sees it half written)."""
    path = state_dir() / "jobs" / job_id
    tmp = path.with_name(f".{job_id}.{os.getpid()}")
    tmp.write_text(state)
    os.replace(tmp, path)


def _option(argv: list[str], *names: str) -> str | None:
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(n + "="):
                return a[len(n) + 1:]
    return None


def sbatch(argv: list[str]) -> int:
    jobs = state_dir() / "jobs"
    jobs.mkdir(exist_ok=True)
    n = 1000
    while True:  # concurrent calls: the first to create the state file has the id
        try:
            with open(jobs / str(n), "x") as f:
                f.write("PENDING" if os.environ.get("FAKE_SLURM_HOLD") == "1" else "RUNNING")
            break
        except FileExistsError:
            n += 1
    job_id = str(n)
    _append("sbatch.jsonl", {"job": job_id, "argv": argv})
    if os.environ.get("FAKE_SLURM_RUN") == "1":
        log = (_option(argv, "--output", "-o") or f"slurm-{job_id}.log").replace("%j", job_id)
        limit = int(_option(argv, "-t", "--time") or 0) * float(os.environ.get("FAKE_SLURM_SECONDS_PER_MINUTE", "60"))
        subprocess.Popen([sys.executable, __file__, "_run", job_id, str(limit), log, _option(argv, "--wrap")],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "SLURM_JOB_ID": job_id})
    print(job_id)
    return 0


def run_job(job_id: str, limit: float, log: str, command: str) -> int:
    """The job's life: wait while held, run it, kill it at its limit (the first job only) or when
    it is cancelled, write its final state."""
    state = state_dir() / "jobs" / job_id
    while state.read_text() == "PENDING":
        if (state_dir() / "release").exists():
            _set_state(job_id, "RUNNING")
        time.sleep(0.1)
    if state.read_text() != "RUNNING":  # cancelled while queued
        return 0
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    start, pattern = time.time(), os.environ.get("FAKE_SLURM_CHECKPOINT")
    killed = state_dir() / "killed"
    while proc.poll() is None:
        if state.read_text() == "CANCELLED":  # scancel: SIGTERM, then SIGKILL
            _stop(proc)
            return 0
        over = limit and time.time() - start > limit and (not pattern or glob.glob(pattern))
        if over and not killed.exists():
            killed.write_text(job_id)
            _stop(proc)  # as SLURM at the time limit
            _append("events.jsonl", {"job": job_id, "state": "TIMEOUT", "after_s": time.time() - start,
                                     "checkpoints": sorted(glob.glob(pattern)) if pattern else []})
            _set_state(job_id, "TIMEOUT")
            return 0
        time.sleep(0.1)
    if state.read_text() == "RUNNING":  # (not cancelled meanwhile)
        _set_state(job_id, "COMPLETED" if proc.returncode == 0 else "FAILED")
    return 0


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the job's processes, SIGKILL 10 s later, as SLURM does."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def srun(argv: list[str]) -> int:
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    os.execvp(argv[i], argv[i:])


def states() -> str:
    jobs = state_dir() / "jobs"
    return "".join(f"{p.name}|{p.read_text()}\n" for p in sorted(jobs.iterdir()) if not p.name.startswith(".")) \
        if jobs.exists() else ""


LIVE = ("PENDING", "RUNNING")


def job_table() -> list[dict]:
    """Every job submitted: its id, state, name, comment and working directory."""
    path = state_dir() / "sbatch.jsonl"
    table = []
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        argv = record["argv"]
        table.append({"i": record["job"], "T": (state_dir() / "jobs" / record["job"]).read_text(),
                      "j": _option(argv, "--job-name", "-J") or "", "k": _option(argv, "--comment") or "",
                      "Z": _option(argv, "-D", "--chdir") or ""})
    return table


def squeue(argv: list[str]) -> int:
    fields = (_option(argv, "--format", "-o") or "%i|%T").split("|")
    names, ids = _option(argv, "--name", "-n"), _option(argv, "--jobs", "-j")
    for job in job_table():
        if _option(argv, "--states", "-t") != "all" and job["T"] not in LIVE:
            continue
        if (names and job["j"] not in names.split(",")) or (ids and job["i"] not in ids.split(",")):
            continue
        print("|".join(job[f.lstrip("%")] for f in fields))
    return 0


def scancel(argv: list[str]) -> int:
    for job_id in (a for a in argv if not a.startswith("-")):
        state = state_dir() / "jobs" / job_id
        if state.exists() and state.read_text() in LIVE:
            _set_state(job_id, "CANCELLED")
    return 0


def main(argv: list[str]) -> int:
    command = os.environ.get("FAKE_SLURM_COMMAND", "")
    if argv[:1] == ["_run"]:
        return run_job(argv[1], float(argv[2]), argv[3], argv[4])
    if command != "srun":
        _append("calls.jsonl", {"command": command, "argv": argv})
    if command == "sbatch":
        return sbatch(argv)
    if command == "srun":
        return srun(argv)
    if command in ("sacct", "squeue"):
        if "--format=Reason" in argv or any(a.startswith("nodelist") for a in argv):
            return 0
        if command == "squeue":
            return squeue(argv)
        sys.stdout.write(states())
        return 0
    if command == "scontrol":
        print("MinJobAge = 300 sec\nMaxArraySize = 1001")
        return 0
    if command in ("sacctmgr", "sshare"):
        print(os.environ.get("FAKE_SLURM_ACCOUNTS", "myproj"))
        return 0
    if command == "sinfo":
        print("gpu*")
        return 0
    if command == "scancel":
        return scancel(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
