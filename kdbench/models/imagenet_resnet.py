"""torchvision's ImageNet ResNet-18/34 ("imagenet_resnet18", "imagenet_resnet34"), unchanged.

The model *is* ``torchvision.models.ResNet`` built exactly as ``torchvision.models.resnet18/34``
build it (same blocks, layers and init), with only ``forward`` overridden to return Features,
so ``state_dict`` keys equal torchvision's and its ImageNet weights load unchanged.

Features, following RepDistiller/mdistiller's ImageNet convention: stem = output after
conv1-bn1-relu-maxpool (56 px at 224 px input); stages = layer1..layer4; preact = each layer's
last block before its final ReLU (the block is re-walked module by module, because torchvision
applies an in-place ReLU to that sum); pooled = the 512-d average-pooled vector; classifier =
``fc``. ``feature_modules()`` is every child module except ``fc``. ``image_size`` is 224.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tvr

from kdbench.core.features import Features
from kdbench.models.zoo import ClassifierAlias


def block_with_preact(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """A torchvision BasicBlock/Bottleneck forward that also returns the pre-ReLU sum."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, tvr.Bottleneck):
        out = block.bn3(block.conv3(block.relu(out)))
    preact = out + (x if block.downsample is None else block.downsample(x))
    return F.relu(preact), preact


class TorchvisionResNet(ClassifierAlias, tvr.ResNet):
    image_size = 224

    def feature_modules(self) -> nn.ModuleList:
        return nn.ModuleList([m for name, m in self.named_children() if name != "fc"])

    def forward(self, x: Tensor) -> Features:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages, preact = [x], [x]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer[:-1]:
                x = block(x)
            x, pre = block_with_preact(layer[-1], x)
            stages.append(x)
            preact.append(pre)
        pooled = self.avgpool(x).flatten(1)
        return Features(stages, preact, pooled, self.fc(pooled))


def imagenet_resnet18(num_classes: int = 1000) -> TorchvisionResNet:
    return TorchvisionResNet(tvr.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def imagenet_resnet34(num_classes: int = 1000) -> TorchvisionResNet:
    return TorchvisionResNet(tvr.BasicBlock, [3, 4, 6, 3], num_classes=num_classes)
