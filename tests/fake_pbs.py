"""A fake PBS for tests: ``qsub`` and ``qdel`` as links to this script in a bin folder put first on PATH.

Every ``qsub`` call is recorded (its arguments, one JSON line in ``$FAKE_PBS/qsub.jsonl``) and
answered with a job id; the job script (qsub's last argument) then runs detached, as PBS would run
it, with its output in the ``-o`` folder. ``qdel`` calls are recorded in ``qdel.jsonl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

COMMANDS = ("qsub", "qdel")


def install(bin_dir: Path) -> None:
    """Links every fake command in ``bin_dir`` to this script (run by this Python)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        (bin_dir / name).write_text(f"#!/bin/sh\nFAKE_PBS_COMMAND={name} exec {sys.executable} "
                                    f"{Path(__file__).resolve()} \"$@\"\n")
        (bin_dir / name).chmod(0o755)


def _record(name: str, record: dict) -> None:
    with open(Path(os.environ["FAKE_PBS"]) / name, "a") as f:
        f.write(json.dumps(record) + "\n")


def option(argv: list[str], name: str) -> list[str]:
    """Every value of option ``name`` (``-l`` may come several times)."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def qsub(argv: list[str]) -> int:
    jobs = Path(os.environ["FAKE_PBS"]) / "jobs"
    jobs.mkdir(exist_ok=True)
    n = 1000
    while True:  # concurrent calls: the first to create the state file has the id
        try:
            with open(jobs / str(n), "x"):
                break
        except FileExistsError:
            n += 1
    job_id = f"{n}.fakepbs"
    _record("qsub.jsonl", {"job": job_id, "argv": argv, "script": Path(argv[-1]).read_text()})
    out_dir = Path((option(argv, "-o") or ["."])[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{job_id}.log", "w") as log:
        subprocess.Popen(["/bin/sh", argv[-1]], start_new_session=True, stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT, env={**os.environ, "PBS_JOBID": job_id})
    print(job_id)
    return 0


def main(argv: list[str]) -> int:
    command = os.environ.get("FAKE_PBS_COMMAND", "")
    if command == "qsub":
        return qsub(argv)
    _record("qdel.jsonl", {"argv": argv})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
