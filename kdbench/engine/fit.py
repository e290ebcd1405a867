"""``fit``: train one run of a suite — a teacher, a plain student, a distilled student or a linear
probe — into its folder, the entry point of ``kdbench train-teacher|distill|linear-probe``.

It holds the run folder (:func:`kdbench.engine.run_folder.claim`: one writer at a time; a run
another process finished meanwhile is not trained again), records the students of a failed
teacher as failed runs, chooses how steps execute (:class:`kdbench.engine.fast.Runtime` for the
run's ``execution`` options) and trains the run with the plain loop
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
from kdbench.engine.fast import Runtime
from kdbench.core.io import atomic_write_json, provenance
from kdbench.engine.rules import check_run
from kdbench.engine.run import Run, run_record, train
from kdbench.core.spec import RunSpec


def fit(spec: RunSpec, out_dir: str | Path, device: str = "auto", run_id: str | None = None,
        progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """Train one run to completion (resuming if a checkpoint exists) and return its metrics.
    ``progress``: tqdm's bar when stderr is a terminal (the per-epoch lines are always written).
    ``stop_after_epochs`` stops after that many epochs of this invocation (for tests of resume)."""
    if spec.protocol == "linear_probe":
        from kdbench.engine.linear_probe import fit_probe
        failure = run_folder.failed_source([spec.init_ckpt], "probed model")
        if failure is not None:
            return _failed(spec, out_dir, failure, run_id, resolve_device(device), True)
        return fit_probe(spec, out_dir, device=device, run_id=run_id, progress=progress)
    with prepared(spec, out_dir, device, run_id, progress) as run:
        return run if isinstance(run, dict) else train(run, stop_after_epochs)


@contextlib.contextmanager
def prepared(spec: RunSpec, out_dir: str | Path, device: str, run_id: str | None = None, progress: bool = True,
             **shared):
    """Hold the run folder and yield what is left to do: a :class:`~kdbench.engine.run.Run` to
    train, or the run's metrics when there is nothing to train (another process finished it, or
    a teacher it reads failed). ``shared``: the ``data`` and ``loaders`` of packed runs."""
    # under torchrun rank 0 holds the folder; every rank reads the same files, so all take one path
    with run_folder.claim(out_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        done = run_folder.finished_run(out_dir, spec)
        if done is not None:  # another process finished it while this one waited (or earlier)
            print(f"kdbench: {run_id or out_dir} is already finished ({Path(out_dir) / 'metrics.json'}); nothing to do",
                  file=sys.stderr, flush=True)
            yield done
            return
        dctx = distributed.init(resolve_device(device))  # torchrun: this rank's process group and device
        check_run(spec, ddp=dctx.enabled)
        failure = run_folder.failed_source(spec.teacher_ckpts, "teacher")
        if failure is not None:  # its students are failed runs too, and the tables count them
            yield _failed(spec, out_dir, failure, run_id, dctx.device, dctx.is_main)
            return
        yield Run(spec, out_dir, dctx, run_id, Runtime(spec.execution, dctx.device), progress=progress,
                  log_prefix=shared.pop("log_prefix", ""), **shared)


def _failed(spec: RunSpec, out_dir, failure: str, run_id, device, write: bool) -> dict:
    """The metrics.json of a run that cannot train because the run it reads failed."""
    metrics = run_record(spec, {"curve": []}, "failed", failure, run_id, None, 0.0, provenance(device))
    if write:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics
