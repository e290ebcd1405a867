"""The frozen teacher a run distils from: one model file, or several averaged as an ensemble."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdbench.core.features import Features
from kdbench.engine.checkpoint import load_model


class TeacherEnsemble(nn.Module):
    """E frozen teachers seen as one (see :class:`~kdbench.models.Features` for the fields)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> Features:
        outs = [m(x) for m in self.members]
        e = len(outs)
        probs = torch.stack([o.logits.float().softmax(1) for o in outs]).mean(0)
        pooled = torch.cat([o.pooled for o in outs], dim=1) / math.sqrt(e)
        return Features([], [], pooled, probs.clamp_min(1e-12).log(), members=outs)


def load_teacher(paths: tuple[str, ...], arch: str | None, num_classes: int, device) -> nn.Module:
    """One model file gives a teacher; several give a :class:`TeacherEnsemble`. Frozen, eval mode."""
    models = [load_model(p, arch, num_classes, device) for p in paths]
    teacher = models[0] if len(models) == 1 else TeacherEnsemble(models).to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
