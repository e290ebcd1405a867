"""``kdbench import-teacher``: published teacher checkpoints → kdbench model files.

Accepted inputs (detected from the file's content):

* **RepDistiller** ``save/models/<arch>_vanilla/ckpt_epoch_240.pth`` — a dict with ``model`` (the
  state dict) plus ``epoch``/``accuracy``/``optimizer``; the set re-hosted by mdistiller
  (``cifar_teachers.tar``) has the same layout, as do mdistiller's own checkpoints (``best_acc``
  instead of ``accuracy``; a ``student.`` key prefix is mapped). Both scripts set the lr after a
  decay to a ``numpy.float64`` (``lr * decay ** np.sum(...)``) that the saved optimizer state
  keeps, so the weights-only load allows numpy scalars and dtypes, and argparse options
  (:data:`RECORD_GLOBALS`): plain records, no code. Any other object is refused as such, apart
  from truncated files.
* The architecture (when ``--arch`` is not given): the folder name (``<arch>_vanilla``, or
  ``<arch>_<dataset>_lr_...`` as RepDistiller's ``train_teacher.py`` names its runs), else the one
  zoo architecture whose keys and shapes equal the file's; several or none: refused, naming
  ``--arch``.
* **torchvision** ImageNet weights (``resnet34-b627a593.pth``, ``resnet18-f37072fd.pth``, or the
  older ``resnet34-333f7ec4.pth``): a bare state dict, mapped onto ``imagenet_resnet34/18``. When
  the file name carries torchvision's hash suffix, the file's SHA-256 must start with it.

Checks, each refusing the file with a message that says why: readable as a weights-only torch
file; the right kind of content; every key and shape equal to the kdbench architecture's (the
zoo keeps the original module names; a DataParallel ``module.`` prefix and a
Sequential-wrapped ``classifier.0.*`` are mapped); all values finite. With ``--check-data ROOT``
the model is evaluated on the dataset's test split and must be within ``--tolerance`` (default
0.1 points, recipes.md §11) of the published top-1: RepDistiller's README values (recipes.md §3.1)
or torchvision's documented ImageNet accuracy. Where no published value is known (and none is
given with ``--published``) the comparison cannot run: that is an error unless
``--no-published-ok`` is given, and then the report says the check did not run.

The output is a ``kdbench-model/1`` file (:func:`~kdbench.engine.checkpoint.save_model`) whose
``meta`` records the source file, its SHA-256, the format and the accuracies.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from kdbench.engine.checkpoint import MODEL_FORMAT, CheckpointError, load_state_checked, save_model
from kdbench.core.io import file_sha256

#: top-1 % of the published checkpoints on their test sets
PUBLISHED_TOP1 = {
    # RepDistiller README (CIFAR-100 test set, last epoch of 240), recipes.md §3.1
    ("cifar100", "wrn_40_2"): 75.61, ("cifar100", "resnet56"): 72.34, ("cifar100", "resnet110"): 74.31,
    ("cifar100", "resnet32x4"): 79.42, ("cifar100", "vgg13"): 74.64, ("cifar100", "ResNet50"): 79.34,
    # torchvision docs, IMAGENET1K_V1 weights (ImageNet val, resize 256 + centre crop 224)
    ("imagenet", "imagenet_resnet34"): 73.314, ("imagenet", "imagenet_resnet18"): 69.758,
}
FORMATS = ("repdistiller", "torchvision")
TORCHVISION_ARCH = {"resnet18": "imagenet_resnet18", "resnet34": "imagenet_resnet34"}


def _record_globals() -> list:
    """What RepDistiller/mdistiller checkpoints hold beside tensors: numpy scalars (the decayed lr
    in the optimizer state; pickled as ``numpy.core.multiarray.scalar`` by numpy 1 and
    ``numpy._core...`` by numpy 2) with their dtypes, and argparse options. Plain values, no code."""
    import argparse as _argparse

    import numpy as np

    scalar = np.float64(0).__reduce__()[0]
    dtypes = [type(np.dtype(t)) for t in ("f8", "f4", "f2", "i8", "i4", "i2", "i1", "u1", "?")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes, _argparse.Namespace]


RECORD_GLOBALS = _record_globals()


def load_weights_only(path: Path):
    """``torch.load(weights_only=True)`` with :data:`RECORD_GLOBALS` allowed. A file holding any
    other object is refused as such (it is not truncated); a file that cannot be parsed, as
    truncated or corrupt."""
    try:
        with torch.serialization.safe_globals(RECORD_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "WeightsUnpickler" in str(e):
            found = re.search(r"GLOBAL (\S+)|got <class '([^']+)'>", str(e))
            name = next((g for g in found.groups() if g), "?") if found else "?"
            raise CheckpointError(f"{path}: holds an object kdbench does not load ({name}) beside the weights. The file "
                                  f"is complete, but a weights-only load refuses objects that can run code. If you "
                                  f"trust its source, save only its weights and import that file: python -c \"import "
                                  f"torch; c = torch.load('{path}', weights_only=False); torch.save({{'model': "
                                  f"c['model']}}, 'weights.pth')\"") from None
        raise _corrupt(path, e) from None
    except Exception as e:
        raise _corrupt(path, e) from None


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    first = str(e).splitlines()[0] if str(e) else ""
    return CheckpointError(f"{path}: cannot be read as a torch file ({type(e).__name__}: {first}). It is truncated or "
                           f"corrupt: download it again.")


def read_checkpoint(path: Path) -> tuple[str, dict, dict]:
    """(format, state dict, extra info) of a published checkpoint; refuses anything else."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    obj = load_weights_only(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (RepDistiller checkpoint or state dict), found {type(obj).__name__}")
    if obj.get("format") == MODEL_FORMAT:
        raise CheckpointError(f"{path}: is already a {MODEL_FORMAT} file; use it directly")
    if isinstance(obj.get("model"), dict):
        info = {k: _plain(obj[k]) for k in ("epoch", "accuracy", "best_acc") if k in obj}
        return "repdistiller", obj["model"], info
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "torchvision", obj, {}
    raise CheckpointError(f"{path}: neither a RepDistiller checkpoint (a dict with a 'model' state dict) nor a "
                          f"torchvision state dict (tensors only); top-level keys: {sorted(map(str, obj))[:8]}")


def _plain(v):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v.item() if hasattr(v, "item") and getattr(v, "shape", None) == () else v  # numpy scalars


def arch_from_name(path: Path, fmt: str) -> str | None:
    """RepDistiller: the ``<arch>_vanilla`` folder of its released files, or the run folder
    ``<arch>_<dataset>_lr_<lr>_decay_<wd>_trial_<k>`` its ``train_teacher.py`` writes;
    torchvision: the ``resnetNN-<hash>.pth`` name. None when the name names no zoo architecture."""
    from kdbench.models import MODELS

    if fmt == "repdistiller":
        m = re.fullmatch(r"(.+)_vanilla|(.+?)_[A-Za-z0-9]+_lr_.*_decay_.*", path.parent.name)
        name = (m.group(1) or m.group(2)) if m else None
        return name if name in MODELS else None
    m = re.match(r"(resnet\d+)-", path.name)
    return TORCHVISION_ARCH.get(m.group(1)) if m else None


def arch_from_shapes(state: dict) -> list[str]:
    """The zoo architectures whose state-dict keys and shapes equal the file's (the classifier's
    number of rows aside: it is the number of classes)."""
    from kdbench.models import MODELS, build_model

    matches = []
    for arch in MODELS.names():
        model = build_model(arch, 10)
        own = {k: v.shape for k, v in model.state_dict().items()}
        theirs = normalise_keys(state, model)
        cls = classifier_name(model)
        if own.keys() == theirs.keys() and all(theirs[k].shape[1:] == s[1:] if k.startswith(f"{cls}.")
                                               else theirs[k].shape == s for k, s in own.items()):
            matches.append(arch)
    return matches


def infer_arch(path: Path, fmt: str, state: dict) -> str:
    """The architecture from the file's name (:func:`arch_from_name`), else from its shapes."""
    from kdbench.models import MODELS

    named = arch_from_name(path, fmt)
    if named is not None:
        return named
    matches = arch_from_shapes(state)
    if len(matches) == 1:
        return matches[0]
    why = (f"its keys and shapes fit several architectures ({', '.join(matches)})" if matches else
           "its keys and shapes fit no kdbench architecture")
    raise CheckpointError(f"{path}: cannot tell the architecture: its path does not name it and {why}. Pass --arch "
                          f"(one of {', '.join(MODELS.names())})")


def check_hash_suffix(path: Path) -> str:
    """torchvision names files ``<name>-<first hex digits of sha256>.pth``; verify when present."""
    digest = file_sha256(path)
    m = re.search(r"-([a-f0-9]{8,})\.pth?$", path.name)
    if m and not digest.startswith(m.group(1)):
        raise CheckpointError(f"{path}: SHA-256 {digest[:12]}… does not start with the {m.group(1)} in its name; the "
                              f"download is corrupt or altered — download it again")
    return digest


def normalise_keys(state: dict, model: torch.nn.Module) -> dict:
    """Map the originals' key variants onto the model's: DataParallel's ``module.`` prefix,
    mdistiller's ``student.`` (its distiller wrapping the trained model), and a classifier wrapped
    in a Sequential (``classifier.0.weight``, RepDistiller's MobileNetV2)."""
    own = model.state_dict().keys()
    out = {}
    for k, v in state.items():
        k2 = k[len("module."):] if k.startswith("module.") else k
        if k2 not in own and k2.startswith("student.") and k2[len("student."):] in own:  # mdistiller's Vanilla
            k2 = k2[len("student."):]
        if k2 not in own:
            alt = re.sub(r"^(classifier|fc|linear)\.0\.", r"\1.", k2)
            k2 = alt if alt in own else k2
        out[k2] = v
    return out


def classifier_name(model: torch.nn.Module) -> str:
    target = model.classifier
    return next(n for n, m in model.named_modules() if m is target)


def import_teacher(src: str | Path, out: str | Path, arch: str | None = None, dataset: str | None = None,
                   check_data: str | None = None, tolerance: float = 0.1, device: str = "auto",
                   batch_size: int = 256, published: float | None = None, no_published_ok: bool = False,
                   **meta) -> dict:
    """Convert ``src`` into a kdbench model file at ``out``; return what was checked. ``meta``
    (e.g. where a released teacher came from) is recorded in the report and the file."""
    from kdbench.models import MODELS, build_model

    src = Path(src)
    fmt, state, info = read_checkpoint(src)
    digest = check_hash_suffix(src)
    arch = arch or infer_arch(src, fmt, state)
    if arch not in MODELS:
        raise CheckpointError(MODELS.unknown_message(arch))
    dataset = dataset or ("cifar100" if fmt == "repdistiller" else "imagenet")
    published = published if published is not None else PUBLISHED_TOP1.get((dataset, arch))
    if check_data and published is None and not no_published_ok:
        raise CheckpointError(f"{src}: no published top-1 is known for {arch} on {dataset}, so --check-data cannot "
                              f"compare: give the value with --published X, or pass --no-published-ok to import with "
                              f"the accuracy measured but not checked")
    probe = build_model(arch, 10)
    state = normalise_keys(state, probe)
    cls_w = f"{classifier_name(probe)}.weight"
    if cls_w not in state or state[cls_w].dim() != 2:
        raise CheckpointError(f"{src}: no classifier weight {cls_w!r} — not a {arch} checkpoint "
                              f"(keys start {sorted(state)[:4]}); pass the right --arch")
    num_classes = state[cls_w].shape[0]
    model = build_model(arch, num_classes)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    load_state_checked(model, state, f"{src} (as {arch}, {num_classes} classes)")
    report = {"source": str(src), "sha256": digest, "format": fmt, "arch": arch, "num_classes": num_classes,
              "dataset": dataset, "published_top1": published, **meta, **{f"file_{k}": v for k, v in info.items()}}
    report["accuracy_check"] = "not run (no --check-data)"
    if check_data:
        report.update(check_accuracy(model, dataset, check_data, published, tolerance, device, batch_size))
    save_model(out, model, arch, num_classes, dataset, imported=report)
    return report


def check_accuracy(model, dataset: str, root: str, published: float | None, tolerance: float, device: str,
                   batch_size: int) -> dict:
    from kdbench.data import load_dataset
    from kdbench.engine.device import resolve_device
    from kdbench.engine.step import evaluate

    data = load_dataset(dataset, root)
    if data.num_classes != model.classifier.out_features:
        raise CheckpointError(f"the model has {model.classifier.out_features} classes but {dataset} at {root} has "
                              f"{data.num_classes}")
    dev = resolve_device(device)
    _, test = data.loaders(batch_size, batch_size, dev)
    got = evaluate(model.to(dev).eval(), test)
    model.cpu()
    out = {"measured_top1": got["top1"], "measured_top5": got["top5"], "tolerance": tolerance,
           "accuracy_check": "passed" if published is not None else "not run (no published top-1; measured only)"}
    if published is not None and abs(got["top1"] - published) > tolerance:
        raise CheckpointError(f"{model.arch} top-1 on {dataset} test is {got['top1']:.2f}%, published {published:.2f}% "
                              f"(tolerance {tolerance}): the checkpoint does not reproduce its published accuracy, or "
                              f"the dataset at {root} is not the official one")
    return out
