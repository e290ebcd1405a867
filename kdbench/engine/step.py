"""How one training step goes, and how an epoch's metrics are read: the maths every path shares.

A step (:func:`train_step`): the student's forward pass, the objective's weighted terms (their
sum is the loss), ``zero_grad``, backward, the optimizer step, and the step's loss terms and
correct predictions added to a device-resident sum (no host synchronisation). At the end of an
epoch :func:`epoch_means` reads the sums once and refuses a non-finite loss; :func:`evaluate`
measures the test set.

:class:`Eager` is the plain execution of these steps (fp32, eager). The fast paths
(:mod:`kdbench.engine.fast`: bf16, channels_last, ``torch.compile``, CUDA graphs, the teacher
cache) are subclasses that return other step functions around the same sequence; packing
(:mod:`kdbench.engine.pack`) drives several runs' steps, or one fused step of several runs
(:func:`fused_train_step`: the same sequence with one forward and one backward pass for all).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from kdbench.methods import Batch, Objective
from kdbench.core.features import Features
from kdbench.core import distributed


class NonFiniteLoss(RuntimeError):
    pass


class TeacherInput(NamedTuple):
    """What the teacher sees of a step: the images the terms read, their positions in the
    training set and their augmentation view ids (for the teacher cache; None without it)."""

    x: Tensor
    index: Tensor
    view: Tensor | None = None


def set_train_modes(student: nn.Module, objective: Objective, train_modules: list[nn.Module] | None = None) -> None:
    """Main stage (``train_modules`` None): the student and the objective train. Initialisation
    stage: only ``train_modules`` train, the rest is in eval mode (see
    :meth:`~kdbench.methods.DistillLoss.init_train_modules`)."""
    student.train(train_modules is None)
    objective.train(train_modules is None)
    for module in train_modules or ():
        module.train()


def step_names(objective: Objective, init_term=None) -> list[str]:
    """The names of the per-step sums: total loss, then each term (or ``init``)."""
    return ["loss", *(["init"] if init_term else list(objective.terms) + (["ce"] if objective.spec.ce else []))]


def step_loss(s: Features, objective: Objective, batch: Batch, t: Features | None, init_term) -> dict[str, Tensor]:
    """A step's weighted loss terms by name (their sum is the loss): the initialisation stage's
    one term, or the method's."""
    return {"init": init_term.init_loss(s, t, batch)} if init_term is not None else objective(s, t, batch)


def record_step(sums: Tensor, loss: Tensor, terms: dict[str, Tensor], names: list[str], logits: Tensor,
                batch: Batch) -> None:
    """Add [n·loss, n·term..., correct] to the run's device-resident ``sums`` (no host sync);
    n and the accuracy count the labelled samples."""
    n = batch.num_labeled
    vals = [loss.detach(), *(terms[k].detach() for k in names[1:])]
    correct = (logits.detach()[:n].argmax(1) == batch.y[:n]).sum()
    sums += torch.stack([*(v.double() * n for v in vals), correct.double()])


@dataclass
class Member:
    """One run's part of a step: its student, objective, the stage's optimizer and initialisation
    term (None in the main stage), its metric names and device-resident sums, and the epoch and
    generator its batches carry."""

    student: nn.Module
    objective: Objective
    optimizer: object
    init_term: object
    names: list[str]
    sums: Tensor
    epoch: int = 1
    generator: torch.Generator | None = None


def train_step(student: nn.Module, objective: Objective, optimizer, batch: Batch, t: Features | None,
               init_term, names: list[str], sums: Tensor, autocast: Callable = nullcontext) -> None:
    """One optimisation step of one run (:func:`_steps`)."""
    _steps(lambda: [student_forward(student, objective, batch)],
           [Member(student, objective, optimizer, init_term, names, sums)], [batch], [t], autocast)


def fused_train_step(fused: nn.Module, members: list[Member], batches: list[Batch], ts: list[Features | None],
                     autocast: Callable = nullcontext, forward: Callable | None = None) -> None:
    """One step of K packed runs whose students are fused into one model (a bound
    :class:`~kdbench.engine.fusion.FusedModel`): one forward pass of the fused model (``forward``:
    e.g. its compiled version) and one backward pass of the sum of the runs' losses, whose
    gradient in member k's slice of a fused tensor is member k's own (:func:`_steps`)."""
    _steps(lambda: (forward or fused)([b.x for b in batches]), members, batches, ts, autocast, fused)


def _steps(forward: Callable, members: list[Member], batches: list[Batch], ts: list, autocast: Callable,
           fused: nn.Module | None = None) -> None:
    """The step — the maths of every training path: the students' forward pass (``forward()``: each
    member's Features), each run's weighted loss terms (their sum is its loss), ``zero_grad``, one
    backward pass of the sum of the losses, then each run's optimizer step and its loss terms and
    correct predictions added to its device-resident sums (no host synchronisation)."""
    with autocast():
        outs = forward()
        terms = [step_loss(s, m.objective, b, t, m.init_term) for s, m, b, t in zip(outs, members, batches, ts)]
        losses = [sum(tm.values()) for tm in terms]
    for m in members:
        m.optimizer.zero_grad(set_to_none=True)
    if fused is not None:
        fused.zero_grad(set_to_none=True)
    sum(losses).backward()
    if fused is not None:
        fused.sync_members([m.student for m in members])  # each member's .grad: its slice of the fused ones
    for m, s, loss, tm, b in zip(members, outs, losses, terms, batches):
        distributed.average_gradients(m.optimizer.params)  # the objective's (DDP: no-op otherwise)
        m.optimizer.step()
        record_step(m.sums, loss, tm, m.names, s.logits, b)


def student_forward(student: nn.Module, objective: Objective, batch: Batch) -> Features:
    """The student's Features of ``batch.x``: one forward pass; with an unlabelled stream and
    ``bn: separate``, one per part (labelled, unlabelled: BN normalises each with its own batch
    statistics and updates its running statistics twice per step), concatenated."""
    if batch.labeled is None or objective.unlabeled["bn"] == "joint":
        return student(batch.x)
    parts = [student(x) for x in batch.x.split([batch.labeled, batch.x.shape[0] - batch.labeled])]
    return _rebuild(parts[0], [torch.cat(ts) for ts in zip(*(p.tensors() for p in parts))])


def epoch_means(sums: Tensor, names: list[str], num_samples: int, epoch: int) -> dict:
    """The epoch's per-sample means of every loss term and its train accuracy: the epoch's one
    host synchronisation (summed over DDP ranks). A non-finite value raises :class:`NonFiniteLoss`."""
    out = (distributed.all_reduce_sum(sums) / num_samples).tolist()
    stats = dict(zip(names, out[:-1]))
    stats["train_acc"] = 100 * out[-1]
    if not all(map(math.isfinite, out)):
        raise NonFiniteLoss(f"non-finite loss in epoch {epoch}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return stats


def topk_hits(logits: Tensor, y: Tensor) -> Tensor:
    """[top-1 hits, top-5 hits] of a batch, as a float64 device tensor (top-k ≤ classes)."""
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(1).sum()]).double()


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` in eval mode."""
    was = model.training
    model.eval()
    sums = torch.zeros(3, device=loader.device, dtype=torch.float64)
    for x, y, _ in loader.batches():
        logits = model(x).logits.float()
        sums += torch.cat([topk_hits(logits, y), nn.functional.cross_entropy(logits, y, reduction="sum").double()[None]])
    model.train(was)
    top1, top5, loss = (distributed.all_reduce_sum(sums) / loader.num_samples).tolist()
    return {"top1": 100 * top1, "top5": 100 * top5, "loss": loss}


def split_features(f: Features, sizes: list[int]) -> list[Features]:
    """Split a batch's Features into consecutive parts of ``sizes`` samples (views, no copies)."""
    pieces = [t.split(sizes, dim=0) for t in f.tensors()]  # per tensor, one piece per part
    return [_rebuild(f, [p[k] for p in pieces]) for k in range(len(sizes))]


def _rebuild(like: Features, flat: list[Tensor]) -> Features:
    """A record shaped like ``like`` from tensors in :meth:`Features.tensors` order."""
    it = iter(flat)
    return like.apply(lambda _: next(it))


class Eager:
    """The plain execution: eager fp32 steps and teacher passes, what a run's steps execute when
    none of its ``execution`` options asks for the fast path. A fast path
    (:class:`kdbench.engine.fast.Runtime`) overrides these methods; the training loop calls only them."""

    cache = None  # the teacher-output cache (fast path only)
    needs_views = False  # whether steps need each batch's augmentation view ids (the cache does)

    def input(self, x: Tensor) -> Tensor:
        """The input batch as the models take it (the fast path may change its memory format)."""
        return x

    def prepare(self, *modules: nn.Module | None) -> None:
        """Put models in the execution's memory format (plain: nothing to do)."""

    def attach_cache(self, teacher, objective, loader) -> None:
        """Use a teacher-output cache where the options ask for one (plain: never)."""

    def autocast(self):
        """The context of forward passes (plain: fp32, nothing)."""
        return nullcontext()

    def compiled(self, module: nn.Module) -> nn.Module:
        """The module as forward passes run it (plain: itself)."""
        return module

    def teacher_forward(self, teacher: nn.Module, x: Tensor) -> Features:
        with self.autocast():
            return self.compiled(teacher)(x)

    @torch.no_grad()
    def teacher_features(self, teacher: nn.Module, parts: list[TeacherInput]) -> list[Features]:
        """The teacher's Features of each part: one forward pass over their concatenated batches
        (eval mode: per-sample outputs do not depend on the batch)."""
        if len(parts) == 1:
            return [self.teacher_forward(teacher, parts[0].x)]
        out = self.teacher_forward(teacher, self.input(torch.cat([p.x for p in parts])))
        return split_features(out, [p.x.shape[0] for p in parts])

    def stepper(self, student: nn.Module, objective: Objective, optimizer, names: list[str], sums: Tensor,
                epoch: int, gen: torch.Generator | None, init_term=None) -> Callable:
        """A function ``step(batch, t)`` taking one :func:`train_step` in ``epoch`` (whose batches
        carry the epoch's generator ``gen``)."""
        step = self.tensor_stepper(student, objective, optimizer, names, sums, epoch, gen, init_term)
        return lambda batch, t: step(batch.x, batch.y, batch.index, t, batch.labeled)

    def tensor_stepper(self, student: nn.Module, objective: Objective, optimizer, names: list[str], sums: Tensor,
                       epoch: int, gen: torch.Generator | None, init_term=None) -> Callable:
        """:meth:`stepper`'s step as a function of tensors, ``step(x, y, index, t, labeled)`` (what
        a CUDA graph captures)."""
        model = self.compiled(student)

        def step(x, y, idx, t, labeled=None):
            train_step(model, objective, optimizer, Batch(x, y, idx, epoch, gen, labeled), t, init_term, names, sums,
                       self.autocast)
        return step

    def fused_stepper(self, fused: nn.Module, members: list[Member], warm: bool) -> Callable:
        """A function ``step(xs, ys, indices, ts)`` running :func:`fused_train_step` for the fused
        runs' ``members`` at their current epochs and stages (``pack.py`` makes a new one whenever
        a run's epoch, stage or membership changes). ``warm``: a CUDA graph of this fused model was
        captured before (fast path only)."""
        forward = self.compiled(fused)

        def step(xs, ys, idxs, ts):
            batches = [Batch(x, y, i, m.epoch, m.generator) for x, y, i, m in zip(xs, ys, idxs, members)]
            fused_train_step(fused, members, batches, ts, self.autocast, forward)
        return step
