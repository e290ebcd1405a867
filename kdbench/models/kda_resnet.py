"""The KDA paper's CIFAR ResNets (idstcv/KDA ``resnet_cifar.py``, itself from
weiaicunzai/pytorch-cifar100 ``models/resnet.py``; He et al. 2016).

"ResNet18" / "ResNet34": basic blocks 2/2/2/2 and 3/4/6/3 with widths 64/128/256/512, strides
1/2/2/2, behind a CIFAR stem (3×3 stride-1 conv with 64 channels, BN-ReLU, no max-pool), global
pooling (512-d, what KDA's loss reads) and the classifier. Projection shortcuts (1×1 conv + BN)
wherever shape changes.

"ResNet18-0.5" is the KDA paper's half-width ResNet-18, for which no code was released. Choice
made here: every width halved, stem included (32, then 32/64/128/256), so pooled is 256-d; depth,
strides and everything else as ResNet18.

Features: stem = conv1 output (post-ReLU); stages = conv2_x..conv5_x outputs; preact = each
stage's last block before its final ReLU; pooled = global average of conv5_x. Init: PyTorch
defaults (the original sets none). Module names equal idstcv/KDA's, so its checkpoints load.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.models.zoo import ClassifierAlias, register_model, run_stage


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        preact = self.residual_function(x) + self.shortcut(x)
        return F.relu(preact), preact


class KDAResNet(ClassifierAlias, nn.Module):
    def __init__(self, num_blocks, num_classes: int = 100, width: float = 1.0):
        super().__init__()
        widths = [int(w * width) for w in (64, 128, 256, 512)]
        self.in_channels = widths[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        self.conv2_x = self._make_layer(widths[0], num_blocks[0], 1)
        self.conv3_x = self._make_layer(widths[1], num_blocks[1], 2)
        self.conv4_x = self._make_layer(widths[2], num_blocks[2], 2)
        self.conv5_x = self._make_layer(widths[3], num_blocks[3], 2)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        self.image_size = 32

    def _make_layer(self, cout: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_channels, cout, s))
            self.in_channels = cout
        return nn.Sequential(*layers)

    def feature_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.conv2_x, self.conv3_x, self.conv4_x, self.conv5_x, self.avg_pool])

    def forward(self, x: Tensor) -> Features:
        out = self.conv1(x)
        stages, preact = [out], [out]
        for layer in (self.conv2_x, self.conv3_x, self.conv4_x, self.conv5_x):
            out, pre = run_stage(layer, out)
            stages.append(out)
            preact.append(pre)
        pooled = self.avg_pool(out).flatten(1)
        return Features(stages, preact, pooled, self.fc(pooled))


register_model("ResNet18")(lambda num_classes=100: KDAResNet((2, 2, 2, 2), num_classes))
register_model("ResNet34")(lambda num_classes=100: KDAResNet((3, 4, 6, 3), num_classes))
register_model("ResNet18-0.5")(lambda num_classes=100: KDAResNet((2, 2, 2, 2), num_classes, width=0.5))
