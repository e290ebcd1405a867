"""``kdbench bench``'s arguments, built without torch (``kdbench bench --help`` answers at once);
what it measures and how: :mod:`kdbench.commands.bench`."""

from __future__ import annotations

import argparse

from kdbench.commands.cli import device_argument

#: the engine's execution configs a bench measures (:func:`kdbench.commands.bench.config_execution`)
CONFIGS = ("plain", "fast", "fast+cache")


def parser() -> argparse.ArgumentParser:
    """``kdbench bench``'s arguments (their checks: :func:`kdbench.commands.bench.main`)."""
    p = argparse.ArgumentParser(
        prog="kdbench bench",
        description="Whole runs and steady-state steps of a RepDistiller-style training loop vs kdbench's engine, "
                    "and a packed grid vs the same runs one after another, on one device, on CIFAR-shaped synthetic "
                    "data; every figure median [min–max] over repeats, with the device name.")
    pair = lambda s: tuple(s.split(","))  # noqa: E731
    names = lambda s: s.split(",")  # noqa: E731
    device_argument(p, "auto")
    p.add_argument("--pair", type=pair, help="TEACHER,STUDENT architectures (default resnet32x4,resnet8x4)")
    p.add_argument("--methods", type=names, help="distillation methods, comma-separated (default kd,crd)")
    p.add_argument("--nce-k", type=int, default=16384, help="CRD's negatives (default 16384, RepDistiller's; the "
                   "data is sized for it)")
    p.add_argument("--epochs", type=int, help="epochs of every run (default 2 on GPU, 1 on CPU)")
    p.add_argument("--epoch-steps", type=int, help="steps of each epoch (default warmup + steps + 1)")
    p.add_argument("--steps", type=int, help="timed steps of epoch 1 (default 200 on GPU, 1 on CPU, where a resnet32x4 step takes ~3 s)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (default 20 on GPU, 1 on CPU)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64, RepDistiller's)")
    p.add_argument("--workers", type=int, help="reference DataLoader workers (default 8 on GPU, 2 on CPU)")
    p.add_argument("--images", type=int, help="training images (default 50000 on GPU and at least what CRD's "
                   "nce_k and the epochs need)")
    p.add_argument("--configs", type=names,
                   help=f"engine configs, comma-separated from {', '.join(CONFIGS)} (default all on GPU, plain on CPU; "
                        "fast = bf16 + channels_last + CUDA graphs on GPU, channels_last on CPU)")
    p.add_argument("--compile", choices=["none", "graph", "compile"], help="override the fast configs' compile mode")
    p.add_argument("--pack", type=int, help="runs in the grid (default 12 on GPU, 3 on CPU; 0: no grid)")
    p.add_argument("--grid-pair", type=pair, help="TEACHER,STUDENT of the grid (default --pair on GPU, "
                   "resnet20,resnet8 on CPU, where a resnet32x4 step takes seconds)")
    p.add_argument("--pack-config", choices=CONFIGS, help="engine config of the grid (default fast on GPU, plain on CPU)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="measure the packed grid only without horizontal fusion (by default also fused when the "
                        "student is fusable: resnet, wrn, vgg)")
    p.add_argument("--grid-methods", type=names, help="methods the grid cycles through (default: the first of --methods)")
    p.add_argument("--repeat", type=int, help="repeats of every measurement, round-robin (default 3)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: bf16 dense peak by device name)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print nothing (use with --json)")
    return p
