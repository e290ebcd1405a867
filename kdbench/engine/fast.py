"""How training steps execute: the step's maths (:func:`train_step`, shared by ``fit``, the fast
path and packing) and the execution options of :class:`~kdbench.engine.spec.Execution`.

The plain path is eager fp32. The fast path (``performance.md`` §7–§8) adds, each optional:

- ``precision: bf16`` — the student's and teacher's forward passes under ``torch.autocast``
  (bfloat16); every loss term computes in fp32 (terms call ``.float()``, CRD/KDA disable autocast)
  and the backward pass runs outside autocast. bf16 needs no loss scaling. Hashed (results differ).
- ``channels_last`` — NHWC layout for the models, adapters and input batches (tensor cores want
  it). Not hashed: the same maths.
- ``compile: graph`` (CUDA only) — the whole student step (student forward, losses, backward,
  SGD step with a device-tensor lr, metric accumulation) captured once per epoch as a CUDA
  graph and replayed for every full batch; the teacher's outputs (from its own graph per input
  shape, or from cache lookups) are copied into the step graph's static inputs. Per-epoch capture keeps terms that read ``batch.epoch`` (DKD's
  warm-up weight, KDA's warm-up switch) and per-epoch state (KDA centroids) correct. The last
  partial batch runs eagerly (same maths, another shape). The first capture of a run warms up on
  a side stream for 3 steps and then restores every parameter, buffer, momentum, metric sum and
  generator state, so the warm-up leaves no trace. RNG inside the graph (CRD negatives) comes
  from the epoch's generator, registered with the graph so each replay draws fresh numbers.
  Terms must not synchronise with the host or change Python state per step (none does).
- ``compile: compile`` — ``torch.compile`` of the student and teacher modules (fused kernels;
  the state dicts stay those of the original modules). Minutes of compilation per architecture.

``compile`` modes are not hashed: the maths is identical, only kernel fusion and summation order
differ (like cuDNN's algorithm choice). What stays eager everywhere: data order and augmentation
(a handful of kernels per batch on the device-resident dataset), the per-epoch evaluation (fp32,
so bf16 runs are evaluated in fp32), checkpoints.

The teacher's outputs for a step are asked for with a :class:`TeacherRequest` that the epoch
loop yields; :meth:`Runtime.teacher_features` answers it with one forward pass (or a cache
lookup) — for one run, or for the concatenated batches of several packed runs (``pack.py``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..methods import Batch, Objective
from ..models.features import Features
from . import distributed
from .spec import Execution


@dataclass
class TeacherRequest:
    """One step's need for the teacher's Features, answered by the driver of the epoch loop."""

    x: Tensor  # the step's input batch, as the student sees it
    index: Tensor  # sample positions in the training set
    view: Tensor | None  # augmentation view ids (for the cache), or None
    teacher: nn.Module
    runtime: "Runtime"


@dataclass
class StudentStep:
    """One step of a run whose student is fused with other packed runs' (``pack.py``): the epoch
    loop yields it, and the driver takes the step for all the fused runs at once
    (:func:`fused_train_step`)."""

    teacher: TeacherRequest | None  # the step's teacher request (None: no teacher)
    batch: Batch
    student: nn.Module
    objective: Objective
    optimizer: object
    init_term: object  # the initialisation stage's term, or None in the main stage
    names: list[str]
    sums: Tensor
    runtime: "Runtime"


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


def train_step(student: nn.Module, objective: Objective, optimizer, batch: Batch, t: Features | None,
               init_term, names: list[str], sums: Tensor, autocast: Callable = nullcontext) -> None:
    """One optimisation step — the maths of every training path."""
    with autocast():
        s = student_forward(student, objective, batch)
        terms = step_loss(s, objective, batch, t, init_term)
        loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(optimizer.params)  # the objective's (DDP: no-op otherwise)
    optimizer.step()
    record_step(sums, loss, terms, names, s.logits, batch)


def student_forward(student: nn.Module, objective: Objective, batch: Batch) -> Features:
    """The student's Features of ``batch.x``: one forward pass; with an unlabelled stream and
    ``bn: separate``, one per part (labelled, unlabelled: BN normalises each with its own batch
    statistics and updates its running statistics twice per step), concatenated."""
    if batch.labeled is None or objective.unlabeled["bn"] == "joint":
        return student(batch.x)
    parts = [student(x) for x in batch.x.split([batch.labeled, batch.x.shape[0] - batch.labeled])]
    return _rebuild(parts[0], [torch.cat(ts) for ts in zip(*(p.tensors() for p in parts))])


def fused_train_step(fused: nn.Module, steps: list["StudentStep"], batches: list[Batch], ts: list[Features | None],
                     autocast: Callable = nullcontext, forward: Callable | None = None) -> None:
    """:func:`train_step` for K packed runs whose students are fused into one model (a bound
    :class:`~kdbench.engine.fusion.FusedModel`): one forward and one backward pass of the fused
    model (``forward``: e.g. its compiled version); each run's own loss terms, optimizer step and
    sums. The backward pass is of the sum of the runs' losses, whose gradient in member k's slice
    of a fused tensor is member k's own."""
    with autocast():
        outs = (forward or fused)([b.x for b in batches])
        terms = [step_loss(s, st.objective, b, t, st.init_term) for s, st, b, t in zip(outs, steps, batches, ts)]
        losses = [sum(tm.values()) for tm in terms]
    total = sum(losses)
    for st in steps:
        st.optimizer.zero_grad(set_to_none=True)
    fused.zero_grad(set_to_none=True)
    total.backward()
    fused.sync_members([st.student for st in steps])
    for st, s, loss, tm, b in zip(steps, outs, losses, terms, batches):
        st.optimizer.step()
        record_step(st.sums, loss, tm, st.names, s.logits, b)


def split_features(f: Features, sizes: list[int]) -> list[Features]:
    """Split a batch's Features into consecutive parts of ``sizes`` samples (views, no copies)."""
    pieces = [t.split(sizes, dim=0) for t in f.tensors()]  # per tensor, one piece per part
    return [_rebuild(f, [p[k] for p in pieces]) for k in range(len(sizes))]


def _rebuild(like: Features, flat: list[Tensor]) -> Features:
    """A record shaped like ``like`` from tensors in :meth:`Features.tensors` order."""
    it = iter(flat)
    return like.apply(lambda _: next(it))


class Runtime:
    """The execution options of one run (or of a pack of runs sharing them)."""

    #: the CUDA-graph primitives (None: :class:`CudaGraphs`; tests substitute a CPU stand-in)
    graph_backend = None

    def __init__(self, execution: Execution | None = None, device: torch.device | str = "cpu"):
        self.execution = execution = Execution.from_config(execution)
        self.device = torch.device(device)
        if execution.compile == "graph":
            if self.device.type != "cuda" and type(self).graph_backend is None:
                raise ValueError(f"execution.compile 'graph' (CUDA graphs) needs a CUDA device, not {self.device}; "
                                 f"use 'none' or 'compile' on {self.device.type}")
            if distributed.current().enabled:
                raise ValueError("execution.compile 'graph' is not supported under DDP (torchrun); use 'none' or 'compile'")
        self.graph_backend = type(self).graph_backend or CudaGraphs
        self.cache = None
        self._compiled: dict[int, nn.Module] = {}
        self._warm: set[tuple] = set()
        self._teacher_graphs: dict[tuple, tuple] = {}

    # --- options applied once ---
    @property
    def needs_views(self) -> bool:
        return self.cache is not None

    def autocast(self):
        if self.execution.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=self.execution.compile != "graph")
        return nullcontext()

    def input(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.execution.channels_last else x

    def prepare(self, *modules: nn.Module | None) -> None:
        """Put models and adapters in the chosen memory format (in place; idempotent)."""
        if self.execution.channels_last:
            for m in modules:
                if m is not None:
                    m.to(memory_format=torch.channels_last)

    def compiled(self, module: nn.Module) -> nn.Module:
        """``torch.compile(module)`` under ``compile: compile`` (cached per module), else the module."""
        if self.execution.compile != "compile":
            return module
        if id(module) not in self._compiled:
            self._compiled[id(module)] = torch.compile(module, dynamic=False)
        return self._compiled[id(module)]

    def attach_cache(self, teacher: nn.Module | None, objective: Objective, loader) -> None:
        """Use the exact teacher-output cache if asked for and the method only reads logits/pooled."""
        from .teacher_cache import cacheable, get_cache
        ex = self.execution
        if ex.teacher_cache == "none" or teacher is None or not cacheable(objective.teacher_needs):
            return
        self.cache = get_cache(teacher, loader, ex.precision, ex.teacher_cache, ex.cache_dir,
                               autocast=self.autocast, prepare_input=self.input)

    # --- the teacher ---
    @torch.no_grad()
    def teacher_features(self, teacher: nn.Module, requests: list[TeacherRequest]) -> list[Features]:
        """The teacher's Features for each request: cache lookups, or one forward pass over the
        requests' concatenated batches (eval mode: per-sample outputs do not depend on the batch)."""
        if self.cache is not None:
            return [self.cache.lookup(r.index, r.view) for r in requests]
        x = requests[0].x if len(requests) == 1 else self.input(torch.cat([r.x for r in requests]))
        if self.execution.compile == "graph":
            out = self._teacher_graph(teacher, x)
        else:
            with self.autocast():
                out = self.compiled(teacher)(x)
        return [out] if len(requests) == 1 else split_features(out, [r.x.shape[0] for r in requests])

    def _teacher_graph(self, teacher: nn.Module, x: Tensor) -> Features:
        """The eval-mode teacher's forward as a CUDA graph per input shape (it has no state to
        restore after warm-up). Its outputs are overwritten by the next replay, after every
        step of the current batch has consumed them."""
        key = (id(teacher), tuple(x.shape), x.dtype)
        graphs = self.graph_backend
        if key not in self._teacher_graphs:
            static_x = x.clone()

            def forward():
                with self.autocast():
                    return teacher(static_x)
            with graphs.side_stream():
                for _ in range(2):
                    forward()
            graph = graphs.new_graph()
            out = graphs.capture(graph, forward, state=[], generators=[])
            self._teacher_graphs[key] = (graph, static_x, out)
        graph, static_x, out = self._teacher_graphs[key]
        static_x.copy_(x)
        graphs.replay(graph, out)
        return out

    # --- the student step ---
    def stepper(self, student: nn.Module, objective: Objective, optimizer, names: list[str], sums: Tensor,
                epoch: int, gen: torch.Generator | None, init_term=None) -> Callable:
        """A function ``step(x, y, index, t, labeled=None)`` running :func:`train_step` for this
        epoch (``labeled``: see :attr:`Batch.labeled`)."""
        model = self.compiled(student)

        def eager(x, y, idx, t, labeled=None):
            train_step(model, objective, optimizer, Batch(x, y, idx, epoch, gen, labeled), t, init_term, names, sums,
                       self.autocast)

        if self.execution.compile != "graph":
            return eager
        state = [*student.parameters(), *_captured_state(student, objective, optimizer, sums)]
        key = (id(student), id(optimizer))
        step = GraphStep(eager, state, [gen] if gen is not None else [], warm=key in self._warm,
                         backend=self.graph_backend)
        self._warm.add(key)
        return step

    def fused_stepper(self, fused: nn.Module, steps: list[StudentStep], warm: bool) -> Callable:
        """A function ``step(xs, ys, indices, ts)`` running :func:`fused_train_step` for the fused
        runs ``steps`` at their current epochs and stages (``pack.py`` makes a new one whenever a
        run's epoch, stage or membership changes). ``warm``: a graph of this fused model was
        captured before, so no warm-up steps are needed."""
        forward = self.compiled(fused)

        def eager(xs, ys, idxs, ts):
            batches = [Batch(x, y, i, st.batch.epoch, st.batch.generator) for x, y, i, st in zip(xs, ys, idxs, steps)]
            fused_train_step(fused, steps, batches, ts, self.autocast, forward)

        if self.execution.compile != "graph":
            return eager
        state = [*fused.parameters(), *fused.buffers()]  # the members' parameters are views of these
        for st in steps:
            state += _captured_state(st.student, st.objective, st.optimizer, st.sums)
        gens = [st.batch.generator for st in steps if st.batch.generator is not None]
        return GraphStep(eager, state, gens, warm=warm, backend=self.graph_backend)


def _captured_state(student: nn.Module, objective: Objective, optimizer, sums: Tensor) -> list[Tensor]:
    """What one run's captured step changes besides the student's parameters: the student's
    buffers, the objective's parameters and buffers, the momenta (the optimizer is made
    capturable: its buffers exist from now on) and the metric sums."""
    optimizer.make_capturable()
    return [*student.buffers(), *objective.parameters(), *objective.buffers(),
            *(b for b in optimizer.buffers if b is not None), sums]


class CudaGraphs:
    """The CUDA-graph primitives :class:`GraphStep` and the teacher's graph use."""

    @staticmethod
    @contextmanager
    def side_stream():
        """Warm-up runs on a side stream before a capture (PyTorch's CUDA-graph recipe)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    @staticmethod
    def new_graph():
        return torch.cuda.CUDAGraph()

    @staticmethod
    def capture(graph, fn: Callable, state: list[Tensor], generators: list[torch.Generator]):
        """Record ``fn()`` into ``graph`` (nothing executes) and return its output tensors."""
        for g in generators:
            graph.register_generator_state(g)  # each replay then draws the generator's next numbers
        with torch.cuda.graph(graph):
            return fn()

    @staticmethod
    def replay(graph, out=None) -> None:
        graph.replay()


def _leaves(args) -> list[Tensor]:
    """The tensors of a step's arguments (tensors, Features, None, or lists of those), in order."""
    out: list[Tensor] = []
    for a in args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, Features):
            out.extend(a.tensors())
        elif isinstance(a, (list, tuple)):
            out.extend(_leaves(a))
    return out


def _clone_args(args):
    """A copy of a step's arguments with every tensor cloned (the graph's static inputs)."""
    def one(a):
        if isinstance(a, Tensor):
            return a.clone()
        if isinstance(a, Features):
            return a.apply(torch.clone)
        if isinstance(a, (list, tuple)):
            return [one(b) for b in a]
        return a
    return tuple(one(a) for a in args)


class GraphStep:
    """``fn(*args)`` captured as a CUDA graph on its first call and replayed for every call whose
    tensors have the same shapes; other shapes (the last partial batch) run ``fn`` eagerly.
    ``args``: tensors, Features, None, or lists of those (``x, y, index, t`` for one run; lists of
    them for fused packed runs). ``state``: every tensor a step changes (parameters, buffers,
    momenta, metric sums), restored with the ``generators`` after the warm-up steps so that they
    leave no trace."""

    def __init__(self, fn: Callable, state: list[Tensor], generators: list[torch.Generator], warm: bool,
                 backend=CudaGraphs, warmup_steps: int = 3):
        self.fn, self.state, self.generators = fn, state, generators
        self.warm, self.backend, self.warmup_steps = warm, backend, warmup_steps
        self.graph, self.static, self.shapes = None, None, None

    @staticmethod
    def _shapes(args) -> tuple:
        return tuple(tuple(a.shape) for a in _leaves(args))

    def __call__(self, *args) -> None:
        shapes = self._shapes(args)
        if self.graph is None:
            self._capture(args)
            self.shapes = shapes
        if shapes != self.shapes:
            self.fn(*args)
            return
        for dst, src in zip(_leaves(self.static), _leaves(args), strict=True):
            dst.copy_(src)
        self.backend.replay(self.graph)

    def _capture(self, args) -> None:
        self.static = _clone_args(args)
        if not self.warm:  # lazy initialisations (cuDNN, cuBLAS, autograd streams) before capture
            saved = [s.detach().clone() for s in self.state]
            gen_states = [g.get_state() for g in self.generators]
            with self.backend.side_stream():
                for _ in range(self.warmup_steps):
                    self.fn(*self.static)
            with torch.no_grad():
                for s, v in zip(self.state, saved):
                    s.copy_(v)
            for g, st in zip(self.generators, gen_states):
                g.set_state(st)
        self.graph = self.backend.new_graph()
        self.backend.capture(self.graph, lambda: self.fn(*self.static), self.state, self.generators)
