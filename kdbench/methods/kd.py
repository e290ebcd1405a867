"""KD (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network") and the
plain student.

    L_KD = T² · KL( softmax(z_t / T) || softmax(z_s / T) ),  averaged over the batch

The T² factor keeps the gradient scale independent of T (the paper, §2.1); RepDistiller's
``DistillKL`` computes exactly this (sum over classes and batch, divided by the batch size).
Defaults follow RepDistiller's CIFAR-100 scripts: T = 4, loss = 0.1·CE + 0.9·L_KD.

A teacher *ensemble* of E members (FKD Fig. 4; ``t.members``) gives the target, by ``ensemble``:
- ``"tempered_mean"`` (default; the usual reading of distilling an ensemble):
  the average of the members' tempered softmaxes, (1/E) Σ_e softmax(z_e / T);
- ``"averaged_probs"``: the ensemble's logits log((1/E) Σ_e softmax(z_e)) at temperature T, i.e.
  the averaged probability raised to 1/T and renormalised (kdbench's target before this option).
FKD does not say which it used. With one teacher both are softmax(z_t / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.core.features import Features
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


def kd_loss(logits_s: Tensor, logits_t: Tensor, T: float) -> Tensor:
    return kd_loss_to(logits_s, F.softmax(logits_t.float() / T, dim=1), T)


def kd_loss_to(logits_s: Tensor, p_t: Tensor, T: float) -> Tensor:
    """T²·KL(p_t || softmax(z_s / T)) for a given target distribution ``p_t``."""
    return F.kl_div(F.log_softmax(logits_s.float() / T, dim=1), p_t, reduction="batchmean") * (T * T)


@register_loss("kd")
class KD(DistillLoss):
    teacher_needs = frozenset({"logits"})

    ENSEMBLE = ("tempered_mean", "averaged_probs")

    def __init__(self, ctx: MethodContext, T: float = 4.0, ensemble: str = "tempered_mean"):
        super().__init__(ctx)
        if ensemble not in self.ENSEMBLE:
            raise ValueError(f"KD ensemble={ensemble!r}; valid: {', '.join(self.ENSEMBLE)} (see kdbench/methods/kd.py)")
        self.T, self.ensemble = float(T), ensemble

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        if t.members and self.ensemble == "tempered_mean":
            p_t = torch.stack([F.softmax(m.logits.float() / self.T, dim=1) for m in t.members]).mean(0)
            return kd_loss_to(s.logits, p_t, self.T)
        return kd_loss(s.logits, t.logits, self.T)


register_method("student", ce=1.0, paper="—",
                doc="The student trained from scratch with cross-entropy only (no teacher).")
register_method("kd", ce=0.1, terms={"kd": 0.9}, params={"kd": {"T": 4.0}},
                paper="Hinton et al. 2015, arXiv 1503.02531",
                doc="RepDistiller -r 0.1 -a 0.9 -b 0, T = 4.")
