"""RepDistiller's ShuffleV1 (HobbitLong/RepDistiller ``models/ShuffleNetv1.py``; Zhang et al. 2018).

Groups g=3, stage widths 240/480/960 with 4/8/4 units, a 1×1 24-channel stem (no max-pool, for
32 px inputs). Each unit: grouped 1×1 conv to out/4 channels (g=1 when its input is the 24-channel
stem), BN-ReLU, channel shuffle, 3×3 depthwise conv, BN-ReLU (RepDistiller keeps this ReLU,
which the paper omits), grouped 1×1 conv, BN; the first unit of a stage has stride 2, a 3×3
average-pool shortcut and concatenation (its branch then outputs out − in channels, and its
bottleneck is (out − in)/4 wide, as in RepDistiller), the others add an identity shortcut.

Features (RepDistiller ``is_feat=True``): stem = relu(bn1(conv1 x)); stages = the three stage
outputs; preact = the last unit's sum before its ReLU; pooled = 960-d global average
(RepDistiller's ``avg_pool2d(out, 4)`` on the 4×4 map). Init: PyTorch defaults (RepDistiller
sets none). Module names equal RepDistiller's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.models.zoo import ClassifierAlias, channel_shuffle, global_pool, register_model, run_stage


class ShuffleUnit(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        self.g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(preact), preact


class ShuffleNetV1(ClassifierAlias, nn.Module):
    classifier_attr = "linear"

    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1, self.layer2, self.layer3 = (self._make_layer(o, n, groups) for o, n in zip(out_planes, num_blocks))
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.image_size = 32

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(ShuffleUnit(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def feature_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def forward(self, x: Tensor) -> Features:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        pooled = global_pool(f3)
        return Features([f0, f1, f2, f3], [f0, p1, p2, p3], pooled, self.linear(pooled))


@register_model("ShuffleV1")
def shuffle_v1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes=num_classes)
