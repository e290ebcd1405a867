"""Data-parallel training (DDP) and the job launcher for the Snakemake rules.

**Training under DDP.** ``torchrun --nproc_per_node N -m kdbench.cli train-teacher|distill ...``
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

**Launching a run** (what rule ``fit`` runs): ``python -m kdbench.engine.distributed --gpus G
-- <kdbench subcommand and args>``. On a machine the job shares with others (no scheduler set
``CUDA_VISIBLE_DEVICES``), it claims G free GPUs with lock files, so concurrent Snakemake jobs never
share a GPU, and sets ``CUDA_VISIBLE_DEVICES``. With G > 1 it starts ``torchrun --standalone
--nproc_per_node G``; otherwise it runs the command in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the launcher must start fast
    import torch
    from torch import nn


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

    from ..models.features import Features

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


# ---------------------------------------------------------------- job resources (rule fit)

#: GPU-seconds per training sample and epoch, including the teacher's forward and the test pass —
#: generous figures for the slowest pairs (ResNet50 / wrn_40_2 teachers at 32 px on a V100-class GPU;
#: ImageNet ResNet-34 → ResNet-18 at ~600 images/s per GPU)
SECONDS_PER_SAMPLE = {"small": 6e-4, "streaming": 1.7e-3}
DEFAULT_DDP_PROCS = 4  # ImageNet: 4 GPUs × 64 images = the recipe's global batch of 256


def job_resources(run, suite_config: dict, config: dict | None = None) -> dict:
    """What one run asks the scheduler for: ``gpus`` (= ``gpu``, the SLURM plugin's name),
    ``nproc`` (processes torchrun starts), ``threads``, ``mem_mb`` and ``runtime`` (minutes).

    Streamed datasets (ImageNet) train with DDP on ``config["ddp_procs"]`` processes (default 4;
    each gets 8 CPU threads for JPEG decoding); every other run is one process with one GPU (none
    when the suite's device is ``cpu``). The runtime is an upper estimate from the epochs and the
    training-set size (a run killed at its time limit resumes from its checkpoint when resubmitted,
    e.g. with Snakemake's ``--retries``). Needs no data: sizes are the official ones, or the
    synthetic set's.

    ``run`` may be a list: a pack (``kdbench pack``, one process on one device). It asks for one
    run's GPU and threads, 500 MB more memory per further run (its student, optimiser state and
    teacher copy; the data is loaded once), and the sum of the runs' runtimes — packing's speed-up
    is not measured on a GPU yet, so the sum is the upper estimate — capped at 24 h: a pack killed
    at its limit is resubmitted and every run resumes from its checkpoint."""
    from ..data import DATASETS

    if isinstance(run, (list, tuple)):
        each = [job_resources(r, suite_config, config) for r in run]
        if any(e["nproc"] > 1 for e in each):
            raise ValueError("a pack trains in one process: runs that need DDP (streamed datasets) cannot be packed")
        return {**each[0], "mem_mb": max(e["mem_mb"] for e in each) + 500 * (len(each) - 1),
                "runtime": min(15 + sum(e["runtime"] - 15 for e in each), 24 * 60)}
    config = config or {}
    spec = run.spec
    info = DATASETS.get(spec.dataset)
    cpu = suite_config.get("device", "auto") == "cpu"
    synthetic = (suite_config.get("datasets", {}).get(spec.dataset) or {}).get("synthetic")
    n_train = synthetic["classes"] * synthetic["train_per_class"] if synthetic else info.train_size
    nproc = int(config.get("ddp_procs", 1 if cpu else DEFAULT_DDP_PROCS)) if info.streaming else 1
    gpus = 0 if cpu else nproc
    threads = 8 * nproc if info.streaming else int(suite_config.get("threads", 1))
    epochs = spec.recipe.epochs + 30  # + a two-stage method's initialisation stage
    cost = SECONDS_PER_SAMPLE["streaming" if info.streaming else "small"]
    runtime = int(1.5 * epochs * n_train * cost / nproc / 60) + 15
    if info.streaming:
        mem_mb = 12000 + 12000 * nproc  # decoding workers hold the file list
    else:  # the uint8 dataset (padded) plus PyTorch
        mem_mb = 6000 + int(n_train * info.image_size ** 2 * 3 * 2 / 1e6)
    return {"gpus": gpus, "gpu": gpus, "nproc": nproc, "threads": threads, "mem_mb": mem_mb, "runtime": runtime}


# ---------------------------------------------------------------- launcher (rule fit)

def _lock_dir() -> Path:
    d = Path(os.environ.get("KDBENCH_GPU_LOCKS", Path(os.environ.get("TMPDIR", "/tmp")) / f"kdbench-gpu-locks-{os.getuid()}"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def claim_gpus(n: int, total: int, poll_s: float = 5.0, timeout_s: float | None = None) -> list[int]:
    """Lock ``n`` of the ``total`` GPUs (``flock`` on one file per GPU, held until this process and
    what it execs exit); wait while fewer are free. Returns the GPU indices."""
    import fcntl

    if n > total:
        raise SystemExit(f"this run needs {n} GPUs but the machine has {total}")
    start, warned = time.time(), False
    while True:
        held = []
        for i in range(total):
            fd = os.open(_lock_dir() / f"gpu{i}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.set_inheritable(fd, True)
            held.append((i, fd))
            if len(held) == n:
                return [i for i, _ in held]
        for _, fd in held:
            os.close(fd)
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"no {n} free GPUs within {timeout_s} s")
        if not warned:
            print(f"kdbench: waiting for {n} free GPU(s) of {total} (locks in {_lock_dir()})", file=sys.stderr)
            warned = True
        time.sleep(poll_s)


def launch_command(nproc: int, cmd: list[str]) -> list[str]:
    """The command that runs ``kdbench <cmd>`` on ``nproc`` processes."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "kdbench.cli", "--", *cmd]  # "--": torchrun would take --run for its --run-path
    return [sys.executable, "-m", "kdbench.cli", *cmd]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kdbench.engine.distributed",
        description="Run a kdbench subcommand on G GPUs: claim free GPUs (when no scheduler assigned them) and start "
                    "one process per GPU with torchrun when G > 1.",
        epilog="Example: python -m kdbench.engine.distributed --gpus 4 -- distill --suite S --run R")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for this run (0: CPU only, no claim)")
    p.add_argument("--nproc", type=int, help="processes (default: --gpus, at least 1)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the kdbench subcommand and its arguments")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("give the kdbench subcommand after --")
    nproc = a.nproc or max(1, a.gpus)
    env = dict(os.environ)
    if a.gpus > 0 and "CUDA_VISIBLE_DEVICES" not in env:
        import torch
        total = torch.cuda.device_count()
        if total:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, claim_gpus(a.gpus, total)))
    full = launch_command(nproc, cmd)
    os.execvpe(full[0], full, env)  # the claimed locks' descriptors stay open in the new image


if __name__ == "__main__":
    sys.exit(main())
