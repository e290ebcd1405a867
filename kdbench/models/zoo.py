"""The architecture registry and the few helpers every model family shares.

Family modules register a factory ``f(num_classes) -> nn.Module`` with :func:`register_model`;
:func:`kdbench.models.build_model` calls it and stamps ``model.arch`` with the registry name.

Conventions shared by every family (so methods never need to know an architecture):

* ``forward(x)`` returns :class:`~kdbench.core.features.Features`;
* ``model.classifier`` is the final ``nn.Linear`` (an alias, :class:`ClassifierAlias`, where the
  original code names it ``fc`` or ``linear``, so state-dict keys stay those of the original
  code and its checkpoints load unchanged);
* ``model.feature_modules()`` is RepDistiller's ``get_feat_modules()`` where RepDistiller has
  one (for wrn, MobileNetV2 and ShuffleV2 that list also leaves out the layers between the
  last stage and the pooling: wrn's final BN, MobileNetV2's and ShuffleV2's last 1×1 conv-BN),
  otherwise every child module except the classifier;
* ``model.image_size`` is the input resolution the architecture is meant for (32 for the
  CIFAR zoo, 224 for ImageNet), to pass to :func:`~kdbench.core.features.feature_shapes`.

Residual stages are ``nn.Sequential`` of blocks whose ``forward`` returns ``(out, preact)``,
``preact`` being the tensor before the block's final ReLU; :func:`run_stage` threads them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.registry import Registry

MODELS: Registry[Callable[[int], nn.Module]] = Registry("architecture")


def register_model(name: str):
    """Decorator registering ``factory(num_classes) -> nn.Module`` under ``name``."""
    return MODELS.register(name)


class ClassifierAlias:
    """Mixin for models whose final Linear keeps the original code's name (``fc``, ``linear``).

    ``model.classifier`` reads it, and assigning ``model.classifier = nn.Linear(...)`` replaces it
    (``nn.Module.__setattr__`` would otherwise register a second, unused module).
    """

    classifier_attr = "fc"

    @property
    def classifier(self) -> nn.Linear:
        return getattr(self, self.classifier_attr)

    def __setattr__(self, name, value):
        super().__setattr__(self.classifier_attr if name == "classifier" else name, value)


def run_stage(stage: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run blocks that return ``(out, preact)``; give the last block's pair."""
    preact = x
    for block in stage:
        x, preact = block(x)
    return x, preact


def global_pool(x: Tensor) -> Tensor:
    """Global average pooling, flattened to ``[B, C]``.

    The CIFAR originals use a fixed window (``AvgPool2d(8)``, ``avg_pool2d(out, 4)``) equal to
    the last map at 32 px, which is exactly global pooling there; global pooling also keeps the
    models valid at other resolutions (64 px Tiny-ImageNet / STL-10 crops).
    """
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def init_conv_fan_out_(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """RepDistiller's hand-written init (wrn/vgg/mobilenetv2; ResNet's kaiming fan_out is equal).

    Conv weights ~ N(0, 2 / (k_h k_w C_out)), conv biases 0; BN weight 1, bias 0; Linear weights
    ~ N(0, ``linear_std``) when given (else PyTorch's default) and biases 0 when asked.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if zero_linear_bias or linear_std is not None:
                nn.init.zeros_(m.bias)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle: [N, g·n, H, W] -> view (g, n) -> transpose -> flatten."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)
