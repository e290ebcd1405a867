"""RKD — relational knowledge distillation (Park et al. 2019, "Relational Knowledge
Distillation", CVPR 2019, arXiv 1904.05068), as RepDistiller's ``RKDLoss`` computes it.

On the pooled penultimate features (``feat[-1]`` = ``pooled``) of a batch x_1..x_b:

- distance-wise potential ψ_D(x_i, x_j) = ‖x_i − x_j‖₂ / μ, with μ the mean distance over the
  b(b−1) pairs i ≠ j (diagonal entries are 0 and excluded from μ);
- angle-wise potential ψ_A(x_i, x_j, x_k) = ⟨e_ij, e_ik⟩ with e_ij = (x_j − x_i)/‖x_j − x_i‖₂,
  over all b³ triplets (degenerate ones, with a zero difference, give 0);
- L_RKD = w_d · huber(ψ_D^s, ψ_D^t) + w_a · huber(ψ_A^s, ψ_A^t), with the Huber (smooth-L1,
  δ = 1) loss averaged over the b² (distance) and b³ (angle) entries, diagonals included.

Weights w_d = 25, w_a = 50 inside the term and β = 1 outside (``-r 1 -a 0 -b 1``); the paper's
own λ_D = 1, λ_A = 2 have the same ratio. Student and teacher dims may differ (only relations
are compared). The teacher side carries no gradient.

Choices: distances are clamped at ``eps`` = 1e-12 before the square root (as RepDistiller) so the
gradient is finite for coincident points; they are computed from explicit differences instead of
RepDistiller's ‖a‖² + ‖b‖² − 2aᵀb expansion (same value, better float32 accuracy). "+KD"
(``rkd_kd``): ``-r 1 -a 1 -b 1``, KD at T = 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.core.features import Features
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


def distance_potential(x: Tensor, eps: float = 1e-12) -> Tensor:
    """ψ_D: b×b Euclidean distances (zero diagonal) divided by their off-diagonal mean."""
    diff = x.unsqueeze(0) - x.unsqueeze(1)
    off_diag = 1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
    d = diff.pow(2).sum(-1).clamp(min=eps).sqrt() * off_diag
    return d / d[off_diag.bool()].mean()


def angle_potential(x: Tensor) -> Tensor:
    """ψ_A: [i, j, k] = cosine of the angle at x_i between x_j and x_k, flattened to b³."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[i, j] = unit(x_j − x_i)
    return torch.bmm(e, e.transpose(1, 2)).flatten()


@register_loss("rkd")
class RKD(DistillLoss):
    teacher_needs = frozenset({"pooled"})

    def __init__(self, ctx: MethodContext, w_d: float = 25.0, w_a: float = 50.0, eps: float = 1e-12):
        super().__init__(ctx)
        self.w_d, self.w_a, self.eps = float(w_d), float(w_a), float(eps)

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        f_s = s.pooled.float().flatten(1)
        f_t = t.pooled.detach().float().flatten(1)
        loss = f_s.new_zeros(())
        if self.w_d:
            loss = loss + self.w_d * F.smooth_l1_loss(distance_potential(f_s, self.eps), distance_potential(f_t, self.eps))
        if self.w_a:
            loss = loss + self.w_a * F.smooth_l1_loss(angle_potential(f_s), angle_potential(f_t))
        return loss


_PAPER = "Park et al. 2019, arXiv 1904.05068"
register_method("rkd", ce=1.0, terms={"rkd": 1.0}, params={"rkd": {"w_d": 25.0, "w_a": 50.0}}, paper=_PAPER,
                doc="RepDistiller -r 1 -a 0 -b 1, distance weight 25, angle weight 50, on pooled features.")
register_method("rkd_kd", ce=1.0, terms={"kd": 1.0, "rkd": 1.0}, params={"kd": {"T": 4.0}, "rkd": {"w_d": 25.0, "w_a": 50.0}},
                paper=_PAPER, doc="RKD+KD: RepDistiller -r 1 -a 1 -b 1 (the CRD paper's '+KD' convention), T = 4.")
