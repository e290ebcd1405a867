"""RepDistiller's CIFAR ResNets (HobbitLong/RepDistiller ``models/resnet.py``; He et al. 2016).

resnet{8,14,20,32,44,56,110}: widths 16/16/32/64 and n = (depth-2)/6 basic blocks per stage;
resnet8x4 / resnet32x4: widths 32/64/128/256. 3×3 stem (conv-BN-ReLU), three stages at
strides 1/2/2, a 1×1 conv+BN projection shortcut where the shape changes, global average
pooling and ``fc``.

Features (RepDistiller ``is_feat=True``): stem = relu(bn1(conv1 x)); stages = the outputs of
layer1-3 (post-ReLU); ``preact`` = each stage's last residual sum before its ReLU
(``preact=True``), the stem repeated. Init as RepDistiller: kaiming-normal fan-out convs, BN
1/0, default Linear. ``feature_modules()`` = ``get_feat_modules()`` (all but ``fc``). Module
names equal RepDistiller's, so its checkpoints load unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.models.zoo import ClassifierAlias, global_pool, init_conv_fan_out_, register_model, run_stage


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        preact = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(preact), preact


class CifarResNet(ClassifierAlias, nn.Module):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        assert (depth - 2) % 6 == 0, "basic-block depth must be 6n+2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(in_planes if j == 0 else planes, planes, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.fc = nn.Linear(widths[3], num_classes)
        self.image_size = 32
        init_conv_fan_out_(self)  # equal to kaiming_normal_(mode="fan_out", nonlinearity="relu")

    def feature_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3])

    def forward(self, x: Tensor) -> Features:
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        pooled = global_pool(f3)
        return Features([f0, f1, f2, f3], [f0, p1, p2, p3], pooled, self.fc(pooled))


_SMALL, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)
for _name, (_depth, _widths) in {
    **{f"resnet{d}": (d, _SMALL) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, _X4),
    "resnet32x4": (32, _X4),
}.items():
    register_model(_name)(lambda num_classes, d=_depth, w=_widths: CifarResNet(d, w, num_classes))
