"""A streaming loader for image-file datasets (ImageNet): JPEGs decoded by worker processes.

The standard ImageNet protocol (torchvision's reference recipe, the one RepDistiller's
``dataset/imagenet.py``, mdistiller and torchdistill use): training images get
``RandomResizedCrop(224)`` (scale 0.08–1, ratio 3/4–4/3) and a horizontal flip with probability
½; test images ``Resize(256)`` (short side) then ``CenterCrop(224)``; then torchvision's
normalisation. The transforms are torchvision's own, on PIL images. Workers send uint8
tensors; normalisation happens on the training device (4× less host→device traffic); it equals
``ToTensor`` + ``Normalize`` up to float rounding.

Determinism: :meth:`StreamingLoader.batches` draws one epoch seed from the engine's generator,
and from it the epoch's permutation; each image's augmentation is seeded by (epoch seed, image
index) inside the worker. So an epoch's data order and crops depend neither on the number of
workers nor on the number of DDP ranks, and a resumed epoch replays exactly.

Under DDP rank r gets its contiguous slice of every global batch (as
:mod:`kdbench.data.sharded`, whose semantics this follows, including dropping a last global
batch smaller than the number of ranks); test sets are sharded contiguously.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from kdbench.data.imagenet import FileImageSet
from kdbench.data.sharded import RankShards, shard_bounds


def default_workers(world_size: int = 1) -> int:
    """``KDBENCH_DATA_WORKERS`` if set, else this job's CPUs shared among the local ranks (≤ 16)."""
    env = os.environ.get("KDBENCH_DATA_WORKERS")
    if env is not None:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, min(16, cpus // max(1, local) - 1))


def sample_seed(epoch_seed: int, index: int) -> int:
    """A 63-bit seed for one image's augmentation in one epoch."""
    return int(np.random.SeedSequence([epoch_seed, index]).generate_state(1, np.uint64)[0]) >> 1


class _Files(Dataset):
    def __init__(self, files: FileImageSet, transform):
        self.paths, self.labels, self.transform = files.paths, files.labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int | None]):
        from torchvision.transforms.functional import pil_to_tensor

        index, seed = key
        with Image.open(self.paths[index]) as im:
            img = im.convert("RGB")
        if seed is None:
            img = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global RNG
                torch.manual_seed(seed)
                img = self.transform(img)
        return pil_to_tensor(img), int(self.labels[index]), index


class _Plan(Sampler):
    """The batches of the coming pass, as lists of (index, augmentation seed); set per epoch."""

    def __init__(self):
        self.batches: list[list[tuple[int, int | None]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamingLoader(RankShards):
    def __init__(self, files: FileImageSet, mean, std, batch_size: int, train: bool, device="cpu",
                 crop: int = 224, resize: int = 256, rank: int = 0, world_size: int = 1, workers: int | None = None):
        import torchvision.transforms as T

        self.check_ranks(batch_size, train, rank, world_size)
        self.files, self.batch_size, self.train = files, batch_size, train
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.labels = torch.as_tensor(files.labels, dtype=torch.long, device=self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        transform = (T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip()]) if train
                     else T.Compose([T.Resize(resize), T.CenterCrop(crop)]))
        self.plan = _Plan()
        workers = default_workers(world_size) if workers is None else workers
        self.loader = DataLoader(_Files(files, transform), batch_sampler=self.plan, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers > 0 else None)

    def _make_plan(self, generator: torch.Generator | None) -> list[list[tuple[int, int | None]]]:
        n = len(self.files)
        if not self.train:
            lo, hi = shard_bounds(n, self.rank, self.world_size)
            return [[(i, None) for i in range(s, min(s + self.batch_size, hi))] for s in range(lo, hi, self.batch_size)]
        dev = generator.device if generator is not None else torch.device("cpu")
        epoch_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=dev))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        plan = []
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            if len(idx) < self.world_size:
                continue
            lo, hi = shard_bounds(len(idx), self.rank, self.world_size)
            plan.append([(i, sample_seed(epoch_seed, i)) for i in idx[lo:hi]])
        return plan

    def batches(self, generator: torch.Generator | None = None, views: bool = False) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield ``(x, y, index)`` on the device, normalised; augmented and shuffled when ``train``."""
        if views:
            raise ValueError("streamed datasets have no finite set of augmented views (RandomResizedCrop): "
                             "run without execution.teacher_cache")
        self.plan.batches = self._make_plan(generator)
        for x, y, idx in self.loader:
            x = x.to(self.device, non_blocking=True)
            yield ((x.float() - self.mean) / self.std, y.to(self.device, non_blocking=True),
                   idx.to(self.device, non_blocking=True))
