"""FT, factor transfer (Kim, Park & Kwak, NeurIPS 2018, "Paraphrasing Complex Network:
Network Compression via Factor Transfer").

A *paraphraser* (convolutional auto-encoder, compression rate k) is first trained to
reconstruct the teacher's last feature map (the paper's reconstruction loss); its encoder
output is the teacher factor F_T. A *translator* on the student's last map gives F_S, and the
student is trained with the FT loss  β·|| F_T/||F_T||₂ − F_S/||F_S||₂ ||_p (p = 1) plus CE.

As in RepDistiller (``models/util.py`` Paraphraser/Translator, ``distiller_zoo/FT.py``,
``helper/pretrain.py``), which produced the CRD-table numbers:
- features are ``stages[-1]`` (RepDistiller ``feat[-2]``, post-ReLU) of both networks;
- Paraphraser(k=0.5): 3 conv3×3 then 3 transposed conv3×3, LeakyReLU(0.1), no BN, C_t → k·C_t
  → C_t; Translator: 3 conv3×3 + BN + LeakyReLU(0.1), C_s → k·C_t;
- init stage: ``init_epochs`` (30) epochs training the paraphraser alone with MSE
  reconstruction. Its lr is RepDistiller's rule by student family (``helper/pretrain.py``):
  0.01 for the resnet and wrn students (``resnet8`` … ``resnet110``, ``resnet8x4``,
  ``resnet32x4``, ``wrn_*``), the student's base lr for every other student (RepDistiller's
  recipe: 0.05 for vgg and ResNet50, 0.01 for MobileNetV2 and the ShuffleNets). ``init_lr`` (a
  number) overrides the rule;
- in that stage the student and the translator are in eval mode (RepDistiller runs
  ``model_s.eval()`` and trains only the paraphraser): the student's BN running statistics do not
  move before the main stage;
- main stage: the paraphraser is frozen (no gradient, eval mode) and the loss is RepDistiller's
  ``factor_loss``, which differs from the paper's FT loss: maps are average-pooled to the smaller
  spatial size, each factor is collapsed over channels φ(F) = L2normalise(mean_c F^p1) (p1 = 2,
  an attention map rather than the whole factor), and the loss is mean |φ_S − φ_T|^p2 (p2 = 1)
  over batch and positions. Weights: ``-a 0 -b 200``.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.methods.adapters import pool_to_smaller
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method

#: RepDistiller's paraphraser lr for the resnet/wrn students (CIFAR ``resnet*`` and ``wrn_*``
#: names; its list holds exactly the zoo's names with these prefixes), the base lr otherwise
PARAPHRASER_LR, PARAPHRASER_LR_FAMILIES = 0.01, ("resnet", "wrn_")


def _conv_stack(channels: list[int], transposed: bool = False, use_bn: bool = False) -> nn.Sequential:
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1)] + ([nn.BatchNorm2d(c_out)] if use_bn else [])
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Auto-encoder on the teacher map: encoder C→C→kC→kC, decoder kC→kC→C→C."""

    def __init__(self, t_channels: int, k: float = 0.5, use_bn: bool = False):
        super().__init__()
        c, f = t_channels, int(t_channels * k)
        self.encoder = _conv_stack([c, c, f, f], use_bn=use_bn)
        self.decoder = _conv_stack([f, f, c, c], transposed=True, use_bn=use_bn)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Sequential):
    """Student-side encoder C_s→C_s→kC_t→kC_t with BN."""

    def __init__(self, s_channels: int, t_channels: int, k: float = 0.5, use_bn: bool = True):
        f = int(t_channels * k)
        super().__init__(*_conv_stack([s_channels, s_channels, f, f], use_bn=use_bn))


def factor_loss(factor_s: Tensor, factor_t: Tensor, p1: float = 2.0, p2: float = 1.0) -> Tensor:
    f_s, f_t = pool_to_smaller(factor_s.float(), factor_t.float())
    phi_s = F.normalize(f_s.pow(p1).mean(1).flatten(1), dim=1)
    phi_t = F.normalize(f_t.pow(p1).mean(1).flatten(1), dim=1)
    return (phi_s - phi_t).abs().pow(p2).mean()


@register_loss("ft")
class FT(DistillLoss):
    teacher_needs = frozenset({"stages"})

    def __init__(self, ctx: MethodContext, k: float = 0.5, p1: float = 2.0, p2: float = 1.0,
                 init_epochs: int = 30, init_lr: float | None = None, paraphraser_bn: bool = False):
        """``init_lr``: the paraphraser's lr; None = RepDistiller's rule for ``ctx.student_arch``."""
        super().__init__(ctx)
        c_s, c_t = ctx.student.stages[-1][0], ctx.teacher.stages[-1][0]
        self.paraphraser = Paraphraser(c_t, k, use_bn=paraphraser_bn)
        self.translator = Translator(c_s, c_t, k)
        self.p1, self.p2 = float(p1), float(p2)
        self.init_epochs = int(init_epochs)
        self.paraphraser_lr = None if init_lr is None else float(init_lr)
        self.student_arch = ctx.student_arch

    # --- stage 1: paraphraser reconstruction ---
    def init_parameters(self, student: nn.Module) -> Iterable[nn.Parameter]:
        return self.paraphraser.parameters()

    def init_lr(self, base_lr: float) -> float:
        if self.paraphraser_lr is not None:
            return self.paraphraser_lr
        return PARAPHRASER_LR if self.student_arch.startswith(PARAPHRASER_LR_FAMILIES) else base_lr

    def init_train_modules(self, student: nn.Module) -> list[nn.Module]:
        return [self.paraphraser]

    def init_loss(self, s: Features, t: Features, batch: Batch) -> Tensor:
        f_t = t.stages[-1].detach().float()
        _, rec = self.paraphraser(f_t)
        return F.mse_loss(rec.float(), f_t)

    # --- stage 2: factor transfer through the frozen paraphraser ---
    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        self.paraphraser.eval()
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(t.stages[-1].float())
        factor_s = self.translator(s.stages[-1].float())
        return factor_loss(factor_s, factor_t, self.p1, self.p2)


register_method("ft", ce=1.0, terms={"ft": 200.0}, params={"ft": {"init_epochs": 30}},
                paper="Kim et al. NeurIPS 2018, arXiv 1802.04977",
                doc="RepDistiller -a 0 -b 200: 30 paraphraser epochs (lr 0.01 for resnet/wrn students, "
                    "the base lr otherwise, RepDistiller's rule), then CE + 200·factor loss.")
register_method("ft_kd", ce=1.0, terms={"kd": 1.0, "ft": 200.0},
                params={"kd": {"T": 4.0}, "ft": {"init_epochs": 30}},
                paper="Kim et al. NeurIPS 2018, arXiv 1802.04977",
                doc="FT with RepDistiller's '+KD' convention -r 1 -a 1 -b 200 (KD T 4).")
