"""Packing: several runs that share a teacher, trained together in one process on one device.

A grid of small CIFAR runs leaves a GPU mostly idle, one run at a time (``performance.md`` §5).
:func:`fit_packed` trains K runs (different seeds and/or methods, even different students) in
lockstep. Each run is exactly :func:`~kdbench.engine.train.fit`'s code (its
:func:`~kdbench.engine.train.fit_steps` generator): its own initialisation, data order,
augmentation, BN statistics, optimizer state, checkpoint, ``metrics.json`` and ``model.pt``.
What is shared:

- the dataset, once on the device, and the loaders (stateless: each run passes its own
  generator);
- the teacher's forward pass: at each step the K runs' batches are concatenated and go through
  the frozen eval-mode teacher in **one** forward pass (per-sample outputs do not depend on the
  batch), or are looked up in the shared exact teacher cache. Each run still loads its own copy
  of the teacher, as ``fit`` does (building the architecture draws from the global RNG before the
  run's adapters are initialised, so skipping it would change their initialisation); the copies
  are identical and cost only memory (K × the teacher's weights);
- the global RNG is saved and restored around each run's turn, so even a term drawing from
  ``torch``'s global generator would see the stream it sees alone.

So the results equal running the runs one by one with ``fit`` (``tests/test_pack.py``): bit for
bit except where the teacher's convolutions round differently at the larger batch — within
floating-point tolerance on CPU; on a GPU, kernels chosen per shape make the runs agree within
seed noise.

Runs may be at different stages (an AB/FT/FSP initialisation stage while another run is in its
main stage) and of different lengths; a finished run leaves the pack. A run that fails with an
error does not stop the others; :class:`PackError` lists the failures at the end.

Not done yet — **horizontal fusion** (HFTA) in the pack: the K students still run as K
sequences of small kernels. :mod:`kdbench.engine.fusion` fuses same-architecture students
(resnet, wrn, vgg) into one model with grouped convolutions and per-member BN statistics, tested
exact against separate models; wiring it into :func:`fit_packed` (its docstring gives the plan)
is the next step and the bigger GPU lever (performance.md §5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..data import load_dataset
from . import distributed
from .spec import RunSpec
from .train import fit_steps, resolve_device


class PackError(RuntimeError):
    """Some runs of a pack failed; the others finished."""


def check_packable(specs: list[RunSpec]) -> None:
    """Runs can be packed if they share the dataset, batch size and execution options, and every
    run that has a teacher has the same one."""
    if not specs:
        raise ValueError("nothing to pack: give at least one run")
    first = specs[0]
    for s in specs[1:]:
        for key in ("dataset", "data_root", "execution"):
            if getattr(s, key) != getattr(first, key):
                raise ValueError(f"runs with different {key} cannot be packed: {getattr(first, key)!r} vs "
                                 f"{getattr(s, key)!r}; pack runs that share a dataset and execution options")
        if s.recipe.batch_size != first.recipe.batch_size:
            raise ValueError(f"runs with different batch sizes cannot be packed ({first.recipe.batch_size} vs "
                             f"{s.recipe.batch_size})")
    teachers = {(s.teacher, s.teacher_ckpts, s.teacher_dataset) for s in specs if s.teacher_ckpts}
    if len(teachers) > 1:
        raise ValueError("packed runs must share their teacher; found " + ", ".join(sorted(map(str, teachers))))
    if any(s.protocol != "fit" for s in specs):
        raise ValueError("only protocol 'fit' runs can be packed (not linear_probe)")


class _RngSlot:
    """One run's global RNG state (CPU and, on CUDA, the device's default generator)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None

    def __enter__(self):
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)

    def __exit__(self, *exc):
        self.cpu_state = torch.get_rng_state()
        if self.cuda:
            self.cuda_state = torch.cuda.get_rng_state(self.device)


def drive_packed(steps: list, device: torch.device, teacher_keys: list | None = None) -> list:
    """Advance several ``fit_steps`` generators in lockstep: collect one teacher request from
    each, answer the requests of runs with the same ``teacher_keys[k]`` (and runtime) with one
    call, repeat. Returns each generator's result, or the exception it raised."""
    teacher_keys = teacher_keys or [k for k in range(len(steps))]
    results: list = [None] * len(steps)
    slots = [_RngSlot(device) for _ in steps]
    pending: dict[int, object] = {}

    def advance(k: int, value) -> None:
        try:
            with slots[k]:
                pending[k] = next(steps[k]) if value is None else steps[k].send(value)
        except StopIteration as done:
            results[k] = done.value
        except Exception as e:  # one run's failure does not stop the others
            results[k] = e

    for k in range(len(steps)):
        advance(k, None)
    while pending:
        groups: dict[tuple, list[int]] = {}
        for k, req in pending.items():
            groups.setdefault((teacher_keys[k], id(req.runtime.cache), req.runtime.execution), []).append(k)
        answers = {}
        for ks in groups.values():
            reqs = [pending[k] for k in ks]  # identical teachers: the first one answers for all
            answers.update(zip(ks, reqs[0].runtime.teacher_features(reqs[0].teacher, reqs)))
        pending.clear()
        for k in sorted(answers):
            advance(k, answers[k])
    return results


def fit_packed(specs: list[RunSpec], out_dirs: list[str | Path], device: str = "auto",
               run_ids: list[str | None] | None = None) -> list[dict]:
    """Train ``specs`` together (see the module docstring); each writes into its ``out_dirs[k]``
    exactly what ``fit`` writes. Returns their metrics; raises :class:`PackError` if any failed."""
    check_packable(specs)
    if len(out_dirs) != len(specs):
        raise ValueError(f"{len(specs)} runs but {len(out_dirs)} output folders")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("packing runs several runs in one process on one device; it cannot run under torchrun (DDP)")
    dev = resolve_device(device)
    first = specs[0]
    data = load_dataset(first.dataset, first.data_root)
    shared = {"data": data, "loaders": data.loaders(first.recipe.batch_size, first.recipe.test_batch_size, dev)}
    run_ids = run_ids or [None] * len(specs)
    steps = [fit_steps(s, o, str(dev), r, progress=False, shared=shared) for s, o, r in zip(specs, out_dirs, run_ids)]
    results = drive_packed(steps, dev, [(s.teacher, s.teacher_ckpts, s.teacher_dataset) for s in specs])
    distributed.close()
    failed = [(r or k, e) for k, (r, e) in enumerate(zip(run_ids, results)) if isinstance(e, Exception)]
    if failed:
        raise PackError(f"{len(failed)} of {len(specs)} packed runs failed: "
                        + "; ".join(f"{r}: {type(e).__name__}: {e}" for r, e in failed))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kdbench pack",
        description="Train several runs of a suite that share a teacher together in one process on one device "
                    "(each writes its own run folder exactly as `kdbench distill` would).")
    parser.add_argument("--suite", required=True, help="suite YAML file")
    parser.add_argument("--run", action="append", required=True, dest="runs", metavar="RUN_ID",
                        help="a run id of the suite (repeat for each run of the pack)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the suite's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    from ..suite import load_suite
    suite = load_suite(args.suite)
    unknown = [r for r in args.runs if r not in suite.runs]
    if unknown:
        raise SystemExit(f"runs not in suite {suite.name!r}: {', '.join(unknown)}; `kdbench list-runs --suite "
                         f"{args.suite}` lists them")
    torch.set_num_threads(args.threads or suite.config.get("threads", 1))
    runs = [suite.runs[r] for r in args.runs]
    metrics = fit_packed([r.spec for r in runs], [suite.run_dir(r.id) for r in runs],
                         device=args.device or suite.config.get("device", "auto"), run_ids=list(args.runs))
    for m in metrics:
        print(json.dumps({k: m.get(k) for k in ("run", "status", "failure", "acc_last", "acc_best", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
