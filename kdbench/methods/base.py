"""The method interface: a distillation *term* is a small module; a *method* is a weighted sum.

A term (``DistillLoss``) turns the student's and teacher's :class:`~kdbench.models.Features`
of one batch into an unweighted scalar loss. It may own trainable parameters (adapters,
embeddings, regressors) that the engine optimises with the student, buffers (memory banks,
centroids) that are checkpointed with it, per-epoch hooks, and an optional initialisation
stage run before the main training (RepDistiller's ``init_epochs`` for AB, FT and FSP).

A method (``MethodSpec``) names the weights of the cross-entropy term and of each distillation
term, in RepDistiller's ``gamma·CE + alpha·KD + beta·L_method`` convention: ``KD`` is
``kdbench.methods.kd`` and ``L_method`` any other term. Combinations such as IPOT+CRD+KD are
specs over several registered terms, not new code.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

from kdbench.core.features import Features, FeatureShapes
from kdbench.core.registry import Registry

#: Which fields of the teacher's Features a term reads (used to decide what may be cached).
TEACHER_FIELDS = frozenset({"logits", "pooled", "stages", "preact"})


@dataclass
class MethodContext:
    """What a term may use to build itself: shapes, never architecture names, decide adapters."""

    student: FeatureShapes
    teacher: FeatureShapes | None
    num_classes: int
    #: labels of the training set in dataset order (CRD draws negatives from other classes)
    train_labels: Tensor
    student_arch: str = ""
    teacher_arch: str | None = None

    @property
    def num_train(self) -> int:
        return int(self.train_labels.numel())


@dataclass
class Batch:
    x: Tensor  # augmented, normalised images
    y: Tensor  # labels
    index: Tensor  # positions of the samples in the training set
    epoch: int = 1  # 1-based epoch within the current stage
    generator: torch.Generator | None = None  # per-epoch RNG on x.device for stochastic terms
    #: with an unlabelled stream (``RunSpec.unlabeled``): x, y, index hold the labelled batch's
    #: ``labeled`` samples, then the unlabelled batch (labels −1 where the split has none, index
    #: = positions in that split). None: every sample is labelled.
    labeled: int | None = None

    @property
    def num_labeled(self) -> int:
        return self.x.shape[0] if self.labeled is None else self.labeled

    def part(self, part: slice) -> "Batch":
        return Batch(self.x[part], self.y[part], self.index[part], self.epoch, self.generator, None)


class DistillLoss(nn.Module):
    """Base class of a distillation term. Subclasses document the paper's equation."""

    #: fields of the teacher's Features read by ``forward``
    teacher_needs: frozenset[str] = frozenset({"logits"})
    #: epochs of the initialisation stage (0 = none)
    init_epochs: int = 0
    #: reads ``batch.y`` or ``batch.index`` (labels, or positions in the labelled training set:
    #: CRD's memory bank, DKD's target class, KDA's class centroids), so it cannot run on
    #: unlabelled images (``RunSpec.unlabeled``)
    needs_labels: bool = False

    def __init__(self, ctx: MethodContext):
        super().__init__()
        self.ctx = ctx

    @classmethod
    def needs_for(cls, params: dict) -> frozenset[str]:
        """The teacher fields a term built with ``params`` reads, known before it is built: the
        class value unless a parameter chooses the layer (KDA's ``layer``, OT's ``layers``)."""
        return cls.teacher_needs

    @classmethod
    def init_epochs_for(cls, params: dict) -> int:
        """The initialisation stage's epochs of a term built with ``params``, known before it is
        built: the ``init_epochs`` parameter, or its default in ``__init__`` (AB/FT/FSP: 30)."""
        default = inspect.signature(cls.__init__).parameters.get("init_epochs")
        return int(params.get("init_epochs", cls.init_epochs if default is None else default.default))

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> None:
        """Called after each main-stage training epoch (e.g. to refresh centroids)."""

    # --- optional initialisation stage (AB, FT, FSP) ---
    def init_parameters(self, student: nn.Module) -> Iterable[nn.Parameter]:
        raise NotImplementedError(f"{type(self).__name__} has no initialisation stage")

    def init_loss(self, s: Features, t: Features, batch: Batch) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no initialisation stage")

    def init_lr(self, base_lr: float) -> float:
        return base_lr

    def init_train_modules(self, student: nn.Module) -> list[nn.Module]:
        """The modules in training mode during the initialisation stage; everything else of the
        student and of the objective is in eval mode there (BN layers normalise with, and keep,
        their running statistics), as RepDistiller's ``helper/pretrain.py`` does
        (``model_s.eval()``, then ``init_modules.train()``). Default: the whole student and this
        term (FitNets' hint stage, which RepDistiller does not have)."""
        return [student, self]


class InitStageLoss(DistillLoss):
    """A term whose loss trains an initialisation stage only (RepDistiller's AB and FSP): the
    main-stage term is 0 unless ``main_loss`` keeps ``init_loss`` on there too."""

    main_loss: bool = False

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        if self.main_loss:
            return self.init_loss(s, t, batch)
        return s.logits.new_zeros((), dtype=torch.float32)


LOSSES: Registry[type[DistillLoss]] = Registry("distillation loss")


def register_loss(name: str):
    """Class decorator: ``@register_loss("kd")``."""
    return LOSSES.register(name)


@dataclass(frozen=True)
class MethodSpec:
    """A method = ``ce``·CE + Σ ``terms[name]``·L_name, each term built with ``params[name]``."""

    name: str
    ce: float
    terms: dict[str, float] = field(default_factory=dict)
    params: dict[str, dict] = field(default_factory=dict)
    paper: str = ""
    doc: str = ""

    @property
    def needs_teacher(self) -> bool:
        return bool(self.terms)

    @property
    def teacher_needs(self) -> frozenset[str]:
        """The teacher Features fields the method's terms read with their parameters, known
        before any term is built: what the suite and the engine check early."""
        return frozenset().union(*(LOSSES.get(t).needs_for(self.params.get(t, {})) for t in self.terms))

    def unlabeled_problem(self) -> str | None:
        """Why the method cannot take an unlabelled stream (``RunSpec.unlabeled``), or None."""
        if not self.terms:
            return "it has no distillation term to feed the unlabelled images to"
        for name in self.terms:
            term = LOSSES.get(name)
            if term.needs_labels:
                return f"its term {name!r} reads labels or training-set indices"
            if term.init_epochs_for(self.params.get(name, {})) > 0:
                return f"its term {name!r} has an initialisation stage (trained on the labelled set alone)"
        return None

    def describe(self) -> str:
        parts = [f"{self.ce:g}·CE"] if self.ce else []
        parts += [f"{w:g}·{n}" for n, w in self.terms.items()]
        return " + ".join(parts) or "0"

    def with_overrides(self, overrides: dict | None) -> "MethodSpec":
        """Apply a suite's ``{ce, terms, params}`` overrides (:func:`merge_overrides` over this spec)."""
        if not overrides:
            return self
        try:
            out = merge_overrides({"ce": self.ce, "terms": self.terms, "params": self.params}, overrides)
        except ValueError as e:
            raise ValueError(f"method {self.name!r}: {e}") from None
        return MethodSpec(self.name, float(out["ce"]), out["terms"], out.get("params", {}), self.paper, self.doc)


OVERRIDE_KEYS = ("ce", "terms", "params")


def merge_overrides(*layers: dict | None) -> dict:
    """Method overrides ``{ce, terms, params}`` laid over each other, lowest first (the one merge of
    kdbench: a suite's term_params, its experiments', the method entries, a sweep's values, and a
    registered method under them all): ``ce`` and ``terms`` of a higher layer replace the lower
    one's; ``params`` merge per term and parameter. ``params`` is in the result when some layer
    names a term in it (a bare ``params: {}`` adds nothing). New dicts: no layer is modified."""
    out: dict = {}
    for layer in layers:
        unknown = set(layer or {}) - set(OVERRIDE_KEYS)
        if unknown:
            raise ValueError(f"unknown override keys {sorted(unknown)}; valid: {', '.join(OVERRIDE_KEYS)}")
        for key, value in (layer or {}).items():
            if key != "params":
                out[key] = dict(value) if key == "terms" else value
            elif value:
                params = out.setdefault("params", {})
                for term, p in value.items():
                    params[term] = {**params.get(term, {}), **p}
    return out


METHODS: Registry[MethodSpec] = Registry("method")


def resolve_method(method: str | MethodSpec, overrides: dict | None = None) -> MethodSpec:
    """A registered method (or a given spec) with a suite's overrides applied: what a run trains.
    The planner resolves each run's method once (``kdbench.planning.suite``); the engine resolves
    the same from the run's ``RunSpec.method_overrides``."""
    spec = METHODS.get(method) if isinstance(method, str) else method
    return spec.with_overrides(overrides)


def build_objective(method: str | MethodSpec, ctx: MethodContext, overrides: dict | None = None) -> "Objective":
    return Objective(resolve_method(method, overrides), ctx)


def label_free_methods() -> list[str]:
    """The registered methods that can take an unlabelled stream (``RunSpec.unlabeled``)."""
    return [n for n in METHODS if METHODS.get(n).unlabeled_problem() is None]


def register_method(name: str, *, ce: float, terms: dict[str, float] | None = None,
                    params: dict[str, dict] | None = None, paper: str = "", doc: str = "") -> MethodSpec:
    spec = MethodSpec(name, ce, dict(terms or {}), {k: dict(v) for k, v in (params or {}).items()}, paper, doc)
    METHODS.register(name, spec)
    return spec


class Objective(nn.Module):
    """The training loss of one run: builds each term of a :class:`MethodSpec`.

    With an unlabelled stream (``unlabeled``: the run's resolved ``RunSpec.unlabeled``) a batch holds the labelled samples then the unlabelled ones
    (:attr:`Batch.labeled`): CE reads the labelled part, the terms :meth:`terms_part`."""

    def __init__(self, spec: MethodSpec, ctx: MethodContext, unlabeled: dict | None = None):
        super().__init__()
        self.spec = spec
        self.unlabeled = unlabeled
        for term in spec.params:
            if term not in spec.terms:
                raise ValueError(f"method {spec.name!r}: params given for {term!r}, which is not one of its terms {sorted(spec.terms)}")
        self.terms = nn.ModuleDict({n: LOSSES.get(n)(ctx, **spec.params.get(n, {})) for n in spec.terms})

    @property
    def needs_teacher(self) -> bool:
        return self.spec.needs_teacher

    @property
    def teacher_needs(self) -> frozenset[str]:
        """The built terms' teacher fields (equal to :attr:`MethodSpec.teacher_needs`)."""
        return frozenset().union(*(t.teacher_needs for t in self.terms.values()))

    def init_terms(self) -> list[DistillLoss]:
        return [t for t in self.terms.values() if t.init_epochs > 0]

    def terms_part(self, batch: Batch) -> slice:
        """The samples of ``batch`` the terms read, and so the teacher sees: all of them, or the
        unlabelled part with an unlabelled stream and ``terms_on: unlabeled``."""
        if batch.labeled is None or self.unlabeled["terms_on"] == "all":
            return slice(None)
        return slice(batch.labeled, None)

    def forward(self, s: Features, t: Features | None, batch: Batch) -> dict[str, Tensor]:
        """Weighted terms by name; the training loss is their sum. ``t``: the teacher's Features
        of the :meth:`terms_part` of the batch."""
        out: dict[str, Tensor] = {}
        if self.spec.ce:
            n = batch.labeled
            out["ce"] = self.spec.ce * nn.functional.cross_entropy(s.logits[:n].float(), batch.y[:n])
        part = self.terms_part(batch)
        if part != slice(None):
            s, batch = s.apply(lambda v: v[part]), batch.part(part)
        for name, term in self.terms.items():
            out[name] = self.spec.terms[name] * term(s, t, batch)
        return out

    def on_epoch_end(self, epoch: int) -> None:
        for term in self.terms.values():
            term.on_epoch_end(epoch)

    def extra_repr(self) -> str:
        return f"loss = {self.spec.describe()}"
