"""``kdbench resume [SNAKEMAKE ARGS]``: continue a pipeline after ``snakemake`` was killed, in one command.

A killed ``snakemake`` leaves its lock (``.snakemake/locks``) and marks the outputs of the jobs it
was running as incomplete, so a plain rerun refuses twice: first the lock, then the incomplete
files. This command checks that no ``snakemake`` is still running in the working directory (the
lock exists to protect a live one), then runs ``snakemake --unlock ARGS`` and ``snakemake
--rerun-incomplete ARGS``, with the same ARGS as the killed invocation (``--cores``, ``--config``,
``-d``, ``--workflow-profile`` ...). A run killed mid-training resumes from its ``checkpoint.pt``;
finished runs are not retrained.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def workdir(args: list[str]) -> Path:
    """The working directory snakemake would use: ``-d/--directory DIR``, else the current one."""
    for i, a in enumerate(args):
        if a in ("-d", "--directory") and i + 1 < len(args):
            return Path(args[i + 1]).resolve()
        if a.startswith("--directory="):
            return Path(a.split("=", 1)[1]).resolve()
    return Path.cwd().resolve()


def running_snakemakes(directory: Path) -> list[int]:
    """Process ids of snakemake invocations working in ``directory`` (Linux /proc; elsewhere [])."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if int(proc.name) == os.getpid() or not any(b"snakemake" in part for part in cmdline[:3]):
                continue
            if b"--unlock" in cmdline or Path(os.readlink(proc / "cwd")).resolve() != directory:
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
              f"its lock protects its jobs. Wait for it to end (or stop it), then run this again.", file=sys.stderr)
        return 1
    snakemake = [sys.executable, "-m", "snakemake"]
    unlock = subprocess.run([*snakemake, "--unlock", *argv])
    if unlock.returncode:
        return unlock.returncode
    return subprocess.run([*snakemake, "--rerun-incomplete", *argv]).returncode
