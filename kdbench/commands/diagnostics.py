"""``kdbench kernel-gap``: how much of its teacher's kernel a trained student did not pick up.

KDA (Qian, Li & Hu, arXiv 2009.14416 v1, Fig. 3) plots the untransferred kernel fraction
‖K_S − K_T‖_F / ‖K_T‖_F (:mod:`kdbench.stats.kernels`) of the layer before the last FC
(``pooled``) and after it (``logits``). This command computes both for one run against its
teacher(s) over the run's whole test set, with both models in eval mode, and also records the
test accuracy of the teacher — for several teachers, of the ensemble by averaged probabilities
(FKD Fig. 4's "teacher ensemble") — and of the student (a check against ``acc_last``).

Choices where the paper is silent: the kernels are uncentred linear kernels over the full
test set (the paper does not name the sample set); for a teacher ensemble K_T is the mean of
the members' kernels (as FKD's ensemble kernel), for the logits as for the pooled features.
A run that failed (no model) gives a record with ``status: skipped`` and the reason, so the
tables show the run's failure instead of the pipeline stopping.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _model_file(path: str) -> Path:
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p


def _status(run_dir: Path) -> tuple[str, dict | None]:
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"no readable metrics.json ({type(e).__name__})", None
    return m.get("status", "unknown"), m


def _teacher_outputs(teachers: list[str], loader, num_classes: int, dev) -> list[tuple]:
    """Per test batch: the teachers' pooled and logit features (concatenated, 1/√E-scaled, so
    their linear kernel is the mean of the members' kernels) and the (ensemble's) top-1/top-5 hits.
    Called under ``torch.no_grad()`` (:func:`diagnose`)."""
    import torch

    from kdbench.engine.step import topk_hits
    from kdbench.engine.teachers import load_teacher

    teacher = load_teacher(tuple(str(_model_file(t)) for t in teachers), None, None, dev)
    out = []
    for x, y, _ in loader.batches():
        t = teacher(x)
        members = t.members or [t]
        scale = 1 / math.sqrt(len(members))
        hits = topk_hits(t.logits.float(), y) if t.logits.shape[1] == num_classes else None
        out.append((torch.cat([m.pooled for m in members], 1) * scale, torch.cat([m.logits for m in members], 1) * scale, hits))
    return out


def diagnose(run_dir: str | Path, teachers: list[str], device: str = "cpu", batch_size: int = 256,
             cache: dict | None = None) -> dict:
    """Kernel gaps (pooled, logits) and accuracies of the run in ``run_dir`` vs ``teachers``
    (run folders or model files). Reads the run's dataset and root from its metrics.json;
    ``cache`` keeps loaded datasets and teacher outputs across calls. torch is imported here, not
    with the module: ``kdbench kernel-gap --help`` answers without it."""
    import torch
    with torch.no_grad():
        return _diagnose(Path(run_dir), teachers, device, batch_size, cache)


def _diagnose(run_dir: Path, teachers: list[str], device: str, batch_size: int, cache: dict | None) -> dict:
    import torch

    from kdbench.data import load_dataset
    from kdbench.engine.checkpoint import load_model
    from kdbench.engine.device import resolve_device
    from kdbench.core.spec import RunSpec
    from kdbench.engine.step import topk_hits
    from kdbench.stats.kernels import KernelGap

    record = {"run": str(run_dir), "teachers": list(teachers)}
    status, metrics = _status(run_dir)
    if status != "ok":
        return {**record, "status": "skipped", "reason": f"run status: {status}"}
    for t in teachers:
        if Path(t).is_dir() and _status(Path(t))[0] != "ok":
            return {**record, "status": "skipped", "reason": f"teacher {t} status: {_status(Path(t))[0]}"}
    spec = RunSpec.from_dict(metrics["spec"])
    dev = resolve_device(device)
    cache = {} if cache is None else cache
    key = (spec.dataset, spec.data_root, batch_size, str(dev))
    if key not in cache:
        cache[key] = load_dataset(spec.dataset, spec.data_root)
    data = cache[key]
    _, loader = data.loaders(batch_size, batch_size, dev)
    tkey = (key, tuple(teachers))
    if tkey not in cache:
        cache[tkey] = _teacher_outputs(teachers, loader, data.num_classes, dev)
    student = load_model(_model_file(str(run_dir)), spec.student, data.num_classes, dev).eval()
    gaps = {"pooled": KernelGap(), "logits": KernelGap()}
    hits = {"student": torch.zeros(2, dtype=torch.float64, device=dev), "teacher": torch.zeros(2, dtype=torch.float64, device=dev)}
    same_labels = True  # a teacher of another label space (cross-dataset) has no accuracy here
    for (x, y, _), (t_pooled, t_logits, t_hits) in zip(loader.batches(), cache[tkey]):
        s = student(x)
        gaps["pooled"].update(s.pooled, t_pooled)
        gaps["logits"].update(s.logits, t_logits)
        hits["student"] += topk_hits(s.logits.float(), y)
        same_labels = t_hits is not None
        if same_labels:
            hits["teacher"] += t_hits
    n = loader.num_samples
    top = {k: (100 * v / n).tolist() for k, v in hits.items()}
    return {**record, "status": "ok", "dataset": spec.dataset, "n_samples": n,
            "kernel_gap": {k: g.fraction() for k, g in gaps.items()},
            "student": {"top1": top["student"][0], "top5": top["student"][1]},
            "teacher": {"members": len(teachers), "top1": top["teacher"][0] if same_labels else None,
                        "top5": top["teacher"][1] if same_labels else None}}


def _write(rec: dict, out: str | None) -> None:
    text = json.dumps(rec, indent=1)
    if out:
        from kdbench.core.io import atomic_write_bytes
        atomic_write_bytes(out, text.encode())
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kdbench kernel-gap",
        description="Untransferred kernel fraction ||K_S-K_T||_F/||K_T||_F of a run's student vs its teacher(s) "
                    "on the test set, before the last FC (pooled features) and after it (logits), plus the "
                    "teacher's (ensemble's) test accuracy. Writes one JSON record per run; with --suite, every "
                    "record the suite's paper tables read (runs/<run>/diagnostics-<key>.json), in one process.")
    p.add_argument("run", nargs="?", help="the student's run folder (runs/<run id>) holding metrics.json and model.pt")
    p.add_argument("--teacher", action="append", help="a teacher run folder or model file; repeat for an ensemble")
    p.add_argument("--suite", help="instead of RUN: write every kernel-gap record of this suite's paper tables")
    p.add_argument("--table", action="append", help="with --suite: only the records of this paper table (repeatable)")
    p.add_argument("--out", help="write the JSON record here (default: print it)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, default=256, help="test batch size (does not change the result)")
    args = p.parse_args(argv)
    if (args.suite is None) == (args.run is None) or (args.run and not args.teacher):
        p.error("give either RUN with --teacher (one record) or --suite (every record of a suite)")
    from kdbench.engine.checkpoint import CheckpointError
    from kdbench.planning.suite import SuiteError
    try:
        if args.run:
            _write(diagnose(args.run, args.teacher, args.device, args.batch_size), args.out)
            return 0
        from kdbench.report.paper_tables import diagnostic_targets
        from kdbench.planning.suite import load_suite
        suite, cache = load_suite(args.suite), {}
        for path, (run, teachers) in diagnostic_targets(suite, args.table).items():
            rec = diagnose(suite.run_dir(run), teachers, args.device, args.batch_size, cache)
            _write(rec, path)
            print(f"{path}: {rec['status']}", file=sys.stderr)
    except (CheckpointError, FileNotFoundError, ValueError, SuiteError) as e:
        print(f"kdbench kernel-gap: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
