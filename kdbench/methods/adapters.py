"""Shape-derived adapters shared by the feature-distillation terms (RepDistiller ``models/util.py``).

Every adapter is built from per-sample feature *shapes* (``FeatureShapes`` entries, ``(C, H, W)``
or ``(C,)``; a leading batch dimension is accepted and ignored), never from architecture names.

- :class:`ConvReg` — FitNet's convolutional regressor from a student map onto a teacher map.
- :class:`Embed` — Linear(d → 128) then L2 normalisation (CRD's ``Embed``).
- :class:`LinearEmbed` — Linear(d → 128) without normalisation (CC's ``LinearEmbed``).
- :class:`Projection` — a student-side linear map onto the teacher's width: 1×1 conv for maps,
  Linear for vectors (OT-KD's regressor; the teacher side gets none).
- :func:`pool_to_smaller` — adaptive average pooling of the larger of two maps to the smaller
  spatial size, as RepDistiller's AT, NST and VID do before comparing maps.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _chw(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) < 3:
        raise ValueError(f"expected a (C, H, W) feature-map shape, got {tuple(shape)}")
    c, h, w = (int(v) for v in tuple(shape)[-3:])
    return c, h, w


def _flat_dim(shape: Sequence[int] | int) -> int:
    if isinstance(shape, int):
        return shape
    n = 1
    for v in shape:
        n *= int(v)
    return n


class ConvReg(nn.Module):
    """FitNet's regressor r(·) mapping a student map onto a teacher map's shape, then BN (+ReLU).

    The convolution depends on the spatial ratio, as in RepDistiller's ``ConvReg``:
    s_H = 2·t_H → conv 3×3 stride 2 (pad 1); 2·s_H = t_H → transposed conv 4×4 stride 2 (pad 1);
    s_H ≥ t_H otherwise → valid conv with kernel (1 + s_H − t_H, 1 + s_W − t_W). A student map
    smaller than the teacher's by a factor other than 2 is unsupported (as in RepDistiller).
    ``use_relu=False`` gives AB's connector variant (conv + BN only).
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        s_c, s_h, s_w = _chw(s_shape)
        t_c, t_h, t_w = _chw(t_shape)
        if s_h == 2 * t_h and s_w == 2 * t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h and 2 * s_w == t_w:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"ConvReg cannot map a student map {(s_c, s_h, s_w)} onto a teacher map "
                             f"{(t_c, t_h, t_w)}: the student map must be 2x the teacher's size, half of it, "
                             "or at least as large (choose another hint layer)")
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


class LinearEmbed(nn.Module):
    """Flatten, then Linear(dim_in → dim_out) (RepDistiller ``LinearEmbed``, used by CC)."""

    def __init__(self, dim_in: Sequence[int] | int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(_flat_dim(dim_in), dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


class Embed(LinearEmbed):
    """Flatten, Linear(dim_in → dim_out), then L2-normalise each row (RepDistiller/CRD ``Embed``).

    RepDistiller divides by the norm without an epsilon; ``F.normalize`` (eps 1e-12) differs only
    for all-zero rows, where it returns zeros instead of NaN.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(super().forward(x), p=2, dim=1)


class Projection(nn.Module):
    """Map a student feature onto the teacher's width: a 1×1 convolution C_s → C_t for (C, H, W)
    maps (spatial size kept), a Linear d_s → d_t for vectors. No normalisation or activation."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]):
        super().__init__()
        if len(s_shape) >= 3 and len(t_shape) >= 3:
            self.map = nn.Conv2d(_chw(s_shape)[0], _chw(t_shape)[0], kernel_size=1)
        elif len(s_shape) == 1 and len(t_shape) == 1:
            self.map = nn.Linear(int(s_shape[0]), int(t_shape[0]))
        else:
            raise ValueError(f"Projection maps a map onto a map or a vector onto a vector, not "
                             f"{tuple(s_shape)} onto {tuple(t_shape)}")

    def forward(self, x: Tensor) -> Tensor:
        return self.map(x)


def pool_to_smaller(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever map is larger to the smaller (H, W); others pass unchanged.

    RepDistiller compares heights only and pools to a square (H, H); this pools to
    (min H, min W), which is the same for the square maps of every CIFAR/ImageNet model.
    """
    size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
    if tuple(f_s.shape[-2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[-2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t
