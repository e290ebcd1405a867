"""The device-resident loader, sharded across DDP ranks (and with flips optional).

Semantics — what a DDP run with W ranks computes, by construction equal to one process:

* Every rank draws the epoch's permutation and the augmentation of each **global** batch of
  ``batch_size`` samples from the same generator, exactly as :class:`TensorLoader` does in a
  single process; rank r then keeps its contiguous slice ``[r·b/W, (r+1)·b/W)`` of each global
  batch (``b`` = that batch's size; slices differ by at most one sample). So the samples, their
  order and their crops/flips are those of the single-process run with the same seed.
* In training, a final global batch with fewer samples than ranks is dropped (it would leave
  some rank without a step, and every rank must take the same number of DDP steps); that is at
  most W − 1 samples per epoch. ``num_samples`` counts the samples actually used.
* Test loaders shard the whole split contiguously; the engine all-reduces the metric sums.

With ``world_size == 1`` and flips on, the batches are identical to :class:`TensorLoader`'s
(a test checks it).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from kdbench.data.loader import TensorLoader, apply_views, view_id


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice of ``n`` items for ``rank``; sizes differ by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


class RankShards:
    """The batch geometry of a loader sharded over DDP ranks (see the module docstring): the
    global batches of an epoch, this rank's number of steps and the samples used per epoch.
    Needs ``labels``, ``batch_size``, ``train``, ``rank`` and ``world_size``."""

    @staticmethod
    def check_ranks(batch_size: int, train: bool, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if train and batch_size < world_size:
            raise ValueError(f"global batch {batch_size} is smaller than the {world_size} ranks")

    def _global_batches(self) -> list[int]:
        n = len(self.labels)
        sizes = [min(self.batch_size, n - s) for s in range(0, n, self.batch_size)]
        return [b for b in sizes if b >= self.world_size] if self.train else sizes

    def __len__(self) -> int:
        if self.train:
            return len(self._global_batches())
        lo, hi = shard_bounds(len(self.labels), self.rank, self.world_size)
        return -(-(hi - lo) // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all ranks (the divisor of all-reduced sums)."""
        return sum(self._global_batches()) if self.train else len(self.labels)


class ShardedTensorLoader(RankShards, TensorLoader):
    def __init__(self, images, labels, mean, std, batch_size: int, train: bool, device="cpu", pad: int = 4,
                 flip: bool = True, rank: int = 0, world_size: int = 1):
        self.check_ranks(batch_size, train, rank, world_size)
        super().__init__(images, labels, mean, std, batch_size, train, device, pad)
        self.flip, self.rank, self.world_size = flip, rank, world_size

    def batches(self, generator: torch.Generator | None = None, views: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """This rank's ``(x, y, index)`` (and view ids with ``views=True``, as TensorLoader)."""
        n, dev = len(self.labels), self.device
        if not self.train:
            lo, hi = shard_bounds(n, self.rank, self.world_size)
            for start in range(lo, hi, self.batch_size):
                idx = torch.arange(start, min(start + self.batch_size, hi), device=dev)
                out = (self.normalise(self.images[idx]), self.labels[idx], idx)
                yield (*out, torch.zeros_like(idx)) if views else out
            return
        order = torch.randperm(n, device=dev, generator=generator)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            b = idx.shape[0]
            dy, dx, flip = self.draws(b, generator)  # TensorLoader's draws for the global batch
            if b < self.world_size:
                continue
            lo, hi = shard_bounds(b, self.rank, self.world_size)
            mine = idx[lo:hi]
            x = apply_views(self.images[mine], self.size, dy[lo:hi], dx[lo:hi], flip[lo:hi])
            out = (self.normalise(x), self.labels[mine], mine)
            yield (*out, view_id(dy[lo:hi], dx[lo:hi], flip[lo:hi], self.pad)) if views else out
