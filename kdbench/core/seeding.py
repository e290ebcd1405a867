"""Seeds. Every random stream of a run is derived from (seed, purpose, stage, epoch), so an
epoch's data order, augmentation and sampling do not depend on what ran before it: a resumed
run replays exactly, and runs of different methods with the same seed see the same data order
and start from the same student initialisation (a paired design)."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys) -> int:
    text = ":".join(map(str, (seed, *keys)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
