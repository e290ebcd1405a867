"""A device-resident loader: the whole split lives on the training device as one uint8 tensor.

Training batches get RepDistiller's augmentation, batched: ``RandomCrop(32, padding=4)`` (in
general the image's size and the dataset's ``pad``: 64 and 8 for ``tinyimagenet64``) with
zero padding applied to the uint8 image before normalisation (as PIL + ToTensor + Normalize
do), and an independent horizontal flip with probability 1/2 per image. Every random draw comes
from the ``torch.Generator`` passed to :meth:`TensorLoader.batches`, so the data order and the
augmentation of an epoch are a pure function of the run's seed and the epoch number. The last
partial batch is kept (``drop_last=False``, as RepDistiller's DataLoader).

:meth:`TensorLoader.stream` draws a second training stream (an unlabelled split,
``RunSpec.unlabeled``): a given number of full batches per epoch, with the same augmentation.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(padded: Tensor, size: int, dy: Tensor, dx: Tensor) -> Tensor:
    """Crop ``size``×``size`` windows at per-image offsets (dy, dx) from a padded NCHW batch."""
    ar = torch.arange(size, device=padded.device)
    rows = (dy[:, None] + ar)[:, :, None]
    cols = (dx[:, None] + ar)[:, None, :]
    n = torch.arange(padded.shape[0], device=padded.device)[:, None, None]
    return padded[n, :, rows, cols].permute(0, 3, 1, 2)  # advanced dims come first: N,H,W,C


def draw_views(n: int, pad: int, device, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image crop offsets (dy, dx) ∈ [0, 2·pad] and flips (bool), in this order of draws."""
    dy = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    return dy, dx, flip


def apply_views(padded: Tensor, size: int, dy: Tensor, dx: Tensor, flip: Tensor) -> Tensor:
    x = random_crop(padded, size, dy, dx)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def view_id(dy: Tensor, dx: Tensor, flip: Tensor, pad: int) -> Tensor:
    """The view's number in [0, 2·(2·pad+1)²): ((dy·(2·pad+1) + dx)·2 + flip). 162 for pad 4, 578 for pad 8."""
    return (dy * (2 * pad + 1) + dx) * 2 + flip.long()


def view_params(view: Tensor, pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`view_id`: (dy, dx, flip)."""
    side = 2 * pad + 1
    return (view // 2) // side, (view // 2) % side, (view % 2).bool()


def crop_flip(padded: Tensor, size: int, pad: int, generator: torch.Generator | None) -> Tensor:
    return apply_views(padded, size, *draw_views(padded.shape[0], pad, padded.device, generator))


class TensorLoader:
    flip = True  # horizontal flips in training (ShardedTensorLoader makes them optional)

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, batch_size: int,
                 train: bool, device: torch.device | str = "cpu", pad: int = 4):
        self.device = torch.device(device)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.size = x.shape[-1]
        self.pad = pad if train else 0
        self.images = F.pad(x, (self.pad,) * 4) if self.pad else x  # zero padding, uint8
        self.labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.batch_size = batch_size
        self.train = train

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def normalise(self, x_uint8: Tensor) -> Tensor:
        return (x_uint8.float() - self.mean) / self.std

    @property
    def num_views(self) -> int:
        """Distinct augmented views per image: (2·pad+1)² crops × 2 flips (1 without augmentation)."""
        return 2 * (2 * self.pad + 1) ** 2 if self.train else 1

    def batches(self, generator: torch.Generator | None = None, views: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """Yield ``(x, y, index)``; shuffled and augmented when ``train``. With ``views=True``
        also each sample's view id (:func:`view_id`; 0 without augmentation): the random draws
        and the images are the same either way."""
        n = len(self.labels)
        order = torch.randperm(n, device=self.device, generator=generator) if self.train else torch.arange(n, device=self.device)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            raw = self.images[idx]
            view = None
            if self.train:
                dy, dx, flip = self.draws(raw.shape[0], generator)
                raw = apply_views(raw, self.size, dy, dx, flip)
                view = view_id(dy, dx, flip, self.pad) if views else None
            if views:
                yield self.normalise(raw), self.labels[idx], idx, torch.zeros_like(idx) if view is None else view
            else:
                yield self.normalise(raw), self.labels[idx], idx

    def draws(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """The crop offsets and flips of ``n`` training samples (:func:`draw_views`; flips drawn
        but not applied where the dataset has none, so the random stream is the same)."""
        dy, dx, flip = draw_views(n, self.pad, self.device, generator)
        return dy, dx, flip if self.flip else torch.zeros_like(flip)

    def stream(self, steps: int, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``steps`` full augmented batches ``(x, y, index)`` of ``batch_size`` samples: the
        unlabelled stream of an epoch, alongside :meth:`batches` of the labelled loader. A fresh
        permutation per call (per epoch); a split smaller than ``steps·batch_size`` wraps around
        into further permutations, so every batch is full."""
        n, need = len(self.labels), steps * self.batch_size
        order = torch.cat([torch.randperm(n, device=self.device, generator=generator) for _ in range(-(-need // n))])
        for start in range(0, need, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = apply_views(self.images[idx], self.size, *self.draws(idx.shape[0], generator))
            yield self.normalise(x), self.labels[idx], idx

    def view_images(self, index: Tensor, view: Tensor) -> Tensor:
        """The normalised images of samples ``index`` in views ``view`` (what training saw)."""
        raw = self.images[index]
        if self.train:
            raw = apply_views(raw, self.size, *view_params(view, self.pad))
        return self.normalise(raw)
