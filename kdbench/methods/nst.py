"""NST — neuron selectivity transfer (Huang & Wang 2017, "Like What You Like: Knowledge Distill
via Neuron Selectivity Transfer", arXiv 1707.01219), as RepDistiller's ``NSTLoss`` computes it.

Each channel's activation map, flattened over the H·W positions and L2-normalised, is one sample
f^i of that layer's "neuron selectivity" distribution; NST matches the student's and teacher's
distributions with the squared MMD of the paper:

    MMD² = 1/C_T² Σ_{i,i'} k(f_T^i, f_T^i') + 1/C_S² Σ_{j,j'} k(f_S^j, f_S^j') − 2/(C_T C_S) Σ_{i,j} k(f_S^j, f_T^i)

with the polynomial kernel k(a, b) = (aᵀb + c)^d, d = 2, c = 0. As implemented, per paired layer
the MMD² is averaged over the batch, and L_NST sums the layers of ``feat[1:-1]`` = ``stages[1:]``
(paired from the first, as ``zip`` does); weight β = 50 (``-r 1 -a 0 -b 50``). Where spatial
sizes differ, the larger map is adaptive-average-pooled to the smaller one first; channel counts
may differ.

Choices: the teacher-teacher term (constant for the student) is kept so that the value is the
full MMD² (RepDistiller's ``full_loss = True``); ``degree`` and ``c`` are parameters.
"+KD" (``nst_kd``): ``-r 1 -a 1 -b 50``, KD at T = 4.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdbench.core.features import Features
from kdbench.methods.adapters import pool_to_smaller
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


def neuron_selectivity_mmd(f_s: Tensor, f_t: Tensor, degree: float = 2.0, c: float = 0.0) -> Tensor:
    """Batch mean of the polynomial-kernel MMD² between the channel sets of two maps."""
    a = F.normalize(f_s.flatten(2), p=2, dim=2)  # [B, C_S, HW]
    b = F.normalize(f_t.flatten(2), p=2, dim=2)  # [B, C_T, HW]

    def kernel(x: Tensor, y: Tensor) -> Tensor:  # mean over the batch and all channel pairs
        return (x @ y.transpose(1, 2) + c).pow(degree).mean()

    return kernel(b, b) + kernel(a, a) - 2 * kernel(a, b)


@register_loss("nst")
class NST(DistillLoss):
    teacher_needs = frozenset({"stages"})

    def __init__(self, ctx: MethodContext, degree: float = 2.0, c: float = 0.0):
        super().__init__(ctx)
        if min(len(ctx.student.stages), len(ctx.teacher.stages)) < 2:
            raise ValueError("NST needs at least one stage output after the stem (stages[1:])")
        self.degree, self.c = degree, c

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        losses = []
        for f_s, f_t in zip(s.stages[1:], t.stages[1:]):
            f_s, f_t = pool_to_smaller(f_s.float(), f_t.detach().float())
            losses.append(neuron_selectivity_mmd(f_s, f_t, self.degree, self.c))
        return sum(losses)


_PAPER = "Huang & Wang 2017, arXiv 1707.01219"
register_method("nst", ce=1.0, terms={"nst": 50.0}, params={"nst": {"degree": 2.0, "c": 0.0}}, paper=_PAPER,
                doc="RepDistiller -r 1 -a 0 -b 50, polynomial-kernel (d = 2, c = 0) MMD on stages[1:].")
register_method("nst_kd", ce=1.0, terms={"kd": 1.0, "nst": 50.0}, params={"kd": {"T": 4.0}, "nst": {"degree": 2.0, "c": 0.0}},
                paper=_PAPER, doc="NST+KD: RepDistiller -r 1 -a 1 -b 50 (the CRD paper's '+KD' convention), T = 4.")
