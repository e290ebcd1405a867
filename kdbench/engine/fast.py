"""How training steps execute: the execution options of :class:`~kdbench.core.spec.Execution`
around the step's maths (:mod:`kdbench.engine.step`, shared by every path).

The plain path is eager fp32 (:class:`~kdbench.engine.step.Eager`; :func:`execution_for` picks it
when no option below is set). The fast path (``performance.md`` §7–§8) adds, each optional:

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

:class:`Runtime` is a :class:`~kdbench.engine.step.Eager` whose methods apply these options: the
training loop (:mod:`kdbench.engine.run`) asks it for each epoch's step function
(:meth:`Runtime.stepper`: eager, compiled or a CUDA graph around the same
:func:`~kdbench.engine.step.train_step`) and for the teacher's outputs
(:meth:`Runtime.teacher_features`: a forward pass, its graph, or cache lookups; for one run or the
concatenated batches of several packed runs).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor, nn

from kdbench.methods import Objective
from kdbench.core.features import Features
from kdbench.core.spec import Execution
from kdbench.engine.step import Eager, Member, TeacherInput

#: the options that make a run's steps take the fast path (:func:`execution_for`)
FAST_OPTIONS = ("precision", "channels_last", "compile", "teacher_cache")


def execution_for(options: Execution, device: torch.device | str) -> Eager:
    """How a run's steps execute: :class:`~kdbench.engine.step.Eager` (the plain path) unless one
    of :data:`FAST_OPTIONS` differs from its default, then a :class:`Runtime` of ``options``."""
    plain = Execution()
    if all(getattr(options, k) == getattr(plain, k) for k in FAST_OPTIONS):
        return Eager()
    return Runtime(options, device)


class Runtime(Eager):
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
        return super().autocast()

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
        from kdbench.engine.teacher_cache import cacheable, get_cache
        ex = self.execution
        if ex.teacher_cache == "none" or teacher is None or not cacheable(objective.teacher_needs):
            return
        self.cache = get_cache(teacher, loader, ex.precision, ex.teacher_cache, ex.cache_dir,
                               autocast=self.autocast, prepare_input=self.input)

    # --- the teacher ---
    @torch.no_grad()
    def teacher_features(self, teacher: nn.Module, parts: list[TeacherInput]) -> list[Features]:
        """The teacher's Features of each part: cache lookups, or one forward pass over the parts'
        concatenated batches (:meth:`Eager.teacher_features`)."""
        if self.cache is not None:
            return [self.cache.lookup(p.index, p.view) for p in parts]
        return super().teacher_features(teacher, parts)

    def teacher_forward(self, teacher: nn.Module, x: Tensor) -> Features:
        if self.execution.compile == "graph":
            return self._teacher_graph(teacher, x)
        return super().teacher_forward(teacher, x)

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
        """:meth:`Eager.stepper` (the model compiled under ``compile: compile``), or under ``compile:
        graph`` a replay of the epoch's CUDA graph of it."""
        if self.execution.compile != "graph":
            return super().stepper(student, objective, optimizer, names, sums, epoch, gen, init_term)
        eager = self.tensor_stepper(student, objective, optimizer, names, sums, epoch, gen, init_term)
        state = [*student.parameters(), *_captured_state(student, objective, optimizer, sums)]
        key = (id(student), id(optimizer))
        graph = GraphStep(eager, state, [gen] if gen is not None else [], warm=key in self._warm,
                          backend=self.graph_backend)
        self._warm.add(key)
        return lambda batch, t: graph(batch.x, batch.y, batch.index, t, batch.labeled)

    def fused_stepper(self, fused: nn.Module, members: list[Member], warm: bool) -> Callable:
        """:meth:`Eager.fused_stepper` (the fused model compiled under ``compile: compile``), or
        under ``compile: graph`` a CUDA graph of it; ``warm``: a graph of this fused model was
        captured before, so no warm-up steps are needed."""
        eager = super().fused_stepper(fused, members, warm)
        if self.execution.compile != "graph":
            return eager
        state = [*fused.parameters(), *fused.buffers()]  # the members' parameters are views of these
        for m in members:
            state += _captured_state(m.student, m.objective, m.optimizer, m.sums)
        gens = [m.generator for m in members if m.generator is not None]
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
