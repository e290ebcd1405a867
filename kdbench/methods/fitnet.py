"""FitNet (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", arXiv 1412.6550), as RepDistiller runs it.

FitNets' hint loss, Eq. (3): L_HT = ½‖u_h(x) − r(v_g(x))‖², with u_h the teacher's hint layer,
v_g the student's guided layer and r a convolutional regressor. RepDistiller (``HintLoss``) uses

    L_hint = mean over (batch, C, H, W) of (ConvReg(f_s) − f_t)²      (``nn.MSELoss``)

on ``feat[hint_layer]`` = ``stages[hint_layer]`` (default 2), trained jointly with CE in a single
stage: ``-r 1 -a 0 -b 100``. The regressor is :class:`~kdbench.methods.adapters.ConvReg`
(conv/convT chosen from the shapes, then BN and ReLU) and trains with the student.

Choices where the sources are silent or differ:
- ``hint_epochs`` > 0 adds FitNets' stage-1 hint pre-training as an init stage (a known deviation
  of RepDistiller, recipes.md §8 item 9). It optimises the student parameters that the hint layer
  depends on (found by back-propagating from ``stages[hint_layer]`` of one probe batch of size
  ``probe_input``, so no architecture knowledge is needed) plus the regressor, on the same
  mean-squared hint loss (RepDistiller's scaling, not FitNets' ½·sum). The init lr is ``hint_lr``
  (default: the base lr). Default 0 = RepDistiller. The main stage is unchanged by it; to
  approximate FitNets' stage 2 (KD without hints) override the ``fitnet`` weight of
  ``fitnet_kd`` to 0 (FitNets' annealed KD/CE balance is not reproduced).
- "+KD" (``fitnet_kd``) follows the CRD paper's convention ``-r 1 -a 1 -b 100``, KD at T = 4.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.methods.adapters import ConvReg
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


@register_loss("fitnet")
class FitNet(DistillLoss):
    teacher_needs = frozenset({"stages"})

    def __init__(self, ctx: MethodContext, hint_layer: int = 2, hint_epochs: int = 0,
                 hint_lr: float | None = None, probe_input: Sequence[int] = (3, 32, 32)):
        super().__init__(ctx)
        n = min(len(ctx.student.stages), len(ctx.teacher.stages))
        if not -n <= hint_layer < n:
            raise ValueError(f"hint_layer {hint_layer} out of range: student and teacher share {n} stages (0..{n - 1})")
        self.hint_layer = hint_layer % n
        self.regressor = ConvReg(ctx.student.stages[self.hint_layer], ctx.teacher.stages[self.hint_layer])
        self.init_epochs = int(hint_epochs)
        self.hint_lr = hint_lr
        self.probe_input = tuple(probe_input)

    @classmethod
    def init_epochs_for(cls, params: dict) -> int:
        """The hint stage's epochs (its parameter is ``hint_epochs``, not ``init_epochs``)."""
        return int(params.get("hint_epochs", 0))

    def hint_loss(self, s: Features, t: Features) -> Tensor:
        f_s = self.regressor(s.stages[self.hint_layer].float())
        return F.mse_loss(f_s.float(), t.stages[self.hint_layer].detach().float())

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        return self.hint_loss(s, t)

    # --- FitNets stage 1: hint pre-training (only when hint_epochs > 0) ---
    def init_loss(self, s: Features, t: Features, batch: Batch) -> Tensor:
        return self.hint_loss(s, t)

    def init_lr(self, base_lr: float) -> float:
        return base_lr if self.hint_lr is None else float(self.hint_lr)

    def init_parameters(self, student: nn.Module) -> Iterable[nn.Parameter]:
        """The student's parameters up to the hint layer (W_Guided) plus the regressor (W_r)."""
        return guided_parameters(student, self.hint_layer, self.probe_input) + list(self.regressor.parameters())


def guided_parameters(student: nn.Module, stage: int, probe_input: Sequence[int] = (3, 32, 32)) -> list[nn.Parameter]:
    """Trainable student parameters on which ``stages[stage]`` depends (autograd connectivity)."""
    params = [p for p in student.parameters() if p.requires_grad]
    ref = params[0]
    was_training = student.training
    student.eval()  # no BN running-statistics update from the probe
    try:
        with torch.enable_grad():
            out: Features = student(torch.zeros(2, *probe_input, device=ref.device, dtype=ref.dtype))
            grads = torch.autograd.grad(out.stages[stage].sum(), params, allow_unused=True)
    finally:
        student.train(was_training)
    return [p for p, g in zip(params, grads) if g is not None]


_PAPER = "Romero et al. 2015, arXiv 1412.6550"
register_method("fitnet", ce=1.0, terms={"fitnet": 100.0}, params={"fitnet": {"hint_layer": 2}}, paper=_PAPER,
                doc="RepDistiller -r 1 -a 0 -b 100 --hint_layer 2: single stage, ConvReg regressor, no hint pre-training.")
register_method("fitnet_kd", ce=1.0, terms={"kd": 1.0, "fitnet": 100.0},
                params={"kd": {"T": 4.0}, "fitnet": {"hint_layer": 2}}, paper=_PAPER,
                doc="FitNet+KD: RepDistiller -r 1 -a 1 -b 100 (the CRD paper's '+KD' convention), T = 4.")
