"""Which device a run trains on, and a loud failure when it asked for a GPU that is not there.

A run asks for a GPU when its device is ``cuda``/``cuda:N``, or when its device is ``auto`` and
the environment variable ``KDBENCH_REQUIRE_GPU=1`` is set (the workflow sets it for the jobs it
gives a GPU). Such a run that finds no GPU stops at once with :class:`NoGpuError` — the torch
build, its CUDA version and what to check — instead of training for hours on the CPU. An explicit
``cpu`` is honoured whatever the environment says. ``auto`` prints the device it chose (one line
on stderr).
"""

from __future__ import annotations

import os
import sys

import torch

REQUIRE_GPU = "KDBENCH_REQUIRE_GPU"


class NoGpuError(RuntimeError):
    """A run that asked for a GPU sees none; the message says why and what to do."""


def resolve_device(device: str = "auto", say: bool = True) -> torch.device:
    """The torch device for ``device`` (auto | cpu | cuda | cuda:N); see the module docstring."""
    required = device.startswith("cuda") or (device == "auto" and os.environ.get(REQUIRE_GPU) == "1")
    if required and not torch.cuda.is_available():
        raise NoGpuError(no_gpu_message(device))
    if device != "auto":
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise NoGpuError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) are visible "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1} or cuda")
        return chosen
    chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if say:
        name = torch.cuda.get_device_name(chosen) if chosen.type == "cuda" else "no GPU visible"
        print(f"kdbench: device auto -> {chosen} ({name})", file=sys.stderr, flush=True)
    return chosen


def no_gpu_message(device: str) -> str:
    why = f"device {device!r}" if device != "auto" else f"{REQUIRE_GPU}=1 (the workflow gave this job a GPU)"
    head = f"this run asked for a GPU ({why}) but torch sees none. "
    if torch.version.cuda is None:
        return head + (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): install a CUDA "
                       f"build of the same version, e.g. `pip install torch=={torch.__version__.split('+')[0]} "
                       f"--index-url https://download.pytorch.org/whl/cu128`, or run with device cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    return head + (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES={visible}. "
                   f"Run `nvidia-smi` on this node: no GPU listed means the job was not given one (check the "
                   f"scheduler's GPU request); a GPU listed means its driver is older than CUDA "
                   f"{torch.version.cuda} needs (update the driver or install a torch build for an older CUDA)")
