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

**Horizontal fusion** (``fuse=True``, ``kdbench pack --fuse``; HFTA, ``performance.md`` §5): the
students of runs that share a fusable architecture (resnet, wrn, vgg; two or more such runs) are
fused into one model (:mod:`kdbench.engine.fusion`: grouped convolutions, one BN over K·C
channels, a batched classifier), so the K students run as one sequence of K-times-wider kernels
instead of K sequences of small ones. Each run's parameters and BN statistics become views of
the fused model's (``FusedModel.bind``): its optimizer, evaluation, checkpoints and ``model.pt``
stay its own. The epoch loop then yields a :class:`~kdbench.engine.fast.StudentStep` per step
and :class:`FusedStudents` takes the step of all the fused runs at once
(:func:`~kdbench.engine.fast.fused_train_step`: one forward and backward pass of the sum of their
losses, then each run's own optimizer step), eagerly or as one CUDA graph per epoch. When a run
leaves, the others are fused anew. Results equal the runs alone up to the rounding of grouped
versus plain convolutions (``tests/test_pack.py``: 3 steps of KD, CRD, FitNet, DKD, AB's
initialisation stage and CE agree within 1e-4 relative; float32 runs of a few epochs then drift
apart chaotically like the same run at another CPU thread count). Two differences: a member parameter
that its own loss does not reach gets a zero gradient instead of none (every method's main-stage
loss reaches every student parameter through CE; initialisation stages train only their own
parameters), and a step that raises an error fails every run of its fused group.
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
from .fast import StudentStep
from .train import fit_steps, resolve_device


class PackError(RuntimeError):
    """Some runs of a pack failed; the others finished."""


def teacher_key(spec: RunSpec) -> tuple:
    """What identifies a run's teacher: packed runs share it, and one forward pass answers them all."""
    return spec.teacher, spec.teacher_ckpts, spec.teacher_dataset


def check_packable(specs: list[RunSpec]) -> None:
    """Runs can be packed if they share the dataset, batch size and execution options, and every
    run that has a teacher has the same one. Runs with an unlabelled stream or a validation
    holdout cannot be packed."""
    if not specs:
        raise ValueError("nothing to pack: give at least one run")
    if any(s.unlabeled is not None for s in specs):
        raise ValueError("runs with an unlabelled stream (unlabeled) cannot be packed: their steps concatenate a "
                         "second batch that the pack's shared teacher pass and fused students do not handle; "
                         "run them alone")
    if any(s.validation is not None for s in specs):
        raise ValueError("runs with a validation holdout (validation) cannot be packed: the pack shares one "
                         "training set and test loader between its runs; run them alone")
    first = specs[0]
    for s in specs[1:]:
        for key in ("dataset", "data_root", "execution"):
            if getattr(s, key) != getattr(first, key):
                raise ValueError(f"runs with different {key} cannot be packed: {getattr(first, key)!r} vs "
                                 f"{getattr(s, key)!r}; pack runs that share a dataset and execution options")
        if s.recipe.batch_size != first.recipe.batch_size:
            raise ValueError(f"runs with different batch sizes cannot be packed ({first.recipe.batch_size} vs "
                             f"{s.recipe.batch_size})")
    teachers = {teacher_key(s) for s in specs if s.teacher_ckpts}
    if len(teachers) > 1:
        raise ValueError("packed runs must share their teacher; found " + ", ".join(sorted(map(str, teachers))))
    if any(s.protocol != "fit" for s in specs):
        raise ValueError("only protocol 'fit' runs can be packed (not linear_probe)")


def fusion_groups(specs: list[RunSpec]) -> list[str | None]:
    """Each run's fused group (its student architecture), or None where it trains unfused: an
    architecture :mod:`~kdbench.engine.fusion` does not support, or the only run of its
    architecture in the pack."""
    from .fusion import SUPPORTED_ARCHS
    count = {a: sum(s.student == a for s in specs) for a in {s.student for s in specs}}
    return [s.student if s.student in SUPPORTED_ARCHS and count[s.student] > 1 else None for s in specs]


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


class FusedStudents:
    """The students of the packed runs that share an architecture, fused into one model
    (:mod:`kdbench.engine.fusion`) and bound: each run's parameters and BN statistics are views
    of the fused model's, so its optimizer, evaluation, checkpoint and ``model.pt`` are its own.
    When a run leaves (finished or failed) the others are fused anew."""

    def __init__(self):
        self.members: tuple = ()  # run indices of the current fused model
        self.fused = None
        self.step, self.step_key, self.warm = None, None, False

    def __call__(self, ks: list[int], steps: list[StudentStep], ts: list) -> None:
        from .fusion import fuse
        runtime = steps[0].runtime
        if tuple(ks) != self.members:
            students = [st.student for st in steps]
            self.fused = fuse(students)
            runtime.prepare(self.fused)  # memory format first: bind makes the members views of these tensors
            self.fused.bind(students)
            self.members, self.step_key, self.warm = tuple(ks), None, False
        # a new step function whenever a run's epoch, stage or generator changes (CUDA graphs capture them)
        key = tuple((st.batch.epoch, id(st.optimizer), id(st.init_term), id(st.batch.generator)) for st in steps)
        if key != self.step_key:
            self.step, self.step_key = runtime.fused_stepper(self.fused, steps, self.warm), key
            self.warm = True
        self.step([st.batch.x for st in steps], [st.batch.y for st in steps], [st.batch.index for st in steps], ts)


def drive_packed(steps: list, device: torch.device, teacher_keys: list | None = None, fuse_keys: list | None = None,
                 fusers: dict | None = None) -> list:
    """Advance several ``fit_steps`` generators in lockstep: collect one request from each,
    answer the teacher requests of runs with the same ``teacher_keys[k]`` (and runtime) with one
    call, take the fused steps of runs with the same ``fuse_keys[k]`` (runs yielding
    :class:`StudentStep`) as one, repeat. Returns each generator's result, or the exception it
    raised (a fused step that raises fails every run of its fused group). ``fusers``: the
    :class:`FusedStudents` by fuse key, to keep them (and their warm CUDA graphs) across calls."""
    teacher_keys = teacher_keys or [k for k in range(len(steps))]
    fuse_keys = fuse_keys or [k for k in range(len(steps))]
    results: list = [None] * len(steps)
    slots = [_RngSlot(device) for _ in steps]
    fusers = {} if fusers is None else fusers
    pending: dict[int, object] = {}

    def advance(k: int, value=None, error: Exception | None = None) -> None:
        try:
            with slots[k]:
                if error is not None:
                    pending[k] = steps[k].throw(error)
                else:
                    pending[k] = next(steps[k]) if value is None else steps[k].send(value)
        except StopIteration as done:
            results[k] = done.value
        except Exception as e:  # one run's failure does not stop the others
            results[k] = e

    for k in range(len(steps)):
        advance(k)
    while pending:
        teacher_reqs = {k: (r.teacher if isinstance(r, StudentStep) else r) for k, r in pending.items()}
        groups: dict[tuple, list[int]] = {}
        for k, req in teacher_reqs.items():
            if req is not None:
                groups.setdefault((teacher_keys[k], id(req.runtime.cache), req.runtime.execution), []).append(k)
        answers = {k: None for k in pending}
        for ks in groups.values():
            reqs = [teacher_reqs[k] for k in ks]  # identical teachers: the first one answers for all
            answers.update(zip(ks, reqs[0].runtime.teacher_features(reqs[0].teacher, reqs)))
        fused_groups: dict = {}
        for k, req in pending.items():
            if isinstance(req, StudentStep):
                fused_groups.setdefault(fuse_keys[k], []).append(k)
        errors: dict[int, Exception] = {}
        for key, ks in fused_groups.items():
            try:
                fusers.setdefault(key, FusedStudents())(ks, [pending[k] for k in ks], [answers[k] for k in ks])
            except Exception as e:
                errors.update((k, e) for k in ks)
        fused_now = {k for ks in fused_groups.values() for k in ks}
        pending_now = sorted(pending)
        pending.clear()
        for k in pending_now:
            advance(k, None if k in fused_now else answers[k], errors.get(k))
    return results


def fit_packed(specs: list[RunSpec], out_dirs: list[str | Path], device: str = "auto",
               run_ids: list[str | None] | None = None, fuse: bool = False) -> list[dict]:
    """Train ``specs`` together (see the module docstring); each writes into its ``out_dirs[k]``
    exactly what ``fit`` writes. ``fuse``: fuse the students of runs that share a fusable
    architecture (two or more such runs). Returns their metrics; raises :class:`PackError` if any
    failed."""
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
    fuse_keys = fusion_groups(specs) if fuse else [None] * len(specs)
    steps = [fit_steps(s, o, str(dev), r, progress=False, shared={**shared, "fuse": f is not None})
             for s, o, r, f in zip(specs, out_dirs, run_ids, fuse_keys)]
    results = drive_packed(steps, dev, [teacher_key(s) for s in specs], fuse_keys)
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
    parser.add_argument("--fuse", action="store_true",
                        help="fuse the students of runs that share an architecture (resnet, wrn, vgg) into one model "
                             "with grouped convolutions (horizontal fusion): results equal to float rounding")
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
                         device=args.device or suite.config.get("device", "auto"), run_ids=list(args.runs),
                         fuse=args.fuse)
    for m in metrics:
        print(json.dumps({k: m.get(k) for k in ("run", "status", "failure", "acc_last", "acc_best", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
