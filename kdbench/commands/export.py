"""``kdbench export``: a trained run's model as a RepDistiller-style checkpoint.

The file is ``torch.save({'model': state_dict, 'epoch': epochs trained, 'accuracy': last test
top-1})``, as RepDistiller's ``train_teacher.py`` saves, so RepDistiller (and mdistiller) load it
with ``model = model_dict[arch](num_classes=N); model.load_state_dict(torch.load(f)['model'])``.
kdbench's CIFAR zoo keeps RepDistiller's module names, so the keys are the same, except
RepDistiller's MobileNetV2, whose classifier is wrapped in a Sequential (``classifier.0.*``): the
inverse of what ``kdbench import-teacher`` maps (:func:`kdbench.teachers.imported.normalise_keys`).
The architecture name is the run's (RepDistiller's ``model_dict`` name for the CIFAR zoo).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: kdbench architecture -> RepDistiller key prefix renames
SEQUENTIAL_CLASSIFIER = {"MobileNetV2": ("classifier.", "classifier.0.")}


def repdistiller_state(arch: str, state: dict) -> dict:
    """The state dict with RepDistiller's key names for ``arch``."""
    old, new = SEQUENTIAL_CLASSIFIER.get(arch, (None, None))
    if old is None:
        return dict(state)
    return {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}


def export_run(run_dir: str | Path, out: str | Path) -> dict:
    """Write ``run_dir``'s model as a RepDistiller checkpoint at ``out``; return what was written."""
    from kdbench.core.io import atomic_torch_save
    from kdbench.engine.checkpoint import MODEL_FORMAT, read_file

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file() or not (run_dir / "model.pt").is_file():
        raise SystemExit(f"kdbench export: {run_dir} has no finished run (metrics.json and model.pt); train it first")
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("status") != "ok":
        raise SystemExit(f"kdbench export: {run_dir} did not finish ok (status {metrics.get('status')!r}): nothing to export")
    model = read_file(run_dir / "model.pt", MODEL_FORMAT)
    ckpt = {"model": repdistiller_state(model["arch"], model["state_dict"]), "epoch": metrics["epochs_done"],
            "accuracy": metrics["acc_last"]}
    atomic_torch_save(out, ckpt)  # whole or not at all: a kill or a full disk leaves the previous export
    return {"arch": model["arch"], "num_classes": model["num_classes"], "epoch": ckpt["epoch"],
            "accuracy": ckpt["accuracy"], "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kdbench export", description="Write a trained run's model as a "
                                "RepDistiller-style checkpoint ({'model', 'epoch', 'accuracy'}).")
    p.add_argument("--suite", required=True, help="suite YAML file")
    p.add_argument("--run", required=True, help="run id, as printed by `kdbench list-runs`")
    p.add_argument("--out", required=True, help="output .pth file, e.g. save/models/resnet8_kd/ckpt_epoch_240.pth")
    a = p.parse_args(argv)
    from kdbench.core.io import OutputError, remove_stale_temporaries
    from kdbench.planning.suite import load_suite

    remove_stale_temporaries(a.out)  # what a killed export left
    suite = load_suite(a.suite)
    if a.run not in suite.runs:
        p.error(f"run {a.run!r} is not in {a.suite}; `kdbench list-runs --suite {a.suite}` lists them")
    try:
        print(json.dumps(export_run(suite.run_dir(a.run), a.out)))
    except OutputError as e:
        print(f"kdbench export: error: {e}", file=sys.stderr)
        return 2
    return 0
