"""RepDistiller's CIFAR VGGs with BatchNorm (HobbitLong/RepDistiller ``models/vgg.py``, ``vgg*_bn``).

Five conv blocks (3×3 conv with bias, BN, ReLU; the last ReLU of each block is applied in
``forward``), max-pool 2×2 after blocks 0-2 (and after block 3 only for 64 px inputs, as in
RepDistiller), global average pooling and a single 512→classes Linear (the VGG FC layers are
removed). ``vgg8`` = cfg "S" [[64],[128],[256],[512],[512]]; vgg11/13/16/19 = cfg A/B/D/E.

Features (RepDistiller ``is_feat=True``; six entries there): stem = relu(block0 x) (post-ReLU
in both lists); stages = relu of blocks 1-4; preact = blocks 1-4 before that ReLU; pooled =
global average of stage 4. Init as RepDistiller: conv N(0, 2/(k²·C_out)) with bias 0, BN 1/0,
Linear N(0, 0.01) with bias 0. Module names equal RepDistiller's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.models.zoo import init_conv_fan_out_, register_model

CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def conv_block(widths: list[int], cin: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in widths:
        layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        cin = v
    return nn.Sequential(*layers[:-1])  # the block's last ReLU is applied in forward


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100):
        super().__init__()
        cins = [3] + [c[-1] for c in cfg[:-1]]
        for i, (widths, cin) in enumerate(zip(cfg, cins)):
            setattr(self, f"block{i}", conv_block(widths, cin))
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        self.image_size = 32
        init_conv_fan_out_(self, linear_std=0.01)

    def feature_modules(self) -> nn.ModuleList:
        mods = []
        for i in range(5):
            mods += [getattr(self, f"block{i}"), getattr(self, f"pool{i}")]
        return nn.ModuleList(mods)

    def forward(self, x: Tensor) -> Features:
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        stages, preact = [f0], [f0]
        x = self.pool0(f0)
        for i in range(1, 5):
            p = getattr(self, f"block{i}")(x)
            x = F.relu(p)
            stages.append(x)
            preact.append(p)
            if i < 3 or (i == 3 and h == 64):  # RepDistiller skips pool3 at 32 px
                x = getattr(self, f"pool{i}")(x)
        pooled = self.pool4(x).flatten(1)
        return Features(stages, preact, pooled, self.classifier(pooled))


for _name, _cfg in CFG.items():
    register_model(_name)(lambda num_classes, c=_cfg: VGG(c, num_classes))
