"""Packing: several runs that share a teacher, trained together in one process on one device.

A grid of small CIFAR runs leaves a GPU mostly idle, one run at a time (``performance.md`` §5).
:func:`fit_packed` trains K runs (different seeds and/or methods, even different students) in
lockstep. Each run is exactly :func:`~kdbench.engine.fit.fit`'s code (its
:class:`~kdbench.engine.run.TrainingRun`, through the one :func:`~kdbench.engine.run.loop`): its own
initialisation, data order,
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
stay its own. :class:`FusedStudents` takes the step of all the fused runs at once
(:func:`~kdbench.engine.step.fused_train_step`: one forward and backward pass of the sum of their
losses, then each run's own optimizer step), eagerly or as one CUDA graph per epoch. When a run
leaves, the others are fused anew. Results equal the runs alone up to the rounding of grouped
versus plain convolutions (``tests/test_pack.py``: 3 steps of KD, CRD, FitNet, DKD, AB's
initialisation stage and CE agree within 1e-4 relative; float32 runs of a few epochs then drift
apart chaotically like the same run at another CPU thread count). Two differences: a member parameter
that its own loss does not reach gets a zero gradient instead of none (every method's main-stage
loss reaches every student parameter through CE; initialisation stages train only their own
parameters), and a step that raises an error fails every run of its fused group.

**How.** Each run is a :class:`~kdbench.engine.run.TrainingRun` going through the one loop
(:func:`~kdbench.engine.run.loop`, cut at each step); :class:`Lockstep` advances the runs together:
one teacher pass for all their batches (:func:`teacher_answers`), the fused groups' steps
(:func:`fused_steps`), then each other run's own step. What packed runs must share, and that a pack
never runs under DDP, is :func:`kdbench.engine.rules.check_packable`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from kdbench.data import load_dataset
from kdbench.core import distributed
from kdbench.engine.device import resolve_device
from kdbench.engine.fusion import SUPPORTED_ARCHS, fuse
from kdbench.engine.rules import check_packable, teacher_key
from kdbench.engine.run import TAKEN, TrainingRun, loop
from kdbench.core.spec import RunSpec
from kdbench.engine.step import Member
from kdbench.engine.fit import prepared


class PackError(RuntimeError):
    """Some runs of a pack failed; the others finished."""


def fusion_groups(specs: list[RunSpec]) -> list[str | None]:
    """Each run's fused group (its student architecture), or None where it trains unfused: an
    architecture :mod:`~kdbench.engine.fusion` does not support, or the only run of its
    architecture in the pack."""
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


def member(run) -> Member:
    """A run's part of a fused step, at its current epoch and stage."""
    return Member(run.student, run.objective, run.opt, run.term, run.names, run.sums, run.epoch, run.gen)


class FusedStudents:
    """The students of the packed runs that share an architecture, fused into one model
    (:mod:`kdbench.engine.fusion`) and bound: each run's parameters and BN statistics are views
    of the fused model's, so its optimizer, evaluation, checkpoint and ``model.pt`` are its own.
    When a run leaves (finished or failed) the others are fused anew."""

    def __init__(self):
        self.members: tuple = ()  # run indices of the current fused model
        self.fused = None
        self.step, self.step_key, self.warm = None, None, False

    def __call__(self, ks: list[int], runs: list, batches: list, ts: list) -> None:
        execution = runs[0].execution
        if tuple(ks) != self.members:
            students = [r.student for r in runs]
            self.fused = fuse(students)
            execution.prepare(self.fused)  # memory format first: bind makes the members views of these tensors
            self.fused.bind(students)
            self.members, self.step_key, self.warm = tuple(ks), None, False
        # a new step function whenever a run's epoch, stage or generator changes (CUDA graphs capture them)
        key = tuple((r.epoch, id(r.opt), id(r.term), id(r.gen)) for r in runs)
        if key != self.step_key:
            self.step, self.step_key = execution.fused_stepper(self.fused, [member(r) for r in runs], self.warm), key
            self.warm = True
        self.step([b.x for b in batches], [b.y for b in batches], [b.index for b in batches], ts)


def teacher_answers(runs: list, pending: dict, teacher_keys: list) -> dict:
    """The teacher's Features for each pending run ``k`` (``pending[k]``: its step's batch and
    view): runs with the same ``teacher_keys[k]`` and execution share one forward pass (their
    teachers are identical copies: the first answers for all) or the teacher cache."""
    groups: dict[tuple, list[int]] = {}
    inputs = {k: runs[k].teacher_input(*pending[k]) for k in pending}
    for k, part in inputs.items():
        if part is not None:
            ex = runs[k].execution
            groups.setdefault((teacher_keys[k], id(ex.cache), getattr(ex, "execution", None)), []).append(k)
    answers = {k: None for k in pending}
    for ks in groups.values():
        first = runs[ks[0]]
        answers.update(zip(ks, first.execution.teacher_features(first.teacher, [inputs[k] for k in ks])))
    return answers


def fused_steps(runs: list, pending: dict, answers: dict, fuse_keys: list, fusers: dict) -> tuple[set, dict]:
    """Take the step of the pending runs that fuse (same ``fuse_keys[k]``, a run whose whole student
    trains this epoch) as one per group; returns the runs taken and the errors by run (a fused step
    that raises fails every run of its group)."""
    groups: dict = {}
    for k in pending:
        if fuse_keys[k] is not None and runs[k].fusable():
            groups.setdefault(fuse_keys[k], []).append(k)
    errors: dict[int, Exception] = {}
    for key, ks in groups.items():
        try:
            for k in ks:
                runs[k].set_step_lr()
            fusers.setdefault(key, FusedStudents())(ks, [runs[k] for k in ks], [pending[k][0] for k in ks],
                                                    [answers[k] for k in ks])
        except Exception as e:
            errors.update((k, e) for k in ks)
    return {k for ks in groups.values() for k in ks}, errors


class Lockstep:
    """``runs`` (:class:`~kdbench.engine.run.TrainingRun`; an entry that is already a result, metrics
    or an exception, is passed through) advanced together through :func:`~kdbench.engine.run.loop`,
    one step of each per round, each step of each run inside its own global RNG slot (``slots[k]``,
    default: one per run from the RNG state now). ``teacher_keys[k]``: runs with the same key share
    one teacher pass; ``fuse_keys[k]``: runs with the same key (not None) take one fused step. A run
    that raises leaves with its exception as its result; the others go on."""

    def __init__(self, runs: list, slots: list | None = None, teacher_keys: list | None = None,
                 fuse_keys: list | None = None):
        self.runs, self.results = runs, list(runs)
        self.slots = slots or [_RngSlot(r.device) if isinstance(r, TrainingRun) else None for r in runs]
        self.teacher_keys = teacher_keys or [0] * len(runs)
        self.fuse_keys = fuse_keys or [None] * len(runs)
        self.fusers: dict = {}
        self.loops = {k: loop(r) for k, r in enumerate(runs) if isinstance(r, TrainingRun)}
        self.pending: dict[int, tuple] = {}  # run -> its next step's (batch, view)
        for k in self.loops:
            self._advance(k)

    def _advance(self, k: int, value=None, error: Exception | None = None) -> None:
        try:
            with self.slots[k]:
                if error is not None:
                    self.pending[k] = self.loops[k].throw(error)
                else:
                    self.pending[k] = next(self.loops[k]) if value is None else self.loops[k].send(value)
        except StopIteration as done:
            self.results[k] = done.value
        except Exception as e:  # one run's failure does not stop the others
            self.results[k] = e

    def run(self, rounds: int | None = None) -> list:
        """Take ``rounds`` steps of every unfinished run (None: until all have finished); each run's
        metrics, or the exception it raised, or (unfinished) its TrainingRun."""
        while self.pending and rounds != 0:
            pending = self.pending
            answers = teacher_answers(self.runs, pending, self.teacher_keys)
            taken, errors = fused_steps(self.runs, pending, answers, self.fuse_keys, self.fusers)
            self.pending = {}
            for k in sorted(pending):
                self._advance(k, TAKEN if k in taken else answers[k], errors.get(k))
            rounds = None if rounds is None else rounds - 1
        return self.results


def fit_packed(specs: list[RunSpec], out_dirs: list[str | Path], device: str = "auto",
               run_ids: list[str | None] | None = None, fuse: bool = False) -> list[dict]:
    """Train ``specs`` together (see the module docstring); each writes into its ``out_dirs[k]``
    exactly what ``fit`` writes. ``fuse``: fuse the students of runs that share a fusable
    architecture (two or more such runs). Returns their metrics; raises :class:`PackError` if any
    failed."""
    check_packable(specs)
    if len(out_dirs) != len(specs):
        raise ValueError(f"{len(specs)} runs but {len(out_dirs)} output folders")
    dev = resolve_device(device)
    first = specs[0]
    data = load_dataset(first.dataset, first.data_root)
    shared = {"data": data, "loaders": data.loaders(first.recipe.batch_size, first.recipe.test_batch_size, dev)}
    run_ids = run_ids or [None] * len(specs)
    fuse_keys = fusion_groups(specs) if fuse else [None] * len(specs)
    slots = [_RngSlot(dev) for _ in specs]
    with contextlib.ExitStack() as folders:
        runs: list = []
        for k, (s, out, rid) in enumerate(zip(specs, out_dirs, run_ids)):
            try:
                with slots[k]:
                    runs.append(folders.enter_context(prepared(s, out, str(dev), rid, False, log_prefix=rid or "",
                                                               **shared)))
            except Exception as e:
                runs.append(e)
        results = Lockstep(runs, slots, [teacher_key(s) for s in specs], fuse_keys).run()
    distributed.close()
    failed = [(r or k, e) for k, (r, e) in enumerate(zip(run_ids, results)) if isinstance(e, Exception)]
    if failed:
        raise PackError(f"{len(failed)} of {len(specs)} packed runs failed: "
                        + "; ".join(f"{r}: {type(e).__name__}: {e}" for r, e in failed))
    return results
