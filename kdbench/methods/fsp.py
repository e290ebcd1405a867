"""FSP (Yim, Joo, Bae & Kim, CVPR 2017, "A Gift from Knowledge Distillation: Fast
Optimization, Network Minimization and Transfer Learning").

The "flow of solution procedure" between two feature maps F1 [h×w×m] and F2 [h×w×n] is
(paper Eq. 1)  G_ij = Σ_{s,t} F1_{s,t,i} · F2_{s,t,j} / (h·w), and the student learns to match
the teacher's matrices (Eq. 2)  L = mean_x Σ_pairs λ ||G_T − G_S||².

As in RepDistiller (``distiller_zoo/FSP.py``, ``train_student.py``, ``helper/pretrain.py``):
- the maps are ``stages`` (RepDistiller ``feat[:-1]``: stem and every stage output), and the
  pairs are consecutive positions; the larger map of a pair is adaptive-average-pooled to the
  smaller spatial size;
- each pair's loss is the *mean* of the squared differences over batch and matrix entries and
  the pairs are summed (λ = 1);
- it is an **initialisation stage** only: ``init_epochs`` (30) epochs training the student's
  feature modules (every module but the classifier) on this loss, then the main stage is CE
  only (the term returns 0; RepDistiller's ``-b 50`` multiplies 0). ``main_loss=True`` keeps
  the FSP loss on in the main stage as well ("can also add loss to this stage").
It needs equal channel counts at every position (hence N/A for wrn_40_1 in the CRD table).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.methods.adapters import pool_to_smaller
from kdbench.methods.base import Batch, InitStageLoss, MethodContext, register_loss, register_method


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """G[b, j, i] = mean_hw top[b, j] · bottom[b, i]  ->  [B, C_top, C_bottom]."""
    with torch.autocast(bottom.device.type, enabled=False):
        bottom, top = pool_to_smaller(bottom.float(), top.float())
        return top.flatten(2) @ bottom.flatten(2).transpose(1, 2) / bottom[0, 0].numel()


def fsp_loss(s_maps: list[Tensor], t_maps: list[Tensor]) -> Tensor:
    return sum(((fsp_matrix(s0, s1) - fsp_matrix(t0, t1)) ** 2).mean()
               for s0, s1, t0, t1 in zip(s_maps[:-1], s_maps[1:], t_maps[:-1], t_maps[1:]))


@register_loss("fsp")
class FSP(InitStageLoss):
    teacher_needs = frozenset({"stages"})

    def __init__(self, ctx: MethodContext, init_epochs: int = 30, main_loss: bool = False):
        super().__init__(ctx)
        s, t = ctx.student.stages, ctx.teacher.stages
        bad = [f"stages[{i}]: student {tuple(a)} vs teacher {tuple(b)}"
               for i, (a, b) in enumerate(zip(s, t)) if a[0] != b[0]]
        if len(s) != len(t) or bad:
            raise ValueError(
                f"FSP needs equal channel counts at every stage position, but {ctx.student_arch or 'the student'}"
                f" and {ctx.teacher_arch or 'the teacher'} differ: "
                + ("; ".join(bad) or f"{len(s)} student stages vs {len(t)} teacher stages")
                + " (FSP is N/A for this pair, e.g. wrn_40_2 -> wrn_40_1 in the CRD table)")
        self.init_epochs = int(init_epochs)
        self.main_loss = bool(main_loss)

    def init_parameters(self, student: nn.Module) -> Iterable[nn.Parameter]:
        return student.feature_modules().parameters()

    def init_train_modules(self, student: nn.Module) -> list[nn.Module]:
        return [student.feature_modules()]  # RepDistiller: model_s.eval(), then get_feat_modules().train()

    def init_loss(self, s: Features, t: Features, batch: Batch) -> Tensor:
        return fsp_loss(s.stages, [f.detach() for f in t.stages])


register_method("fsp", ce=1.0, terms={"fsp": 50.0}, params={"fsp": {"init_epochs": 30}},
                paper="Yim et al. CVPR 2017",
                doc="RepDistiller -a 0 -b 50: 30 init epochs on FSP matrices, then CE only "
                    "(the main-stage FSP term is 0).")
register_method("fsp_kd", ce=1.0, terms={"kd": 1.0, "fsp": 50.0},
                params={"kd": {"T": 4.0}, "fsp": {"init_epochs": 30}},
                paper="Yim et al. CVPR 2017",
                doc="FSP init stage, then RepDistiller's '+KD' convention -r 1 -a 1: CE + KD(T 4).")
