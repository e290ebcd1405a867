"""The KDA paper's "ShuffleNet": ShuffleNet V1 (g=3) as in weiaicunzai/pytorch-cifar100
``models/shufflenet.py`` (Zhang et al. 2018).

The KDA paper does not say which ShuffleNet it used. Its released models (``resnet_cifar.py``)
come from weiaicunzai/pytorch-cifar100, whose ``shufflenet()`` is ShuffleNet V1 with groups=3
and 4/8/4 units; that is the choice made here. It is deliberately *not* RepDistiller's
ShuffleV1, which differs in ways that change the network: a 1×1 bias-free stem (here 3×3 with
bias), bias-free convs (here every conv has a bias, PyTorch's default in the original), a ReLU
after the depthwise conv (none here, as in the paper), an ungrouped first 1×1 conv in stage 2
(grouped here: the original's stage-2 branch builds the same grouped conv), a down-sampling
bottleneck of (out − in)/4 channels (out/4 here) and branch-before-shortcut concatenation
(shortcut first here). Parameter counts differ accordingly.

Structure: 3×3 stem (24 channels, BN-ReLU, stride 1), stages of 4/8/4 units with 240/480/960
channels, each stage's first unit with stride 2, a 3×3 average-pool shortcut (padding 1) and
concatenation; units: grouped 1×1 conv to out/4 + BN-ReLU, channel shuffle, 3×3 depthwise conv
+ BN, grouped 1×1 conv + BN, fusion, ReLU. Global pooling (960-d) and the classifier.

Features: stem = conv1 output (post-ReLU); stages = stage2..stage4 outputs (32 px input:
240/480/960 channels at 16/8/4 px); preact = each stage's last unit before its final ReLU;
pooled = 960-d. Init: PyTorch defaults (the original sets none). Module names are not the
original's (no checkpoints were released).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.models.zoo import ClassifierAlias, channel_shuffle, global_pool, register_model, run_stage


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, relu: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class ShuffleNetUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        self.groups = groups
        self.concat = stride != 1 or cin != cout
        self.bottleneck = conv_bn(cin, mid, groups=groups, relu=True)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn(mid, cout - cin if self.concat else cout, groups=groups)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if self.concat else nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.expand(self.depthwise(channel_shuffle(self.bottleneck(x), self.groups)))
        res = self.shortcut(x)
        preact = torch.cat([res, out], 1) if self.concat else res + out
        return F.relu(preact), preact


class ShuffleNetG3(ClassifierAlias, nn.Module):
    def __init__(self, num_blocks=(4, 8, 4), num_classes: int = 100, groups: int = 3, widths=(24, 240, 480, 960)):
        super().__init__()
        self.conv1 = conv_bn(3, widths[0], 3, relu=True)
        self.in_channels = widths[0]
        self.stage2, self.stage3, self.stage4 = (self._make_stage(w, n, groups) for w, n in zip(widths[1:], num_blocks))
        self.fc = nn.Linear(widths[3], num_classes)
        self.image_size = 32

    def _make_stage(self, cout: int, n: int, groups: int) -> nn.Sequential:
        units = []
        for s in [2] + [1] * (n - 1):
            units.append(ShuffleNetUnit(self.in_channels, cout, s, groups))
            self.in_channels = cout
        return nn.Sequential(*units)

    def feature_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.stage2, self.stage3, self.stage4])

    def forward(self, x: Tensor) -> Features:
        out = self.conv1(x)
        stages, preact = [out], [out]
        for stage in (self.stage2, self.stage3, self.stage4):
            out, pre = run_stage(stage, out)
            stages.append(out)
            preact.append(pre)
        pooled = global_pool(out)
        return Features(stages, preact, pooled, self.fc(pooled))


@register_model("ShuffleNet")
def shufflenet_g3(num_classes: int = 100) -> ShuffleNetG3:
    return ShuffleNetG3(num_classes=num_classes)
