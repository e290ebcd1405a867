"""``fit``: train one run of a suite — a teacher, a plain student, a distilled student or a linear
probe — into its folder, the entry point of ``kdbench train-teacher|distill|linear-probe`` (and,
for one model file by hand, ``kdbench probe``: :func:`kdbench.commands.cli.probe_main`).

It holds the run folder (:func:`kdbench.engine.run_folder.claim`: one writer at a time; a run
another process finished meanwhile is not trained again), records the students of a failed
teacher (and the probes of a failed model) as failed runs, chooses how steps execute
(:func:`kdbench.engine.fast.execution_for` the run's ``execution`` options) and trains the run —
a :class:`~kdbench.engine.run.TrainingRun`, or for a linear probe a
:class:`~kdbench.engine.linear_probe.ProbeRun` — through the one loop
(:func:`kdbench.engine.run.train`; the step itself is :mod:`kdbench.engine.step`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from kdbench.engine import run_folder
from kdbench.core import distributed
from kdbench.engine.device import resolve_device
from kdbench.engine.fast import execution_for
from kdbench.core.io import atomic_write_json, provenance
from kdbench.engine.linear_probe import ProbeRun
from kdbench.engine.rules import check_run
from kdbench.engine.run import TrainingRun, run_record, train
from kdbench.core.spec import RunSpec


def fit(spec: RunSpec, out_dir: str | Path, device: str = "auto", run_id: str | None = None,
        progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """Train one run to completion (resuming if a checkpoint exists) and return its metrics.
    ``progress``: tqdm's bar when stderr is a terminal (the per-epoch lines are always written).
    ``stop_after_epochs`` stops after that many epochs of this invocation (for tests of resume)."""
    with prepared(spec, out_dir, device, run_id, progress) as run:
        return run if isinstance(run, dict) else train(run, stop_after_epochs)


@contextlib.contextmanager
def prepared(spec: RunSpec, out_dir: str | Path, device: str, run_id: str | None = None, progress: bool = True,
             **shared):
    """Hold the run folder and yield what is left to do: a :class:`~kdbench.engine.run.TrainingRun`
    to train, or the run's metrics when there is nothing to train (another process finished it, or
    a teacher or probed model it reads failed). ``shared``: the ``data`` and ``loaders`` of packed runs."""
    # under torchrun rank 0 holds the folder; every rank reads the same files, so all take one path
    holds = int(os.environ.get("RANK", "0")) == 0
    with run_folder.claim(out_dir) if holds else contextlib.nullcontext():
        done = run_folder.finished_run(out_dir, spec)
        if done is not None:  # another process finished it while this one waited (or earlier)
            print(f"kdbench: {run_id or out_dir} is already finished ({Path(out_dir) / 'metrics.json'}); nothing to do",
                  file=sys.stderr, flush=True)
            yield done
            return
        if holds:  # the job's --log: only now, so that a second job of a finished run keeps its log
            run_folder.start_log()
        dctx = distributed.init(resolve_device(device))  # torchrun: this rank's process group and device
        check_run(spec, ddp=dctx.enabled)
        probe = spec.protocol == "linear_probe"
        failure = run_folder.failed_source([spec.init_ckpt] if probe else spec.teacher_ckpts,
                                           "probed model" if probe else "teacher")
        if failure is not None:  # its students (probes) are failed runs too, and the tables count them
            yield _failed(spec, out_dir, failure, run_id, dctx.device, dctx.is_main)
            return
        yield (ProbeRun if probe else TrainingRun)(spec, out_dir, dctx, run_id,
                                                   execution_for(spec.execution, dctx.device), progress=progress,
                                                   log_prefix=shared.pop("log_prefix", ""), **shared)


def _failed(spec: RunSpec, out_dir, failure: str, run_id, device, write: bool) -> dict:
    """The metrics.json of a run that cannot train because the run it reads failed."""
    metrics = run_record(spec, {"curve": []}, "failed", failure, run_id, None, 0.0, provenance(device))
    if write:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics
