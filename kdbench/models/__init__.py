"""The model zoo: ``build_model(name, num_classes)`` for every architecture the suites name.

Every model's ``forward(x)`` returns :class:`Features` (see ``features.py``), has
``model.classifier`` (its final ``nn.Linear``), ``model.feature_modules()`` (RepDistiller's
``get_feat_modules``), ``model.arch`` (its registry name) and ``model.image_size``.

Families (one file each): RepDistiller's CIFAR zoo (``resnet.py``, ``wrn.py``, ``vgg.py``,
``mobilenetv2.py``, ``shufflenetv1.py``, ``shufflenetv2.py``, ``resnetv2.py``), the KDA paper's
CIFAR ResNets and ShuffleNet (``kda_resnet.py``, ``kda_shufflenet.py``) and torchvision's
ImageNet ResNets (``imagenet_resnet.py``).
"""

from __future__ import annotations

from torch import nn

from kdbench.models import kda_resnet, kda_shufflenet, mobilenetv2, resnet, resnetv2  # noqa: F401 (registers)
from kdbench.models import shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401 (registers)
from kdbench.core.features import Features, FeatureShapes, feature_shapes
from kdbench.core.plugins import load_entry_points
from kdbench.models.zoo import MODELS, register_model


# torchvision.models takes ~1 s to import: load the ImageNet family only when it is built
@register_model("imagenet_resnet18")
def _imagenet_resnet18(num_classes: int = 1000) -> nn.Module:
    from kdbench.models.imagenet_resnet import imagenet_resnet18
    return imagenet_resnet18(num_classes)


@register_model("imagenet_resnet34")
def _imagenet_resnet34(num_classes: int = 1000) -> nn.Module:
    from kdbench.models.imagenet_resnet import imagenet_resnet34
    return imagenet_resnet34(num_classes)

__all__ = ["MODELS", "register_model", "build_model", "model_names", "Features", "FeatureShapes", "feature_shapes"]


# external models: installed packages' entry points, group "kdbench.models" (kdbench/core/plugins.py)
load_entry_points("kdbench.models")


def build_model(name: str, num_classes: int = 100) -> nn.Module:
    """Build architecture ``name``; unknown names raise ``UnknownNameError`` listing valid ones."""
    model = MODELS.get(name)(num_classes)
    model.arch = name
    return model


def model_names() -> list[str]:
    return MODELS.names()
