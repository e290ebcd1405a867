"""SP — similarity-preserving KD (Tung & Mori 2019, "Similarity-Preserving Knowledge
Distillation", ICCV 2019, arXiv 1907.09682), as RepDistiller's ``Similarity`` computes it.

For a batch of b activation maps flattened to Q ∈ R^{b×(C·H·W)}, the paper's loss is

    G = Q Qᵀ (b×b),   G̃[i] = G[i] / ‖G[i]‖₂ (row-wise L2),   L_SP = ‖G̃_T − G̃_S‖²_F / b²

on RepDistiller's ``feat[-2]`` = ``stages[-1]`` (the last stage output) only, weight β = 3000
(``-r 1 -a 0 -b 3000``). Channel counts and spatial sizes may differ freely: only the b×b
similarity matrices are compared.

Choices: the paper sums over several (l, l') layer pairs; RepDistiller uses the last stage
only, and so do we; ``stage`` (an index into ``stages``) can change it. "+KD" (``sp_kd``):
``-r 1 -a 1 -b 3000``, KD at T = 4.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdbench.core.features import Features
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


def similarity_matrix(f: Tensor) -> Tensor:
    """Row-L2-normalised b×b Gram matrix of the per-sample flattened activations."""
    q = f.flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1)


@register_loss("sp")
class SP(DistillLoss):
    teacher_needs = frozenset({"stages"})

    def __init__(self, ctx: MethodContext, stage: int = -1):
        super().__init__(ctx)
        self.stage = stage

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        g_s = similarity_matrix(s.stages[self.stage].float())
        g_t = similarity_matrix(t.stages[self.stage].detach().float())
        b = g_s.shape[0]
        return (g_t - g_s).pow(2).sum() / (b * b)


_PAPER = "Tung & Mori 2019, arXiv 1907.09682"
register_method("sp", ce=1.0, terms={"sp": 3000.0}, paper=_PAPER,
                doc="RepDistiller -r 1 -a 0 -b 3000, on stages[-1] (RepDistiller's feat[-2]).")
register_method("sp_kd", ce=1.0, terms={"kd": 1.0, "sp": 3000.0}, params={"kd": {"T": 4.0}}, paper=_PAPER,
                doc="SP+KD: RepDistiller -r 1 -a 1 -b 3000 (the CRD paper's '+KD' convention), T = 4.")
