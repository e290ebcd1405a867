"""RepDistiller's CIFAR ResNet50 (HobbitLong/RepDistiller ``models/resnetv2.py``, from
kuangliu/pytorch-cifar; He et al. 2016).

ImageNet ResNet-50 bottleneck stages (3/4/6/3 blocks, widths 64/128/256/512 × expansion 4,
strides 1/2/2/2) behind a CIFAR stem: 3×3 stride-1 conv with 64 channels, BN-ReLU, no
max-pool. Projection shortcuts (1×1 conv + BN) wherever shape changes.

Features (RepDistiller ``is_feat=True``): stem = relu(bn1(conv1 x)); stages = layer1..layer4
outputs (256/512/1024/2048 channels at 32/16/8/4 px); preact = each layer's last block before
its final ReLU; pooled = 2048-d global average. Init: conv kaiming-normal fan_out, BN 1/0
(``zero_init_residual`` False as in RepDistiller), Linear default. Module names equal
RepDistiller's (the classifier is ``linear``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.models.zoo import ClassifierAlias, global_pool, init_conv_fan_out_, register_model, run_stage


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(preact), preact


class CifarBottleneckResNet(ClassifierAlias, nn.Module):
    classifier_attr = "linear"

    def __init__(self, num_blocks=(3, 4, 6, 3), num_classes: int = 100):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        self.image_size = 32
        init_conv_fan_out_(self)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def feature_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4])

    def forward(self, x: Tensor) -> Features:
        f0 = F.relu(self.bn1(self.conv1(x)))
        stages, preact = [f0], [f0]
        out = f0
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out, pre = run_stage(layer, out)
            stages.append(out)
            preact.append(pre)
        pooled = global_pool(out)
        return Features(stages, preact, pooled, self.linear(pooled))


@register_model("ResNet50")
def resnet50(num_classes: int = 100) -> CifarBottleneckResNet:
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes)
