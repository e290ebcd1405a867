"""``fit``: train one run of a suite — a teacher, a plain student, a distilled student or a linear
probe — into its folder, the entry point of ``kdbench train-teacher|distill|linear-probe`` (and,
for one model file by hand, ``kdbench probe``: :func:`probe_main`).

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
    with run_folder.claim(out_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        done = run_folder.finished_run(out_dir, spec)
        if done is not None:  # another process finished it while this one waited (or earlier)
            print(f"kdbench: {run_id or out_dir} is already finished ({Path(out_dir) / 'metrics.json'}); nothing to do",
                  file=sys.stderr, flush=True)
            yield done
            return
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


def probe_main(argv: list[str] | None = None) -> int:
    """``kdbench probe``: the linear probe (:mod:`kdbench.engine.linear_probe`) of one model file, by hand."""
    import argparse
    import json

    from kdbench.core.spec import PROBE_RECIPE, Recipe
    d = dict(PROBE_RECIPE)
    p = argparse.ArgumentParser(
        prog="kdbench probe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Linear probe (CRD/DKD transfer protocol): freeze a trained model (weights and BN statistics) and "
                    "train a new linear layer on its pooled feature on another dataset, weight decay 0.",
        epilog="Example:\n  kdbench probe runs/cifar100/wrn_40_2--wrn_16_2/crd/seed0-xxxx/model.pt "
               "--dataset stl10 --root data/stl10 --out runs/probes/crd-stl10")
    p.add_argument("model", help="the frozen model's file (a run's model.pt, kdbench-model/1)")
    p.add_argument("--dataset", required=True, help="target dataset (e.g. stl10, tinyimagenet; `kdbench list datasets`)")
    p.add_argument("--root", required=True, help="the target dataset's root folder")
    p.add_argument("--out", required=True, help="output folder (metrics.json, model.pt, checkpoint.pt)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help=f"epochs ({d['epochs']})")
    p.add_argument("--milestones", type=int, nargs="*", default=d["milestones"],
                   help=f"lr ×0.1 after these epochs ({' '.join(map(str, d['milestones']))})")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"SGD lr ({d['lr']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"batch size ({d['batch_size']})")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help=f"weight decay ({d['weight_decay']}, as the DKD maintainers prescribe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    from kdbench.core.registry import UnknownNameError
    from kdbench.data import DatasetMissingError
    from kdbench.engine.checkpoint import MODEL_FORMAT, CheckpointError, read_file
    try:
        arch = read_file(a.model, MODEL_FORMAT)["arch"]
        recipe = Recipe.from_config({**d, "epochs": a.epochs, "milestones": a.milestones, "lr": a.lr,
                                     "batch_size": a.batch_size, "weight_decay": a.weight_decay})
        spec = RunSpec(a.dataset, a.root, arch, "student", a.seed, recipe=recipe, protocol="linear_probe",
                       init_ckpt=a.model)
        m = fit(spec, a.out, a.device, run_id=None, progress=not a.quiet)
    except (CheckpointError, DatasetMissingError, UnknownNameError, ValueError) as e:
        print(f"kdbench probe: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: m.get(k) for k in ("status", "failure", "acc_last", "acc_best", "wall_time_s")}))
    return 0

