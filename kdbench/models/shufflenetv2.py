"""RepDistiller's ShuffleV2 (HobbitLong/RepDistiller ``models/ShuffleNetv2.py``; Ma et al. 2018).

Net size 1×: 1×1 24-channel stem (no max-pool, for 32 px inputs), three stages of one
stride-2 down-sampling unit followed by 3/7/3 basic units with 116/232/464 channels, a 1×1
conv to 1024 channels with BN-ReLU, global pooling and the classifier. A basic unit splits the
channels in half, transforms the second half (1×1 conv-BN-ReLU, 3×3 depthwise conv-BN, 1×1
conv-BN-ReLU), concatenates and shuffles with 2 groups.

Features (RepDistiller ``is_feat=True``): stem = relu(bn1(conv1 x)); stages = the three stage
outputs (after the shuffle); preact = RepDistiller's choice for the last unit of each stage:
``cat([x1, bn3(conv3(...))])`` before the ReLU *and before the channel shuffle*, so it is not
channel-aligned with the stage output (relu(preact) is a permutation of it); pooled = the
1024-d vector after conv2 (RepDistiller's ``avg_pool2d(out, 4)`` on the 4×4 map). Init: PyTorch
defaults (RepDistiller sets none). ``feature_modules()`` is RepDistiller's ``get_feat_modules()``:
conv1, bn1 and the three stages (not conv2/bn2). Module names equal RepDistiller's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.models.zoo import ClassifierAlias, channel_shuffle, global_pool, register_model, run_stage


def _conv(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


class BasicUnit(nn.Module):
    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1, self.bn1 = _conv(c, c), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = _conv(c, c, 3, groups=c), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = _conv(c, c), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        pre = self.bn3(self.conv3(out))
        out = channel_shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
        return out, torch.cat([x1, pre], 1)


class DownUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1, self.bn1 = _conv(in_channels, in_channels, 3, 2, in_channels), nn.BatchNorm2d(in_channels)
        self.conv2, self.bn2 = _conv(in_channels, mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _conv(in_channels, mid), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = _conv(mid, mid, 3, 2, mid), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = _conv(mid, mid), nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        out = channel_shuffle(torch.cat([left, right], 1), 2)
        return out, out  # never the last unit of a stage


class ShuffleNetV2(ClassifierAlias, nn.Module):
    classifier_attr = "linear"

    def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cins = (24,) + tuple(out_channels[:2])
        self.layer1, self.layer2, self.layer3 = (
            nn.Sequential(DownUnit(cin, cout), *[BasicUnit(cout) for _ in range(n)])
            for cin, cout, n in zip(cins, out_channels[:3], num_blocks)
        )
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.image_size = 32

    def feature_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def forward(self, x: Tensor) -> Features:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        pooled = global_pool(F.relu(self.bn2(self.conv2(f3))))
        return Features([f0, f1, f2, f3], [f0, p1, p2, p3], pooled, self.linear(pooled))


@register_model("ShuffleV2")
def shuffle_v2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes)
