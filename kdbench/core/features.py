"""The one record every kdbench model returns, so no method needs to know an architecture.

Positions follow RepDistiller's ``model(x, is_feat=True)`` list: ``stages[0]`` is the stem
output, ``stages[1:]`` are the outputs of the residual/conv stages (post-activation), so
RepDistiller's ``feat[1:-1]`` is ``stages[1:]`` and ``feat[-2]`` is ``stages[-1]``.
``preact`` holds the same positions before the final ReLU of each stage (RepDistiller's
``preact=True``); where a stage has no pre-activation distinct from its output (the stem),
the post-activation tensor is repeated. ``pooled`` is the flattened penultimate feature
(``feat[-1]``) and ``logits`` the classifier output.

A teacher *ensemble* returns the members' records in ``members`` (else ``None``); its own
``logits`` are the log of the members' averaged probabilities and its ``pooled`` the members'
pooled features concatenated and scaled by 1/sqrt(E), whose linear kernel is the average of
the members' kernels. Terms that need per-member kernels read ``members``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Features:
    stages: list[Tensor]
    preact: list[Tensor]
    pooled: Tensor
    logits: Tensor
    members: list["Features"] | None = None

    def apply(self, fn) -> "Features":
        """The same record with ``fn`` applied to every tensor (members included)."""
        return Features([fn(f) for f in self.stages], [fn(f) for f in self.preact], fn(self.pooled),
                        fn(self.logits), None if self.members is None else [m.apply(fn) for m in self.members])

    def tensors(self) -> list[Tensor]:
        """Every tensor of the record, members' last, in a fixed order."""
        out = [*self.stages, *self.preact, self.pooled, self.logits]
        for m in self.members or []:
            out += m.tensors()
        return out

    def detach(self) -> "Features":
        return self.apply(Tensor.detach)


@dataclass(frozen=True)
class FeatureShapes:
    """Per-sample shapes (no batch dimension) of a model's :class:`Features`."""

    stages: tuple[torch.Size, ...]
    preact: tuple[torch.Size, ...]
    pooled: torch.Size
    logits: torch.Size


@torch.no_grad()
def feature_shapes(model: nn.Module, image_size: int = 32, channels: int = 3) -> FeatureShapes:
    """Run one dummy batch through ``model`` (left in its original mode) and return shapes."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        out: Features = model(torch.zeros(2, channels, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return FeatureShapes(
        tuple(f.shape[1:] for f in out.stages),
        tuple(f.shape[1:] for f in out.preact),
        out.pooled.shape[1:],
        out.logits.shape[1:],
    )
