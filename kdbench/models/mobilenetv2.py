"""RepDistiller's ``mobile_half`` MobileNetV2 (HobbitLong/RepDistiller ``models/mobilenetv2.py``,
from "Knowledge Distillation via Route Constrained Optimization"; Sandler et al. 2018).

Registered as "MobileNetV2" (the CRD tables' name). Expansion T=6, width multiplier 0.5:
stride-2 3×3 stem with 16 channels, inverted-residual groups (t, c, n, s) = (1,16,1,1),
(6,24,2,1), (6,32,3,2), (6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1) with c halved,
a 1×1 conv to 1280 channels (not scaled down, as RepDistiller: width ≤ 1 keeps 1280), BN-ReLU,
global pooling and the classifier. Pooling is global (RepDistiller's ``AvgPool2d(2,
ceil_mode=True)`` on the 2×2 map at 32 px is the same thing).

Features (RepDistiller ``is_feat=True``): stem = conv1 output (post-ReLU); stages = outputs
after block groups 0-1, 2, 3-4 and 5-6 (RepDistiller's grouping: 12/16/48/160 channels at
16/8/4/2 px for 32 px inputs); pooled = 1280-d. The blocks end in a linear bottleneck (no ReLU),
so RepDistiller returns the same list for ``preact=True``: ``preact`` equals ``stages``.

Init as RepDistiller: conv N(0, 2/(k²·C_out)), BN 1/0, Linear N(0, 0.01) with bias 0.
``feature_modules()`` = RepDistiller's ``get_feat_modules()``: conv1 and the blocks (not conv2).
Module names equal RepDistiller's except the classifier, a bare Linear here (RepDistiller wraps
it in a Sequential); a load hook maps ``classifier.0.*`` keys so its checkpoints still load.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.models.zoo import global_pool, init_conv_fan_out_, register_model

# (expansion t, channels c, blocks n, first stride s); t=None means the model's expansion T
SETTINGS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
            (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
STAGE_ENDS = (1, 2, 4, 6)  # stages end after these block groups


def conv_bn_relu(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            *conv_bn_relu(inp, hidden, 1, 1),  # pointwise expansion
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # linear bottleneck
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100):
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTINGS:
            cout = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(cin, cout, stride, expansion if t is None else t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(cin, self.last_channel, 1, 1)
        self.classifier = nn.Linear(self.last_channel, num_classes)
        self.image_size = 32
        init_conv_fan_out_(self, linear_std=0.01)
        self.register_load_state_dict_pre_hook(_repdistiller_classifier_keys)

    def feature_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.blocks])

    def forward(self, x: Tensor) -> Features:
        x = self.conv1(x)
        stages = [x]
        for i, group in enumerate(self.blocks):
            x = group(x)
            if i in STAGE_ENDS:
                stages.append(x)
        pooled = global_pool(self.conv2(x))
        return Features(stages, list(stages), pooled, self.classifier(pooled))


def _repdistiller_classifier_keys(module, state_dict, prefix, *args) -> None:
    for name in ("weight", "bias"):
        old = f"{prefix}classifier.0.{name}"
        if old in state_dict:
            state_dict[f"{prefix}classifier.{name}"] = state_dict.pop(old)


@register_model("MobileNetV2")
def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(6, 0.5, num_classes)
