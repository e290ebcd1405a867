"""The exact teacher-output cache: the frozen teacher's outputs for every augmented view.

RepDistiller's augmentation has finitely many views per image: a 32×32 crop at one of
(2·4+1)² = 81 offsets of the zero-padded image, flipped or not — 162 views; in general
2·(2·pad+1)² (``TensorLoader.num_views``): 578 for Tiny-ImageNet at 64 px (pad 8), where a
ResNet34 teacher's table (100,000 images × 578 views × 712 values) is 165 GB in fp32. The teacher
is frozen and in eval mode, so its output for a view does not depend on the step, the batch, the
student, the method or the seed. For methods whose terms read only the teacher's ``logits`` and
``pooled`` (``Objective.teacher_needs ⊆ {logits, pooled}``: KD, DKD, CRD, RKD, PKT, CC, KDA, FKD,
REMD/IPOT on pooled features...), the teacher's forward pass can be computed once for all
N×views (sample, view) pairs and looked up by the loader's view id in every run that shares the
teacher — any method, any seed.

Choices:

- One table per teacher holds ``logits`` and ``pooled`` (and, for an ensemble, every member's
  ``logits``/``pooled``, which FKD reads), so KD and CRD runs share one cache. Memory:
  N·162·(C + D)·bytes — CIFAR-100 with resnet32x4 (C 100, D 256): 11.5 GB in fp32, 5.8 GB in
  bf16/fp16. The table lives on the training device.
- Storage dtype ``fp32`` (default) keeps the outputs as the teacher computed them; lookups return
  each field in the dtype the teacher produced (bf16 under bf16 autocast — the upcast to fp32 and
  back is exact). ``bf16``/``fp16`` storage rounds them, so it enters the run hash
  (``Execution.hashed``).
- The build runs the teacher under the run's precision (fp32 or bf16 autocast) and memory
  format, in batches of ``build_batch`` views. Eval-mode outputs are per-sample, so they equal the
  online forward up to the floating-point rounding of a different batch size (convolution
  algorithms are chosen per shape); the tests measure this on CPU.
- The cache key is a SHA-256 of the teacher's weights and buffers, the training images, the
  normalisation, the padding, the precision and the storage dtype — never a path, so a renamed
  file is found again and a changed teacher is never served stale outputs. Caches are shared
  within a process (a dict) and, with ``execution.cache_dir``, between processes (one file per
  key, written atomically; ``torch.load(mmap=True)`` to read).
"""

from __future__ import annotations

import hashlib
import weakref
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.core.io import atomic_torch_save

CACHE_FORMAT = "kdbench-teacher-cache/1"
CACHEABLE = frozenset({"logits", "pooled"})
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MEMO: dict[str, "TeacherCache"] = {}
_DATA: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # loader -> digest of its images


def cacheable(teacher_needs: frozenset[str]) -> bool:
    """Whether a method reading these teacher fields can be served from the cache."""
    return bool(teacher_needs) and teacher_needs <= CACHEABLE


class TeacherCache:
    """``table[i, v]`` = the teacher's flattened outputs for sample ``i`` in view ``v``."""

    def __init__(self, table: Tensor, layout: list[tuple[str, int, torch.dtype]], key: str = ""):
        self.table, self.layout, self.key = table, layout, key
        self.members = sum(name.endswith(".logits") for name, _, _ in layout)

    @property
    def num_samples(self) -> int:
        return self.table.shape[0]

    @property
    def num_views(self) -> int:
        return self.table.shape[1]

    def lookup(self, index: Tensor, view: Tensor) -> Features:
        """The teacher's Features for samples ``index`` seen in views ``view`` (no host sync)."""
        rows = self.table[index, view]
        parts = {name: part.to(dtype) for (name, _, dtype), part
                 in zip(self.layout, rows.split([w for _, w, _ in self.layout], dim=1))}
        members = [Features([], [], parts[f"m{i}.pooled"], parts[f"m{i}.logits"]) for i in range(self.members)]
        return Features([], [], parts["pooled"], parts["logits"], members=members or None)

    # --- building, saving, loading ---
    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, loader, dtype: str = "fp32", autocast: Callable = nullcontext,
              prepare_input: Callable[[Tensor], Tensor] = lambda x: x, build_batch: int = 1024,
              key: str = "") -> "TeacherCache":
        if dtype not in DTYPES:
            raise ValueError(f"teacher cache dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        if not hasattr(loader, "view_images"):
            raise ValueError("the teacher cache needs a device-resident TensorLoader (finite crop+flip views); "
                             f"{type(loader).__name__} has none — run without execution.teacher_cache")
        was = teacher.training
        teacher.eval()
        n, v, dev = len(loader.labels), loader.num_views, loader.device  # every sample, not the ones one epoch uses
        table, layout = None, None
        try:
            for view in range(v):
                for start in range(0, n, build_batch):
                    idx = torch.arange(start, min(start + build_batch, n), device=dev)
                    with autocast():
                        out = teacher(prepare_input(loader.view_images(idx, torch.full_like(idx, view))))
                    fields = _fields(out)
                    if table is None:
                        layout = [(name, t.shape[1], t.dtype) for name, t in fields]
                        table = torch.empty(n, v, sum(w for _, w, _ in layout), dtype=DTYPES[dtype], device=dev)
                    table[idx, view] = torch.cat([t.float() for _, t in fields], dim=1).to(table.dtype)
        finally:
            teacher.train(was)
        return cls(table, layout, key)

    def save(self, path: str | Path) -> None:
        atomic_torch_save(path, {"format": CACHE_FORMAT, "key": self.key, "table": self.table.cpu(),
                                 "layout": [(name, w, str(d).removeprefix("torch.")) for name, w, d in self.layout]})

    @classmethod
    def load(cls, path: str | Path, device) -> "TeacherCache | None":
        """The cache in ``path``, or None if it is unreadable or not a cache (it is then rebuilt)."""
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return None
        if not isinstance(obj, dict) or obj.get("format") != CACHE_FORMAT:
            return None
        layout = [(name, int(w), getattr(torch, d)) for name, w, d in obj["layout"]]
        return cls(obj["table"].to(device), layout, obj["key"])


def _fields(out: Features) -> list[tuple[str, Tensor]]:
    fields = [("logits", out.logits), ("pooled", out.pooled.flatten(1))]
    for i, m in enumerate(out.members or []):
        fields += [(f"m{i}.logits", m.logits), (f"m{i}.pooled", m.pooled.flatten(1))]
    return fields


def cache_key(teacher: nn.Module, loader, precision: str, dtype: str) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}|{precision}|{dtype}|{_data_digest(loader)}".encode())
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _data_digest(loader) -> str:
    """SHA-256 of the training images, normalisation and padding (memoised per loader: the
    images are hundreds of MB)."""
    if loader not in _DATA:
        h = hashlib.sha256(f"pad{loader.pad}|size{loader.size}".encode())
        for t in (loader.images, loader.mean, loader.std):
            h.update(t.contiguous().cpu().numpy().tobytes())
        _DATA[loader] = h.hexdigest()
    return _DATA[loader]


def get_cache(teacher: nn.Module, loader, precision: str = "fp32", dtype: str = "fp32", cache_dir: str | None = None,
              autocast: Callable = nullcontext, prepare_input: Callable[[Tensor], Tensor] = lambda x: x,
              build_batch: int | None = None) -> TeacherCache:
    """The cache for ``teacher`` on ``loader``'s training set: from this process, from
    ``cache_dir``, or built (and saved to ``cache_dir``)."""
    key = cache_key(teacher, loader, precision, dtype)
    if key in _MEMO:
        return _MEMO[key]
    path = Path(cache_dir) / f"teacher-{key}.pt" if cache_dir else None
    cache = TeacherCache.load(path, loader.device) if path is not None and path.is_file() else None
    if cache is None or cache.key != key:
        batch = build_batch or (1024 if loader.device.type == "cuda" else 256)
        cache = TeacherCache.build(teacher, loader, dtype, autocast, prepare_input, batch, key)
        if path is not None:
            cache.save(path)
    _MEMO[key] = cache
    return cache


def clear_memo() -> None:
    """Forget the caches held by this process (frees their device memory)."""
    _MEMO.clear()
