"""Model files and resumable training checkpoints, checked on load."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import torch
from torch import nn

from kdbench.core.io import atomic_torch_save

MODEL_FORMAT = "kdbench-model/1"
CHECKPOINT_FORMAT = "kdbench-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint or model file that cannot be used; the message says why and what to do."""


def read_file(path: str | Path, fmt: str) -> dict:
    """A kdbench file's content, after checking every record of the archive against its CRC-32
    (``torch.load`` does not: a garbled byte inside a tensor would load silently). The check reads
    the file once more, at disk speed (zlib's CRC-32 runs at GB/s)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    damage = archive_damage(path)
    try:
        obj = None if damage else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, pickled code...
        damage = f"{type(e).__name__}: {e}"
    if damage:
        raise CheckpointError(f"{path}: cannot be read ({damage}). The file is corrupt or not a {fmt} file; "
                              f"{repair_hint(path, fmt)}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a {fmt} file, found {found!r}. Published teacher checkpoints are "
                              f"imported with `kdbench import-teacher`.")
    return obj


def archive_damage(path: Path) -> str | None:
    """Why ``path`` is not an intact zip archive (torch.save's format), or None."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        return f"not an intact archive: {type(e).__name__}: {e}"
    return f"record {bad} fails its CRC-32 check" if bad else None


def repair_hint(path: Path, fmt: str) -> str:
    """What to do about a damaged file: the fix depends on what makes it."""
    if fmt == CHECKPOINT_FORMAT:
        return "delete it and rerun the run's job: the run restarts from its first epoch"
    if (path.parent / "metrics.json").exists():  # a run's model.pt: snakemake reruns a run only without its metrics.json
        return (f"delete the run's folder {path.parent} and rerun snakemake: it retrains that run, then the runs "
                f"that read its model")
    return ("replace it: an imported teacher is made again with `kdbench import-teacher SOURCE "
            f"{path}`; a model.pt outside a run folder by the command that wrote it")


def save_model(path: str | Path, model: nn.Module, arch: str, num_classes: int, dataset: str, **meta) -> None:
    # a copy even on CPU: a fused packed student's tensors are views, and torch.save writes a view's whole storage
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    atomic_torch_save(path, {"format": MODEL_FORMAT, "arch": arch, "num_classes": num_classes,
                             "dataset": dataset, "state_dict": state, "meta": meta})


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               device: torch.device | str = "cpu") -> nn.Module:
    """Build the file's architecture and load its weights; refuse any mismatch."""
    from kdbench.models import build_model

    obj = read_file(path, MODEL_FORMAT)
    if arch is not None and obj["arch"] != arch:
        raise CheckpointError(f"{path}: holds a {obj['arch']!r} model, but {arch!r} was expected")
    if num_classes is not None and obj["num_classes"] != num_classes:
        raise CheckpointError(f"{path}: has {obj['num_classes']} classes, but the dataset has {num_classes}")
    model = build_model(obj["arch"], obj["num_classes"])
    load_state_checked(model, obj["state_dict"], path)
    return model.to(device)


def load_state_checked(model: nn.Module, state: dict, source) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        def cut(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        raise CheckpointError(f"{source}: weights do not match the architecture — missing keys: {cut(missing) or 'none'}; "
                              f"unexpected keys: {cut(unexpected) or 'none'}; shape mismatches: {cut(shapes) or 'none'}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: non-finite values in {', '.join(bad[:5])}")
    model.load_state_dict(state)
