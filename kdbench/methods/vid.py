"""VID — variational information distillation (Ahn et al. 2019, "Variational Information
Distillation for Knowledge Transfer", CVPR 2019, arXiv 1904.05835), as RepDistiller's ``VIDLoss``
(code from the authors) computes it.

VID maximises a variational lower bound on I(t; s) with a Gaussian q(t | s) whose mean μ(s) is a
regressor on the student map and whose variance is per teacher channel (heteroscedastic over
channels, shared over positions): σ_c² = softplus(α_c) + ε. Its negative log-likelihood per
position, dropping the constant, is ½·((t − μ(s))²/σ_c² + log σ_c²). Per paired layer j:

    L_j = mean over (batch, C_t, H, W) of ½·((t − μ_j(s))²/σ_c² + log σ_c²),   L_VID = Σ_j L_j

on ``feat[1:-1]`` = ``stages[1:]`` (paired from the first, as ``zip`` does), weight β = 1
(``-r 1 -a 0 -b 1``). μ_j = conv1×1(C_s→m) – ReLU – conv1×1(m→m) – ReLU – conv1×1(m→C_t), no
biases, with m = C_t as RepDistiller builds it (``VIDLoss(s, t, t)``); α_c is initialised so
that σ_c² = ``init_var`` = 5.0. Where spatial sizes differ, the larger map is adaptive-average-
pooled to the smaller one before the regressor. Regressors and α are trained with the student.

Choices: ``mid_channels`` (default None = C_t per layer), ``init_var`` 5.0, ``eps`` 1e-5.
"+KD" (``vid_kd``): ``-r 1 -a 1 -b 1``, KD at T = 4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.methods.adapters import pool_to_smaller
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


class VIDLayer(nn.Module):
    """Gaussian q(t | s) for one layer: regressor mean and per-channel softplus variance."""

    def __init__(self, c_s: int, c_t: int, c_mid: int, init_var: float, eps: float):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(c_s, c_mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_mid, c_mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_mid, c_t, 1, bias=False))
        # softplus(alpha) + eps == init_var at initialisation
        self.alpha = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_var - eps))))
        self.eps = eps

    def variance(self) -> Tensor:
        return F.softplus(self.alpha) + self.eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        mu = self.regressor(f_s).float()
        var = self.variance().float().view(1, -1, 1, 1)
        return (0.5 * ((mu - f_t) ** 2 / var + var.log())).mean()


@register_loss("vid")
class VID(DistillLoss):
    teacher_needs = frozenset({"stages"})

    def __init__(self, ctx: MethodContext, init_var: float = 5.0, eps: float = 1e-5, mid_channels: int | None = None):
        super().__init__(ctx)
        pairs = list(zip(ctx.student.stages[1:], ctx.teacher.stages[1:]))
        if not pairs:
            raise ValueError("VID needs at least one stage output after the stem (stages[1:])")
        self.layers = nn.ModuleList(
            VIDLayer(int(s[0]), int(t[0]), mid_channels or int(t[0]), init_var, eps) for s, t in pairs)

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        return sum(layer(f_s.float(), f_t.detach().float())
                   for layer, f_s, f_t in zip(self.layers, s.stages[1:], t.stages[1:]))


_PAPER = "Ahn et al. 2019, arXiv 1904.05835"
register_method("vid", ce=1.0, terms={"vid": 1.0}, params={"vid": {"init_var": 5.0}}, paper=_PAPER,
                doc="RepDistiller -r 1 -a 0 -b 1, per-stage 1×1-conv regressors on stages[1:], initial variance 5.0.")
register_method("vid_kd", ce=1.0, terms={"kd": 1.0, "vid": 1.0}, params={"kd": {"T": 4.0}, "vid": {"init_var": 5.0}},
                paper=_PAPER, doc="VID+KD: RepDistiller -r 1 -a 1 -b 1 (the CRD paper's '+KD' convention), T = 4.")
