"""The job launcher and the scheduler's job sizes for the Snakemake rules.

**Launching a run** (what rules ``fit`` and ``pack_<id>`` run): ``python -m kdbench.planning.launch --gpus G
[--nproc N] -- <kdbench subcommand and args>``. On a machine the job shares with others (no
scheduler set ``CUDA_VISIBLE_DEVICES``), it claims G free GPUs with lock files, so concurrent
Snakemake jobs never share a GPU, and sets ``CUDA_VISIBLE_DEVICES``. With N > 1 it starts
``torchrun --standalone --nproc_per_node N``; otherwise it runs the command in-process.

**Job sizes**: :func:`job_resources` says what one run (or one pack) asks the scheduler for.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kdbench.core.distributed import NO_DDP

# ---------------------------------------------------------------- job resources (rule fit)

#: GPU-seconds per training sample and epoch, including the teacher's forward and the test pass —
#: generous figures for the slowest pairs (ResNet50 / wrn_40_2 teachers at 32 px on a V100-class GPU;
#: ImageNet ResNet-34 → ResNet-18 at ~600 images/s per GPU)
SECONDS_PER_SAMPLE = {"small": 6e-4, "streaming": 1.7e-3}
DEFAULT_DDP_PROCS = 4  # ImageNet: 4 GPUs × 64 images = the recipe's global batch of 256


DEFAULT_MAX_RUNTIME = 24 * 60  # minutes: the time limit of many clusters' GPU partitions


def max_runtime(config: dict | None) -> int:
    """The partition's time limit in minutes (``--config max_runtime=MIN``, default 24 h)."""
    value = (config or {}).get("max_runtime", DEFAULT_MAX_RUNTIME)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_runtime={value!r}: give the partition's time limit in whole minutes, "
                         f"e.g. --config max_runtime=1440 for 24 h")
    return value


def job_resources(run, suite_config: dict, config: dict | None = None) -> dict:
    """What one run asks the scheduler for, in the SLURM executor plugin's terms: ``gpu`` (sbatch
    ``--gpus``), ``cpus_per_task``, ``mem_mb``, ``runtime`` (minutes, ``-t``) and ``nodes`` (always
    1: torchrun's processes share the node's GPUs); ``threads`` (= ``cpus_per_task``, for local
    scheduling); ``nproc`` (processes torchrun starts) and ``segments`` (submissions the run needs).

    Streamed datasets (ImageNet) train with DDP on ``config["ddp_procs"]`` processes (default 4;
    each gets 8 CPU threads for JPEG decoding); every other run is one process with one GPU (none
    when the suite's device is ``cpu``). The runtime is an upper estimate from the epochs and the
    training-set size. Needs no data: sizes are the official ones, or the synthetic set's.

    **Runtime cap.** An estimate above ``config["max_runtime"]`` (the partition's limit, default
    24 h) is requested as the cap: the job is killed at its limit and resubmitted (rule ``fit``'s
    ``retries`` allow ``segments`` submissions) and resumes from its checkpoint.

    ``run`` may be a list: a pack (``kdbench pack``, one process on one device). It asks for one
    run's GPU and threads, 500 MB more memory per further run (its student, optimiser state and
    teacher copy; the data is loaded once), and the sum of the runs' runtimes — packing's speed-up
    is not measured on a GPU yet, so the sum is the upper estimate — capped as one run is."""
    from kdbench.data import DATASETS

    cap = max_runtime(config)
    if isinstance(run, (list, tuple)):
        each = [job_resources(r, suite_config, config) for r in run]
        if any(e["nproc"] > 1 for e in each):
            raise ValueError(f"runs that need DDP (streamed datasets) cannot be packed: {NO_DDP}")
        estimate = 15 + sum(e["estimate"] - 15 for e in each)
        return {**each[0], "mem_mb": max(e["mem_mb"] for e in each) + 500 * (len(each) - 1),
                **_capped(estimate, cap)}
    config = config or {}
    spec = run.spec
    info = DATASETS.get(spec.dataset)
    cpu = suite_config.get("device", "auto") == "cpu"
    synthetic = (suite_config.get("datasets", {}).get(spec.dataset) or {}).get("synthetic")
    n_train = synthetic["classes"] * synthetic["train_per_class"] if synthetic else info.train_size
    nproc = int(config.get("ddp_procs", 1 if cpu else DEFAULT_DDP_PROCS)) if info.streaming else 1
    gpu = 0 if cpu else nproc
    threads = 8 * nproc if info.streaming else int(suite_config.get("threads", 1))
    epochs = spec.recipe.epochs + 30  # + a two-stage method's initialisation stage
    cost = SECONDS_PER_SAMPLE["streaming" if info.streaming else "small"]
    estimate = int(1.5 * epochs * n_train * cost / nproc / 60) + 15
    if info.streaming:
        mem_mb = 12000 + 12000 * nproc  # decoding workers hold the file list
    else:  # the uint8 dataset (padded) plus PyTorch
        mem_mb = 6000 + int(n_train * info.image_size ** 2 * 3 * 2 / 1e6)
    return {"gpu": gpu, "nproc": nproc, "threads": threads, "cpus_per_task": threads, "mem_mb": mem_mb,
            "nodes": 1, **_capped(estimate, cap)}


def _capped(estimate: int, cap: int) -> dict:
    return {"estimate": estimate, "runtime": min(estimate, cap), "segments": -(-estimate // cap)}


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
                "-m", "kdbench.commands.cli", "--", *cmd]  # "--": torchrun would take --run for its --run-path
    return [sys.executable, "-m", "kdbench.commands.cli", *cmd]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kdbench.planning.launch",
        description="Run a kdbench subcommand on G GPUs: claim free GPUs (when no scheduler assigned them) and start "
                    "one process per GPU with torchrun when G > 1.",
        epilog="Example: python -m kdbench.planning.launch --gpus 4 -- distill --suite S --run R")
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
