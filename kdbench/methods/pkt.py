"""PKT — probabilistic knowledge transfer (Passalis & Tefas 2018, "Learning Deep Representations
with Probabilistic Knowledge Transfer", ECCV 2018, arXiv 1803.10837), as RepDistiller's ``PKT``
(code from the authors) computes it.

PKT models the pairwise-similarity distribution of a batch with the cosine kernel
K(a, b) = ½(aᵀb / (‖a‖‖b‖) + 1) ∈ [0, 1], turns it into conditional probabilities
p_{j|i} = K(x_i, x_j) / Σ_k K(x_i, x_k) and minimises KL(P_t ‖ P_s). As implemented:

    x̂ = x / (‖x‖₂ + ε)  (NaN → 0),   K = (x̂ x̂ᵀ + 1)/2,   P = K / rowsum(K)
    L_PKT = mean over the b² entries of P_t · log((P_t + ε) / (P_s + ε)),   ε = 1e-7

on ``feat[-1]`` = ``pooled``, weight β = 30000 (``-r 1 -a 0 -b 30000``). Student and teacher dims
may differ.

Choices (following the authors' code, not the paper's text): the self-similarity k = i is kept
in the row normalisation and in the sum, and the KL is averaged over all b² entries rather than
summed. "+KD" (``pkt_kd``): ``-r 1 -a 1 -b 30000``, KD at T = 4.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdbench.core.features import Features
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


def cosine_conditional_probabilities(x: Tensor, eps: float) -> Tensor:
    x = x / (x.norm(p=2, dim=1, keepdim=True) + eps)
    x = x.masked_fill(torch.isnan(x), 0.0)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


@register_loss("pkt")
class PKT(DistillLoss):
    teacher_needs = frozenset({"pooled"})

    def __init__(self, ctx: MethodContext, eps: float = 1e-7):
        super().__init__(ctx)
        self.eps = float(eps)

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        p_s = cosine_conditional_probabilities(s.pooled.float().flatten(1), self.eps)
        p_t = cosine_conditional_probabilities(t.pooled.detach().float().flatten(1), self.eps)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


_PAPER = "Passalis & Tefas 2018, arXiv 1803.10837"
register_method("pkt", ce=1.0, terms={"pkt": 30000.0}, params={"pkt": {"eps": 1e-7}}, paper=_PAPER,
                doc="RepDistiller -r 1 -a 0 -b 30000, cosine-kernel conditional probabilities on pooled features.")
register_method("pkt_kd", ce=1.0, terms={"kd": 1.0, "pkt": 30000.0}, params={"kd": {"T": 4.0}, "pkt": {"eps": 1e-7}},
                paper=_PAPER, doc="PKT+KD: RepDistiller -r 1 -a 1 -b 30000 (the CRD paper's '+KD' convention), T = 4.")
