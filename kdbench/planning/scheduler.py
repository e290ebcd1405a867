"""What a SLURM cluster still has queued or running for one working directory's pipeline.

Snakemake's SLURM executor plugin submits every job with ``sbatch -D <working directory>``, a
``--job-name`` that is the invocation's run uuid (a new one per ``snakemake`` invocation, so it
cannot find the jobs of a killed controller) and ``--comment rule_<rule>_wildcards_<...>``. A job
belongs to a pipeline when ``squeue`` reports the pipeline's working directory as the job's
(``%Z``); only this user's jobs are asked for. The commands are the cluster's own ``squeue`` and
``scancel`` found on PATH (on a machine without ``squeue`` nothing is queued).

Snakemake records, for each output of a job it submitted, the scheduler's job id in the output's
incomplete marker (``.snakemake/incomplete/<base64 of the path>``, a JSON ``external_jobid``) until
the job has finished; the job itself removes the marker when it completes. :func:`held_outputs`
reads those markers, so a job still in the queue maps to exactly the files it will write.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: seconds between two looks at the queue while waiting for jobs to end
POLL_S = float(os.environ.get("KDBENCH_SCHEDULER_POLL_S", "30"))


class SchedulerError(RuntimeError):
    """The scheduler's command failed: its message says which command and why."""


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    name: str  # the submitting snakemake invocation's run uuid
    comment: str  # rule_<rule>_wildcards_<wildcards>


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"`{' '.join(command[:2])} ...` did not answer within 120 s; try again") from None
    if done.returncode:
        raise SchedulerError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def live_jobs(directory: Path) -> list[Job]:
    """This user's jobs that ``squeue`` still lists (queued, running, completing) whose working
    directory is ``directory``."""
    if shutil.which("squeue") is None:
        return []
    out = _run(["squeue", f"--user={getpass.getuser()}", "--noheader", "--format=%i|%T|%j|%Z|%k"])
    jobs = []
    for line in out.splitlines():
        fields = line.strip().split("|", 4)
        if len(fields) == 5 and fields[3] and Path(fields[3]).resolve() == directory.resolve():
            jobs.append(Job(fields[0], fields[1], fields[2], fields[4]))
    return jobs


def held_outputs(directory: Path, job_ids: set[str]) -> dict[str, list[str]]:
    """job id -> the outputs Snakemake marked incomplete for that job (of ``job_ids``), from the
    markers in ``directory/.snakemake/incomplete``."""
    markers = directory / ".snakemake" / "incomplete"
    held: dict[str, list[str]] = {}
    for path in sorted(markers.rglob("*")) if markers.is_dir() else []:
        if not path.is_file() or path.name == "migration_underway":
            continue
        try:
            job = json.loads(path.read_text()).get("external_jobid")
            # a long key is split into folders, each but the last prefixed with "@"
            key = "".join(part.lstrip("@") for part in path.relative_to(markers).parts)
            output = base64.urlsafe_b64decode(key).decode()
        except (OSError, ValueError, AttributeError):  # being written, or not a marker
            continue
        if job in job_ids:
            held.setdefault(job, []).append(output)
    return held


def cancel(jobs: list[Job]) -> None:
    """``scancel`` the jobs (500 ids a call)."""
    ids = [j.id for j in jobs]
    for i in range(0, len(ids), 500):
        _run(["scancel", *ids[i:i + 500]])


def wait_until_gone(directory: Path, job_ids: set[str], poll_s: float = POLL_S) -> None:
    """Returns once none of ``job_ids`` is listed by ``squeue`` any more, saying how many remain."""
    left = None
    while True:
        still = {j.id for j in live_jobs(directory)} & job_ids
        if not still:
            return
        if len(still) != left:
            left = len(still)
            print(f"kdbench resume: waiting for {left} job(s) of the previous controller to end: "
                  f"{', '.join(sorted(still)[:10])}{' ...' if left > 10 else ''}", file=sys.stderr, flush=True)
        time.sleep(poll_s)
