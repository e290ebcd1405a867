"""RepDistiller's Wide ResNets (HobbitLong/RepDistiller ``models/wrn.py``; Zagoruyko & Komodakis 2016).

``wrn_{depth}_{k}``: 3×3 stem with 16 channels, three stages of (depth-4)/6 pre-activation
basic blocks (BN-ReLU-conv ×2) with 16k/32k/64k channels (strides 1/2/2), a 1×1 projection
shortcut taken from the activated input where channels change, then BN-ReLU, global pooling
and the classifier. Dropout rate 0 as in RepDistiller.

Features (RepDistiller ``is_feat=True``): stem = conv1 output (no BN/ReLU); stages = the three
block-group outputs (residual sums, no ReLU). ``preact`` follows RepDistiller's
``preact=True``: the BN that the next layer applies to each stage output, i.e.
``block2.layer[0].bn1(f1)``, ``block3.layer[0].bn1(f2)`` and the final ``bn1(f3)``; the stem is
repeated. RepDistiller calls those BNs a second time after the forward (updating their running
statistics twice per step in training); here they are captured during the one forward pass,
which gives the same values without the side effect.

Init as RepDistiller: conv N(0, 2/(k²·C_out)), BN 1/0, Linear bias 0 (weight default).
``feature_modules()`` is RepDistiller's ``get_feat_modules()``: conv1 and the three block groups
(the final BN is not included, as there). Module names equal RepDistiller's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.models.zoo import ClassifierAlias, global_pool, init_conv_fan_out_, register_model


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: Tensor, bn_x: Tensor | None = None) -> Tensor:
        """``bn_x`` = ``self.bn1(x)`` when the caller already computed it (to keep it as preact)."""
        act = F.relu(self.bn1(x) if bn_x is None else bn_x)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equal_in_out else self.convShortcut(act))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(n)
        ])

    def forward(self, x: Tensor, bn_x: Tensor | None = None) -> Tensor:
        x = self.layer[0](x, bn_x)
        for block in self.layer[1:]:
            x = block(x)
        return x


class WideResNet(ClassifierAlias, nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0, "depth must be 6n+4"
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        self.image_size = 32
        init_conv_fan_out_(self, zero_linear_bias=True)

    def feature_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def forward(self, x: Tensor) -> Features:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        p1 = self.block2.layer[0].bn1(f1)
        f2 = self.block2(f1, p1)
        p2 = self.block3.layer[0].bn1(f2)
        f3 = self.block3(f2, p2)
        p3 = self.bn1(f3)
        pooled = global_pool(F.relu(p3))
        return Features([f0, f1, f2, f3], [f0, p1, p2, p3], pooled, self.fc(pooled))


for _name, (_depth, _k) in {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}.items():
    register_model(_name)(lambda num_classes, d=_depth, k=_k: WideResNet(d, k, num_classes))
