"""KD (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network") and the
plain student.

    L_KD = T² · KL( softmax(z_t / T) || softmax(z_s / T) ),  averaged over the batch

The T² factor keeps the gradient scale independent of T (the paper, §2.1); RepDistiller's
``DistillKL`` computes exactly this (sum over classes and batch, divided by the batch size).
Defaults follow RepDistiller's CIFAR-100 scripts: T = 4, loss = 0.1·CE + 0.9·L_KD.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..models.features import Features
from .base import Batch, DistillLoss, MethodContext, register_loss, register_method


def kd_loss(logits_s: Tensor, logits_t: Tensor, T: float) -> Tensor:
    log_p_s = F.log_softmax(logits_s.float() / T, dim=1)
    p_t = F.softmax(logits_t.float() / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (T * T)


@register_loss("kd")
class KD(DistillLoss):
    teacher_needs = frozenset({"logits"})

    def __init__(self, ctx: MethodContext, T: float = 4.0):
        super().__init__(ctx)
        self.T = float(T)

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        return kd_loss(s.logits, t.logits, self.T)


register_method("student", ce=1.0, paper="—",
                doc="The student trained from scratch with cross-entropy only (no teacher).")
register_method("kd", ce=0.1, terms={"kd": 0.9}, params={"kd": {"T": 4.0}},
                paper="Hinton et al. 2015, arXiv 1503.02531",
                doc="RepDistiller -r 0.1 -a 0.9 -b 0, T = 4.")
