"""Data-parallel training (DDP): process group, DDP wrapping and the collectives the engine uses.

**Training under DDP.** ``torchrun --nproc_per_node N -m kdbench.commands.cli train-teacher|distill ...``
starts N processes; :func:`init` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and joins
the process group (NCCL on CUDA, one GPU per process = ``cuda:LOCAL_RANK``; gloo on CPU). Then:

* the recipe's ``batch_size`` is the **global** batch: each rank trains on its contiguous
  1/N slice of every global batch, whose samples and augmentation are drawn exactly as in a
  single process (:mod:`kdbench.data.sharded`, :mod:`kdbench.data.stream`); the ImageNet recipe
  (batch 256, lr 0.1) therefore means 256/N images per GPU, with no lr rescaling;
* the student is wrapped in ``DistributedDataParallel`` (gradients averaged over ranks, rank 0's
  buffers broadcast before every forward); the parameters of the distillation objective
  (regressors, embeddings) are averaged by :func:`average_gradients` before each step;
* BatchNorm is per rank (torchvision's reference ImageNet recipe; no SyncBatchNorm), and at the
  end of every epoch every rank takes rank 0's BN statistics, so all ranks evaluate the same model;
* per-epoch loss/accuracy sums and test-set sums are all-reduced (:func:`all_reduce_sum`);
* only rank 0 writes (checkpoint, model file, metrics).

So one DDP step equals, in exact arithmetic, this single-process step (``tests/test_ddp.py`` checks
it numerically with two gloo processes): split the global batch into the N rank slices, run each
slice through the model separately in train mode, average the N slice losses' gradients, take
one SGD step; BN running statistics are those of slice 0. State kept by a distillation term
between steps is global, as in one process: every rank applies the whole global batch's update
to CRD's memory bank (:func:`all_gather_rows`; CRD's own multi-GPU code kept per-GPU banks,
HobbitLong/CMC#5), draws the global batch's negatives from the epoch's generator as one process
does and keeps its own rows, and KDA's centroids are the epoch's class means over all ranks, so
every rank holds the same state (tested with two gloo processes against one process).

**Launching a run** (GPU claims, torchrun, the scheduler's job sizes): :mod:`kdbench.planning.launch`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the launcher must start fast
    import torch
    from torch import nn

#: the one statement of it: every pack (``kdbench pack``) is one process on one device
NO_DDP = "a pack trains its runs in one process on one device, never under DDP (torchrun)"

@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: "torch.device | None" = None
    #: parameters whose gradients DDP already averages (the student's)
    managed: set = field(default_factory=set)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def loader_kwargs(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size} if self.enabled else {}


_CTX = DistContext()


def current() -> DistContext:
    return _CTX


def init(device: torch.device) -> DistContext:
    """Join torchrun's process group if ``WORLD_SIZE`` > 1; return the context (with the device
    this rank trains on). A single process gets a disabled context and ``device`` unchanged."""
    import torch
    import torch.distributed as dist

    global _CTX
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CTX = DistContext(device=device)
        return _CTX
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"process group ({dist.get_rank()}/{dist.get_world_size()}) disagrees with "
                           f"RANK={rank}, WORLD_SIZE={world}")
    _CTX = DistContext(rank, world, local, device)
    return _CTX


def wrap(student: nn.Module, find_unused: bool = False) -> nn.Module:
    """The student as the training loop should call it: DDP-wrapped when distributed (its
    ``Features`` output is passed through DDP as a tuple, so unused outputs are handled)."""
    ctx = _CTX
    if not ctx.enabled:
        return student
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # 1×1 convolutions' gradients come in another stride order than DDP's buckets: harmless
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ctx.managed = {id(p) for p in student.parameters()}
    ddp = DistributedDataParallel(_as_tuple(student), device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                  find_unused_parameters=find_unused)
    return _from_tuple(ddp, student)


def _as_tuple(model):
    from torch import nn

    class AsTuple(nn.Module):
        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, x):
            f = self.model(x)
            return tuple(f.stages), tuple(f.preact), f.pooled, f.logits

    return AsTuple(model)


def _from_tuple(ddp, student):
    """Calls the DDP module and rebuilds :class:`Features`; ``train()``/``eval()`` reach the student."""
    from torch import nn

    from kdbench.core.features import Features

    class FromTuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.ddp = ddp
            self.arch = getattr(student, "arch", None)

        def forward(self, x):
            stages, preact, pooled, logits = self.ddp(x)
            return Features(list(stages), list(preact), pooled, logits)

    return FromTuple()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op in a single process)."""
    if _CTX.enabled:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def all_gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of ``t`` from every rank, concatenated in rank order, and the position of this
    rank's first row in them (a single process: ``t``, 0). Ranks may hold different numbers of
    rows (a global batch's rank slices differ by at most one): the sizes are exchanged first (one
    host synchronisation)."""
    if not _CTX.enabled:
        return t, 0
    import torch
    import torch.distributed as dist

    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(_CTX.world_size)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:k] for p, k in zip(parts, sizes)]), sum(sizes[:_CTX.rank])


def average_gradients(params) -> None:
    """Average over ranks the gradients of parameters DDP does not manage (the objective's).

    A parameter with a gradient on any rank gets one on every rank (zeros where it had none), so
    the optimiser treats it identically everywhere; one without a gradient on every rank keeps none."""
    ctx = _CTX
    if not ctx.enabled:
        return
    import torch
    import torch.distributed as dist

    own = [p for p in params if id(p) not in ctx.managed]
    if not own:
        return
    has = torch.tensor([p.grad is not None for p in own], dtype=torch.float32, device=ctx.device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    used = [p for p, h in zip(own, has.tolist()) if h]
    if not used:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in used])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for p in used:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def sync_buffers(*modules: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics) of ``modules``."""
    if not _CTX.enabled:
        return
    import torch.distributed as dist

    for m in modules:
        for b in m.buffers():
            dist.broadcast(b, 0)


def barrier() -> None:
    if _CTX.enabled:
        import torch.distributed as dist
        dist.barrier()


def close() -> None:
    """Leave the process group (end of a run)."""
    import torch.distributed as dist

    global _CTX
    if _CTX.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _CTX = DistContext()
