"""AB, activation-boundary transfer (Heo, Lee, Yun & Choi, AAAI 2019, "Knowledge Transfer via
Distillation of Activation Boundaries Formed by Hidden Neurons").

The student's pre-activations r(S) (through a connector r) learn the teacher's activation
pattern ρ(T) = [T > 0] with the paper's margin ("alternative", hinge-like) loss, margin μ:

    L = Σ (r(S) − μ)² · [r(S) ≤ μ] · [T > 0]  +  (r(S) + μ)² · [r(S) > −μ] · [T ≤ 0]

As in RepDistiller (``distiller_zoo/AB.py``, ``models/util.py`` Connector, ``train_student.py``,
``helper/pretrain.py``):
- maps are the *pre-activation* stage outputs ``preact[1:]`` (RepDistiller ``feat[1:-1]`` with
  ``preact=True``); the connector is the identity where channels and height agree, else
  ConvReg without ReLU (conv — 1×1 at equal size — then BN);
- margin μ = 1; layer i of n is weighted 2^(i−n+1) (the deepest 1, halving towards the input);
  each layer's sum is divided by the batch size and multiplied by 3/1000; layers are summed;
- it is an **initialisation stage** only: ``init_epochs`` (30) epochs training the connector
  and the student's feature modules (all but the classifier); the main stage is CE only (the
  term returns 0, RepDistiller's ``-b 1`` multiplies 0). ``main_loss=True`` keeps the AB loss
  in the main stage too;
- module modes in that stage: the student is in eval mode and only the connectors and its
  ``feature_modules()`` (RepDistiller's ``get_feat_modules()``) train. For a WRN student this
  leaves out the final BN that makes the third pre-activation map: it normalises with its
  running statistics, which stay at their initial values.
"""

from __future__ import annotations

import itertools
from typing import Iterable

from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.methods.adapters import ConvReg
from kdbench.methods.base import Batch, InitStageLoss, MethodContext, register_loss, register_method


def margin_loss(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """Σ over all elements of the activation-boundary loss (Eq. 5), not yet averaged."""
    s, t = source.float(), target.float()
    loss = ((s + margin) ** 2 * ((s > -margin) & (t <= 0)).float()
            + (s - margin) ** 2 * ((s <= margin) & (t > 0)).float())
    return loss.sum()


def ab_loss(g_s: list[Tensor], g_t: list[Tensor], margin: float = 1.0) -> Tensor:
    n, bsz = len(g_s), g_s[0].shape[0]
    return sum(2.0 ** (i - n + 1) * margin_loss(s, t, margin) / bsz * 3 / 1000
               for i, (s, t) in enumerate(zip(g_s, g_t)))


@register_loss("ab")
class AB(InitStageLoss):
    teacher_needs = frozenset({"preact"})

    def __init__(self, ctx: MethodContext, margin: float = 1.0, init_epochs: int = 30,
                 main_loss: bool = False):
        super().__init__(ctx)
        s_shapes, t_shapes = ctx.student.preact[1:], ctx.teacher.preact[1:]
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"AB pairs stage pre-activations one to one, but the student has {len(s_shapes)} "
                             f"stages {[tuple(x) for x in s_shapes]} and the teacher {len(t_shapes)} "
                             f"{[tuple(x) for x in t_shapes]}")
        self.connectors = nn.ModuleList(
            nn.Identity() if (s[0], s[1]) == (t[0], t[1]) else ConvReg(s, t, use_relu=False)
            for s, t in zip(s_shapes, t_shapes))
        self.margin = float(margin)
        self.init_epochs = int(init_epochs)
        self.main_loss = bool(main_loss)

    def loss(self, s: Features, t: Features) -> Tensor:
        g_s = [c(f.float()) for c, f in zip(self.connectors, s.preact[1:])]
        return ab_loss(g_s, [f.detach() for f in t.preact[1:]], self.margin)

    def init_parameters(self, student: nn.Module) -> Iterable[nn.Parameter]:
        return itertools.chain(self.connectors.parameters(), student.feature_modules().parameters())

    def init_train_modules(self, student: nn.Module) -> list[nn.Module]:
        return [self.connectors, student.feature_modules()]

    def init_loss(self, s: Features, t: Features, batch: Batch) -> Tensor:
        return self.loss(s, t)


register_method("ab", ce=1.0, terms={"ab": 1.0}, params={"ab": {"init_epochs": 30}},
                paper="Heo et al. AAAI 2019, arXiv 1811.03233",
                doc="RepDistiller -a 0 -b 1: 30 init epochs on the activation-boundary loss "
                    "(connector + student feature modules), then CE only (main-stage AB term is 0).")
register_method("ab_kd", ce=1.0, terms={"kd": 1.0, "ab": 1.0},
                params={"kd": {"T": 4.0}, "ab": {"init_epochs": 30}},
                paper="Heo et al. AAAI 2019, arXiv 1811.03233",
                doc="AB init stage, then RepDistiller's '+KD' convention -r 1 -a 1: CE + KD(T 4).")
