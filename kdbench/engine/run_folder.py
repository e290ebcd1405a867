"""A run folder has one writer at a time, and a run start clears what a killed writer left.

Every result file is written atomically (:mod:`kdbench.core.io`): to a temporary file
``.<name>.<8 random characters>`` in the same folder, then renamed. A process killed between the
two leaves the temporary behind; :func:`claim` removes those of its own folder (never another
run's: only the folder itself is scanned, only the names kdbench writes) once it holds the
folder's lock, so no live writer can own them. The lock (``flock`` on the folder itself, so it
leaves no lock file behind; released when the process exits, also when it is killed) makes a second process that starts the same run — two
``snakemake`` invocations whose suites share runs, or one with ``--nolock`` — wait for the first and
then resume from its finished checkpoint instead of training the run a second time.

Inside a scheduler's job (``SLURM_JOB_ID``, ``PBS_JOBID`` or ``LSB_JOBID`` set) a process that finds
the folder locked does not wait: it raises :class:`RunFolderBusy` at once, naming the run folder
and its holder, so that a duplicate job (a rerun that resubmitted a job the scheduler still had)
gives its GPU back instead of holding it until the first writer ends. Waiting is right on one
machine (two local pipelines share the CPUs/GPUs they already hold) and wrong on a cluster
(every waiting job holds an allocation). ``KDBENCH_LOCKED_RUN=wait`` or ``=exit`` chooses
explicitly. The holder is described by the hidden file ``.holder`` (host, process, scheduler job,
start time) that the lock's holder writes beside its lock and removes when it lets go.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from kdbench.core.io import OutputError, atomic_write_bytes, read_json

#: the temporary files of kdbench's atomic writes (tempfile.mkstemp's 8-character suffix)
TEMPORARY = re.compile(r"^\.(checkpoint\.pt|metrics\.json|model\.pt|diagnostics-[^/]+\.json)\.[A-Za-z0-9_]{8}$")


def stale_temporaries(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if TEMPORARY.match(p.name) and p.is_file())


#: the environment variables that say "this process runs inside a scheduler's job"
SCHEDULER_JOB = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")
LOCKED_RUN = "KDBENCH_LOCKED_RUN"
HOLDER = ".holder"


class RunFolderBusy(OutputError):
    """Another live process holds the run folder, and this one does not wait (a scheduler's job)."""


def waits_when_locked() -> bool:
    """Whether :func:`claim` waits for a locked folder: ``KDBENCH_LOCKED_RUN`` (wait | exit), else
    wait unless this process runs inside a scheduler's job."""
    choice = os.environ.get(LOCKED_RUN, "").strip().lower()
    if choice not in ("", "wait", "exit"):
        raise ValueError(f"{LOCKED_RUN}={choice!r}: expected wait or exit")
    return choice == "wait" if choice else not any(os.environ.get(v) for v in SCHEDULER_JOB)


def _me() -> str:
    job = next((f"{v} {os.environ[v]}" for v in SCHEDULER_JOB if os.environ.get(v)), "no scheduler job")
    return f"process {os.getpid()} on {socket.gethostname()} ({job}) since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"


def holder(folder: str | Path) -> str:
    """Who holds ``folder``'s lock, as its holder wrote it (or "another process" before it has)."""
    try:
        return (Path(folder) / HOLDER).read_text().strip() or "another process"
    except OSError:
        return "another process"


def _note_holder(folder: Path, remove: bool = False) -> None:
    """Writes (or removes) the holder's description; a folder that cannot take it goes without."""
    try:
        if remove:
            (folder / HOLDER).unlink(missing_ok=True)
        else:
            atomic_write_bytes(folder / HOLDER, (_me() + "\n").encode())
    except OSError:
        pass


#: the job's log (``--log``), opened by :func:`start_log` once this process holds a run it will write
_pending_log: Path | None = None


def log_when_writing(path: str | Path) -> None:
    """Send this process's output to ``path`` from the moment it holds a run folder it will write
    (:func:`start_log`), not before. Snakemake's ``> {log}`` emptied the log at the job's start, so
    a second job of a run (submitted again while the first still ran, or queued until it finished)
    blanked the run's log and then exited (folder locked) or found the run finished. Creates the
    file, empty, if there is none, so that a job that writes no run still leaves its log."""
    global _pending_log
    _pending_log = Path(path)
    _pending_log.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(_pending_log, os.O_WRONLY | os.O_CREAT, 0o644))  # never truncates


def start_log() -> None:
    """Redirect stdout and stderr (file descriptors 1 and 2, so child output too) to the pending
    log, emptied first as the shell's ``>`` would; once per process. A log is a stream, not an output
    written whole. Under torchrun only rank 0 holds the folder: the other ranks and torchrun print
    to the job's own output (the scheduler's job log)."""
    global _pending_log
    if _pending_log is None:
        return
    path, _pending_log = _pending_log, None
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


@contextmanager
def claim(folder: str | Path, poll_s: float = 2.0):
    """Hold ``folder``'s lock (waiting for another process that holds it, or raising
    :class:`RunFolderBusy` at once inside a scheduler's job: :func:`waits_when_locked`) and remove
    the stale temporary files of its atomic writes; yields the removed paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wait = waits_when_locked()
    fd = os.open(folder, os.O_RDONLY)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise RunFolderBusy(errno.EBUSY, (
                        f"{folder} is being written by {holder(folder)}; this job exits at once instead of "
                        f"holding its resources while it waits (a job the scheduler still runs was submitted "
                        f"again). {LOCKED_RUN}=wait waits instead."), str(folder)) from None
                if not waited:
                    print(f"kdbench: {folder} is being written by another process; waiting for it to finish",
                          file=sys.stderr, flush=True)
                    waited = True
                time.sleep(poll_s)
        _note_holder(folder)
        try:
            removed = stale_temporaries(folder)
            for p in removed:
                p.unlink(missing_ok=True)
            if removed:
                print(f"kdbench: removed {len(removed)} temporary file(s) a killed run left in {folder}: "
                      f"{', '.join(p.name for p in removed)}", file=sys.stderr, flush=True)
            yield removed
        finally:
            _note_holder(folder, remove=True)
    finally:
        os.close(fd)  # releases the lock


def finished_run(out_dir: str | Path, spec) -> dict | None:
    """The metrics of a finished run of ``spec`` in ``out_dir`` (metrics.json of this run's hash, with
    its model.pt when it succeeded), or None. Snakemake deletes a job's outputs before rerunning it,
    so this is a run another process finished while this one waited for the folder."""
    m = read_json(Path(out_dir) / "metrics.json")
    if m is None or m.get("hash") != spec.config_hash() or m.get("status") not in ("ok", "failed"):
        return None
    return m if m["status"] == "failed" or (Path(out_dir) / "model.pt").is_file() else None


def failed_source(models, role: str) -> str | None:
    """Why the run that makes one of ``models`` failed (``<role> <run> failed: <reason>``), or None.
    A run's ``model.pt`` sits beside its metrics.json; a failed run has no model.pt, so the runs
    that read it are failed runs too, saying why, and the tables still count them."""
    for path in models:
        m = read_json(Path(path).parent / "metrics.json") if Path(path).name == "model.pt" else None
        if m is not None and m.get("status") == "failed":
            return f"{role} {m.get('run') or Path(path).parent} failed: {m.get('failure')}"
    return None
