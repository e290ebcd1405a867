"""AT — attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention",
arXiv 1612.03928), as RepDistiller's ``Attention`` computes it.

Activation-based attention map of a (C, H, W) activation A, the paper's F^p_mean:
Q = vec( (1/C) Σ_c A_c^p ), and the loss of Eq. (2) compares Q/‖Q‖₂ of student and teacher.
RepDistiller, per paired layer j:

    a = L2normalise( mean_c f^p  flattened over H·W )
    L_j = mean over (batch, H·W) of (a_s − a_t)²,        L_AT = Σ_j L_j

on ``feat[1:-1]`` = ``stages[1:]`` (stages paired from the first, as ``zip`` does when the
student and teacher have different numbers of stages), with p = 2 and weight β = 1000
(``-r 1 -a 0 -b 1000``). Where spatial sizes differ the larger map is adaptive-average-pooled
to the smaller one first; channel counts may differ (attention maps are channel-free).

Choices: RepDistiller squares the difference and averages it (the paper writes a p-norm of the
difference with β/2 and per-layer sums); we follow RepDistiller. It raises f to the power p
without an absolute value (the paper uses |A|^p); identical for the even default p = 2, and
kept as RepDistiller for other p. "+KD" (``at_kd``): ``-r 1 -a 1 -b 1000``, KD at T = 4.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdbench.core.features import Features
from kdbench.methods.adapters import pool_to_smaller
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


def attention_map(f: Tensor, p: float) -> Tensor:
    """L2-normalised spatial attention map, shape [B, H·W]."""
    return F.normalize(f.pow(p).mean(1).flatten(1), p=2, dim=1)


@register_loss("at")
class AT(DistillLoss):
    teacher_needs = frozenset({"stages"})

    def __init__(self, ctx: MethodContext, p: float = 2.0):
        super().__init__(ctx)
        if min(len(ctx.student.stages), len(ctx.teacher.stages)) < 2:
            raise ValueError("AT needs at least one stage output after the stem (stages[1:])")
        self.p = p

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        losses = []
        for f_s, f_t in zip(s.stages[1:], t.stages[1:]):
            f_s, f_t = pool_to_smaller(f_s.float(), f_t.detach().float())
            losses.append((attention_map(f_s, self.p) - attention_map(f_t, self.p)).pow(2).mean())
        return sum(losses)


_PAPER = "Zagoruyko & Komodakis 2017, arXiv 1612.03928"
register_method("at", ce=1.0, terms={"at": 1000.0}, params={"at": {"p": 2.0}}, paper=_PAPER,
                doc="RepDistiller -r 1 -a 0 -b 1000, p = 2, on stages[1:].")
register_method("at_kd", ce=1.0, terms={"kd": 1.0, "at": 1000.0}, params={"kd": {"T": 4.0}, "at": {"p": 2.0}},
                paper=_PAPER, doc="AT+KD: RepDistiller -r 1 -a 1 -b 1000 (the CRD paper's '+KD' convention), T = 4.")
