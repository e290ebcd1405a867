"""DKD (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, "Decoupled Knowledge Distillation").

The KD loss is split (paper §3.1, KD = TCKD + (1 − p_gt^T)·NCKD) into target-class and non-target-class parts:

    b = [p_gt, 1 - p_gt]                       binary target/non-target probabilities
    p̂_i = softmax over the non-target classes  (p_i / (1 - p_gt), i ≠ gt)
    TCKD = KL(b_T || b_S),   NCKD = KL(p̂_T || p̂_S)
    L_DKD = w(epoch) · T² · (α·TCKD + β·NCKD),  averaged over the batch,

all probabilities at temperature T. As in mdistiller's ``DKD.py`` (the authors' code, which
produced the paper's CIFAR-100 numbers) the non-target distribution is a softmax of the
logits with the ground-truth logit shifted by -1000, the loss is scaled by T², and it is
ramped in linearly over ``warmup`` epochs: w = min(epoch / warmup, 1) with 1-based epochs
(``batch.epoch``), so the first epoch already has weight 1/warmup.
One departure, in float32 only: the student's log [p_gt, 1 − p_gt] is taken from log-sum-exps
(:func:`_log_binary`), not as ``torch.log`` of the summed probabilities, the same value where
mdistiller's is finite and finite where its probabilities underflow to 0 (then its loss is NaN).

Defaults (mdistiller ``CFG.DKD``): α = 1, T = 4, warmup = 20, CE weight 1, and β per
teacher→student pair as mdistiller's CIFAR-100 YAMLs (``configs/cifar100/dkd/*.yaml``,
:data:`PAIR_BETA`): 2 for resnet56→resnet20 and resnet110→resnet32; 6 for vgg13→vgg8,
vgg13→MobileNetV2, wrn_40_2→wrn_16_2 and wrn_40_2→wrn_40_1; 8 (``CFG.DKD.BETA``) for every other
pair, including pairs mdistiller never ran. ``beta`` (a number) overrides the table, e.g. a
suite's ``params: {dkd: {beta: 0.5}}`` for mdistiller's ImageNet setting (β 0.5, T 1, warmup 1).
The β a run used is recorded in its metrics.json (``used``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.core.features import Features
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


#: mdistiller's CIFAR-100 β per (teacher, student) in kdbench's model names; other pairs: DEFAULT_BETA
PAIR_BETA = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0,
             ("vgg13", "vgg8"): 6.0, ("vgg13", "MobileNetV2"): 6.0,
             ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0}
DEFAULT_BETA = 8.0


def _log_binary(z: Tensor, gt: Tensor) -> Tensor:
    """[log p_gt, log(1 − p_gt)] of softmax(z), [B, 2], from log-sum-exps: the log of mdistiller's
    [p_gt, Σ_{i≠gt} p_i], but finite where a probability underflows to 0 in float32 (a logit gap
    above ~100 at T = 4), where mdistiller's ``torch.log`` gives −inf and the loss NaN."""
    lse = torch.logsumexp(z, dim=1)
    rest = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1)
    return torch.stack([z[gt] - lse, rest - lse], dim=1)


def dkd_loss(logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float, beta: float,
             T: float) -> Tensor:
    """α·TCKD + β·NCKD (each T²·KL, summed over classes, averaged over the batch)."""
    z_s, z_t = logits_s.float() / T, logits_t.float() / T
    gt = F.one_hot(target, z_s.shape[1]).bool()
    p_t = F.softmax(z_t, dim=1)
    b_t = torch.stack([p_t[gt], (p_t * ~gt).sum(1)], dim=1)  # [B, 2]
    tckd = F.kl_div(_log_binary(z_s, gt), b_t, reduction="batchmean")
    shift = 1000.0 * gt  # removes the ground-truth class from both softmaxes
    nckd = F.kl_div(F.log_softmax(z_s - shift, dim=1), F.softmax(z_t - shift, dim=1), reduction="batchmean")
    return (alpha * tckd + beta * nckd) * (T * T)


@register_loss("dkd")
class DKD(DistillLoss):
    teacher_needs = frozenset({"logits"})
    needs_labels = True  # the target class splits the logits

    def __init__(self, ctx: MethodContext, alpha: float = 1.0, beta: float | None = None, T: float = 4.0,
                 warmup: int = 20):
        """``beta``: None = mdistiller's value for the (teacher, student) pair (:data:`PAIR_BETA`)."""
        super().__init__(ctx)
        if beta is None:
            beta = PAIR_BETA.get((ctx.teacher_arch, ctx.student_arch), DEFAULT_BETA)
        self.alpha, self.beta, self.T, self.warmup = float(alpha), float(beta), float(T), int(warmup)

    def used_params(self) -> dict:
        return {"beta": self.beta}

    def warmup_weight(self, epoch: int) -> float:
        return 1.0 if self.warmup <= 0 else min(epoch / self.warmup, 1.0)

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        loss = dkd_loss(s.logits, t.logits.detach(), batch.y, self.alpha, self.beta, self.T)
        return self.warmup_weight(batch.epoch) * loss


register_method("dkd", ce=1.0, terms={"dkd": 1.0},
                params={"dkd": {"alpha": 1.0, "T": 4.0, "warmup": 20}},
                paper="Zhao et al. CVPR 2022, arXiv 2203.08679",
                doc="mdistiller CIFAR-100 defaults: CE 1 + DKD(α 1, T 4, 20-epoch linear warm-up) with "
                    "mdistiller's per-pair β (2 / 6, else 8); params dkd.beta overrides it.")
