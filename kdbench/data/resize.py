"""Image decoding and resizing shared by the readers of larger-than-CIFAR datasets.

Resizing uses PIL's bilinear filter on each uint8 image, which is what torchvision's
``transforms.Resize`` does to PIL images (the transfer-protocol code resizes PIL images), so the
stored 32×32 arrays match that pipeline up to its ToTensor/Normalize float rounding.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """N×H×W×3 uint8 → N×size×size×3 uint8 (a no-op at the native size)."""
    if images.shape[1] == size and images.shape[2] == size:
        return np.ascontiguousarray(images)
    out = np.empty((images.shape[0], size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.BILINEAR))
    return out


def resized(split, size: int):
    """An ``ImageSet`` with its images resized to ``size`` px (the synthetic writers upsample the
    32×32 synthetic images to a dataset's native size with it)."""
    return replace(split, images=resize_uint8(split.images, size))


def load_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """Decode an image file as RGB (grayscale JPEGs are expanded), optionally resized."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im)
