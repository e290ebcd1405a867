"""``kdbench resume [SNAKEMAKE ARGS]``: continue a pipeline after ``snakemake`` was killed, in one
command, without submitting again a job the cluster still has; ``kdbench stop [-d DIR]``: stop a
pipeline and cancel its jobs.

A killed ``snakemake`` leaves its lock (``.snakemake/locks``) and marks the outputs of the jobs it
was running as incomplete, so a plain rerun refuses twice: first the lock, then the incomplete
files. This command checks that no ``snakemake`` is still running in the working directory (the
lock exists to protect a live one), then runs ``snakemake --unlock ARGS`` and ``snakemake
--rerun-incomplete ARGS``, with the same ARGS as the killed invocation (``--cores``, ``--config``,
``-d``, ``--workflow-profile`` ...). A run killed mid-training resumes from its ``checkpoint.pt``;
finished runs are not retrained.

On a cluster the killed controller's jobs go on: queued or running, their outputs marked
incomplete. ``--rerun-incomplete`` alone would submit each of them a second time. So resume first
asks the scheduler (:mod:`kdbench.planning.scheduler`: ``squeue``) for this working directory's
live jobs and, if there are any, runs ``snakemake --rerun-incomplete ARGS --omit-from <their
outputs>``: everything that does not need them, now. Then it waits until those jobs have left the
queue (a job that completes clears its own marker; one that failed or was killed keeps it) and
runs ``snakemake --rerun-incomplete ARGS`` for the rest: what needed them, and any of them that did
not complete. A job the scheduler still has is never submitted again.

``kdbench stop [-d DIR]`` ends the pipeline working in DIR (default: here): SIGTERM to its
``snakemake`` controller (SIGKILL 10 s later if it is still there), then ``scancel`` of every job
the scheduler still has for DIR, also those of controllers killed earlier. ``kdbench resume ARGS``
continues from there (cancelled runs resume from their checkpoints).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kdbench.planning import scheduler


def workdir(args: list[str]) -> Path:
    """The working directory snakemake would use: ``-d/--directory DIR``, else the current one."""
    for i, a in enumerate(args):
        if a in ("-d", "--directory") and i + 1 < len(args):
            return Path(args[i + 1]).resolve()
        if a.startswith("--directory="):
            return Path(a.split("=", 1)[1]).resolve()
    return Path.cwd().resolve()


def running_snakemakes(directory: Path) -> list[int]:
    """Process ids of snakemake controllers working in ``directory`` (Linux /proc; elsewhere []).
    A cluster job's own snakemake (``--mode remote``) is the scheduler's business, not a controller."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if int(proc.name) == os.getpid() or not any(b"snakemake" in part for part in cmdline[:3]):
                continue
            if b"--unlock" in cmdline or b"remote" in cmdline or Path(os.readlink(proc / "cwd")).resolve() != directory:
                continue
        except (OSError, ValueError):  # gone, or another user's
            continue
        found.append(int(proc.name))
    return found


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    directory = workdir(argv)
    live = running_snakemakes(directory)
    if live:
        print(f"kdbench resume: snakemake is still running in {directory} (process {', '.join(map(str, live))}); "
              f"its lock protects its jobs. Wait for it to end (or stop it: kdbench stop -d {directory}), "
              f"then run this again.", file=sys.stderr)
        return 1
    try:
        queued = scheduler.live_jobs(directory)
    except scheduler.SchedulerError as e:
        print(f"kdbench resume: cannot ask the scheduler which jobs it still has: {e}", file=sys.stderr)
        return 1
    snakemake = [sys.executable, "-m", "snakemake"]
    unlock = subprocess.run([*snakemake, "--unlock", *argv])
    if unlock.returncode:
        return unlock.returncode
    if queued:
        ids = {j.id for j in queued}
        held = [f for files in scheduler.held_outputs(directory, ids).values() for f in files]
        print(f"kdbench resume: the scheduler still has {len(queued)} job(s) of this pipeline; they are not "
              f"submitted again: first everything that does not need their {len(held)} output(s), then the rest "
              f"once they have ended", file=sys.stderr, flush=True)
        first = subprocess.run([*snakemake, "--rerun-incomplete", *argv, *(["--omit-from", *held] if held else [])])
        if first.returncode:
            print(f"kdbench resume: snakemake failed ({first.returncode}); the scheduler still has job(s) "
                  f"{', '.join(sorted(ids))}. Run this again to continue once the failure is fixed.", file=sys.stderr)
            return first.returncode
        scheduler.wait_until_gone(directory, ids)
    return subprocess.run([*snakemake, "--rerun-incomplete", *argv]).returncode


def stop_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kdbench stop", description=(
        "Stop the snakemake pipeline working in DIR and cancel (scancel) every job the scheduler "
        "still has for DIR. `kdbench resume ARGS` continues it."))
    p.add_argument("-d", "--directory", default=".", help="the pipeline's working directory (default: here)")
    directory = Path(p.parse_args(argv).directory).resolve()
    controllers = running_snakemakes(directory)
    for pid in controllers:
        os.kill(pid, signal.SIGTERM)
    left, deadline = list(controllers), time.time() + 10
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = [pid for pid in left if _alive(pid)]
    for pid in left:  # on SIGTERM snakemake waits for its running jobs; it must not submit more meanwhile
        os.kill(pid, signal.SIGKILL)
    try:
        jobs = scheduler.live_jobs(directory)
        scheduler.cancel(jobs)
    except scheduler.SchedulerError as e:
        print(f"kdbench stop: {e}", file=sys.stderr)
        return 1
    ids = " ".join(j.id for j in jobs)
    print(f"kdbench stop: {directory}: stopped {len(controllers)} snakemake controller(s) "
          f"({len(left)} with SIGKILL), cancelled {len(jobs)} job(s){': ' + ids if ids else ''}. "
          f"`kdbench resume ARGS` continues the pipeline.")
    return 0


def _alive(pid: int) -> bool:
    """Whether the process is still there (not gone, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
