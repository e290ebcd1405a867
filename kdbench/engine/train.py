"""The training loop shared by teachers, students and every distillation method.

One function, :func:`fit`, trains ``spec.student`` with ``spec.method`` and writes into the run
directory: ``checkpoint.pt`` after every epoch (a killed run resumes from it and ends with the
same metrics as an uninterrupted one), then ``model.pt`` and ``metrics.json`` (atomically).
Inside an epoch there is no host synchronisation: losses and accuracies accumulate on the
device and are read once per epoch. A non-finite loss ends the run with ``status: failed``.

**Unlabelled stream** (``RunSpec.unlabeled``, FKD's STL-10 protocol: "batch 512 for the KD terms
(uses the unlabelled split) vs 64 for CE"). Each main-stage step draws the labelled batch as
usual and ``batch_size`` images of ``split`` (:meth:`~kdbench.data.loader.TensorLoader.stream`:
the same crop + flip, from its own generator ``derive_seed(seed, "unlabeled", stage, epoch)``, so
a resumed run replays exactly). An epoch stays one pass over the labelled set; the unlabelled
stream takes a fresh permutation per epoch and one batch per step, wrapping around if the split
is too small. The student runs ONE forward pass over the concatenation [labelled; unlabelled]
(``bn: joint``, the default: one BN batch, as when a single loader yields mixed batches; ``bn:
separate`` runs one pass per part). CE reads the labelled part, the distillation terms the
unlabelled part (``terms_on: unlabeled``) or both (``all``); the teacher sees only the images the
terms read. Loss and train_acc in the curve are per labelled sample, as without the stream.
Refused (:func:`check_unlabeled`): methods whose terms need labels or training-set indices
(CRD, DKD, KDA) or have an initialisation stage (AB, FT, FSP), methods without terms, packing,
DDP, and rounded teacher caches (the exact ``fp32`` cache is skipped: it covers the labelled
training set only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..data import TensorLoader, check_stream_split, holdout_split, load_dataset, load_stream
from ..methods import Batch, MethodContext, Objective, resolve_method
from ..methods.base import label_free_methods
from ..models import build_model, feature_shapes
from . import distributed, run_folder
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_teacher, read_file, save_model
from .fast import Runtime, StudentStep, TeacherRequest, set_train_modes, step_names
from .optim import SGD
from .io import atomic_torch_save, atomic_write_json, data_fingerprint, file_sha256, provenance, read_json
from .seeding import derive_seed, generator
from .spec import RunSpec


class NonFiniteLoss(RuntimeError):
    pass


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def topk_hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits] of a batch, as a float64 device tensor (top-k ≤ classes)."""
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(1).sum()]).double()


@torch.no_grad()
def evaluate(model: nn.Module, loader: TensorLoader) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` in eval mode."""
    was = model.training
    model.eval()
    sums = torch.zeros(3, device=loader.device, dtype=torch.float64)
    for x, y, _ in loader.batches():
        logits = model(x).logits.float()
        sums += torch.cat([topk_hits(logits, y), nn.functional.cross_entropy(logits, y, reduction="sum").double()[None]])
    model.train(was)
    top1, top5, loss = (distributed.all_reduce_sum(sums) / loader.num_samples).tolist()
    return {"top1": 100 * top1, "top5": 100 * top5, "loss": loss}


def _epoch(student: nn.Module, teacher: nn.Module | None, objective: Objective, optimizer,
           loader: TensorLoader, gen: torch.Generator, epoch: int, init_term=None, lr_at=None,
           runtime: Runtime | None = None, fused: bool = False, stream=None, train_modules=None):
    """One pass over the training set; returns per-sample means of every loss term.

    A generator: for each step that needs the teacher it yields a :class:`TeacherRequest` and is
    sent back the teacher's Features (``drive`` answers with a forward pass or the teacher cache;
    ``pack.py`` with one forward pass for several runs). The step itself is
    ``fast.train_step``, executed as ``runtime`` says (eager by default). With ``fused`` (packed
    runs whose students are fused, ``pack.py``) it yields a :class:`StudentStep` for every step
    instead, and the driver takes the step. ``lr_at(progress)``, if given, sets the lr before
    each step (per-step schedules). ``stream``: the epoch's unlabelled batches (``RunSpec.unlabeled``),
    one appended to each labelled batch (see the module docstring). ``train_modules``: in an
    initialisation stage, the term's :meth:`~kdbench.methods.DistillLoss.init_train_modules`
    (the only modules in training mode); such a stage is not fused unless the whole student
    trains (a fused BN has one mode for all its members)."""
    set_train_modes(student, objective, train_modules)
    fused = fused and (train_modules is None or any(m is student for m in train_modules))
    runtime = runtime or Runtime(device=loader.device)
    names = step_names(objective, init_term)
    sums = torch.zeros(len(names) + 1, device=loader.device, dtype=torch.float64)
    step = None if fused else runtime.stepper(student, objective, optimizer, names, sums, epoch, gen, init_term)
    batches = loader.batches(gen, views=True) if runtime.needs_views else ((*b, None) for b in loader.batches(gen))
    for i, (x, y, idx, view) in enumerate(batches):
        if lr_at is not None:
            optimizer.lr = lr_at(i / len(loader))
        labeled = None
        if stream is not None:
            xu, yu, iu = next(stream)
            labeled = x.shape[0]
            x, y, idx = torch.cat([x, xu]), torch.cat([y, yu]), torch.cat([idx, iu])
        x = runtime.input(x)
        batch = Batch(x, y, idx, epoch, gen, labeled)
        part = objective.terms_part(batch)  # what the terms read: the teacher sees only those images
        request = TeacherRequest(x[part], idx[part], view, teacher, runtime) if teacher is not None else None
        if fused:
            yield StudentStep(request, batch, student, objective, optimizer, init_term, names, sums, runtime)
            continue
        step(x, y, idx, (yield request) if request is not None else None, labeled)
    distributed.sync_buffers(student)  # DDP: every rank takes rank 0's BN statistics
    out = (distributed.all_reduce_sum(sums) / loader.num_samples).tolist()  # the epoch's one host sync
    stats = dict(zip(names, out[:-1]))
    stats["train_acc"] = 100 * out[-1]
    if not all(map(math.isfinite, out)):
        raise NonFiniteLoss(f"non-finite loss in epoch {epoch}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return stats


def check_unlabeled(spec: RunSpec) -> None:
    """Refuse, before any data is read, a run whose unlabelled stream (``spec.unlabeled``) cannot
    work; a suite can call it when it is loaded. DDP and packing are refused where they start."""
    if spec.unlabeled is None:
        return
    problem = resolve_method(spec.method, spec.method_overrides).unlabeled_problem()
    if problem:
        raise ValueError(f"method {spec.method!r} cannot take an unlabelled stream (unlabeled: {spec.unlabeled}): "
                         f"{problem}. Methods that can: {', '.join(label_free_methods())}")
    if spec.protocol != "fit":
        raise ValueError(f"unlabeled applies to protocol 'fit' runs, not {spec.protocol!r}")
    check_stream_split(spec.dataset, spec.unlabeled["split"])
    if spec.execution.teacher_cache not in ("none", "fp32"):
        raise ValueError(f"execution.teacher_cache {spec.execution.teacher_cache!r} does not apply to a run with an "
                         f"unlabelled stream (the cache holds the labelled training set's teacher outputs); use 'none'")


def failed_teacher(spec: RunSpec) -> str | None:
    """Why a teacher run of ``spec`` failed (``teacher <run> failed: <reason>``), or None."""
    return failed_source(spec.teacher_ckpts, "teacher")


def failed_source(models, role: str) -> str | None:
    """Why the run that makes one of ``models`` failed (``<role> <run> failed: <reason>``), or None.
    A run's ``model.pt`` sits beside its metrics.json; a failed run has no model.pt, so the runs
    that read it are failed runs too, saying why, and the tables still count them."""
    for path in models:
        m = read_json(Path(path).parent / "metrics.json") if Path(path).name == "model.pt" else None
        if m is not None and m.get("status") == "failed":
            return f"{role} {m.get('run') or Path(path).parent} failed: {m.get('failure')}"
    return None


def check_synthetic_data(spec: RunSpec) -> None:
    """Synthetic data on disk must be what the run's suite declares (``RunSpec.data_id``): two suites
    that share a root with different ``synthetic:`` settings would otherwise train on each other's."""
    from ..data.synthetic_files import MARKER
    from .spec import _digest

    if not (spec.data_id or "").startswith("synthetic:"):
        return
    marker = Path(spec.data_root) / MARKER
    record = read_json(marker)
    if record is None or "synthetic:" + _digest(record) != spec.data_id:
        raise ValueError(f"{marker}: the synthetic data in {spec.data_root} was generated with other settings "
                         f"({record}) than this run's suite declares (data id {spec.data_id}); two suites share this "
                         f"root with different `synthetic:` settings. Give each suite its own root, or regenerate the "
                         f"data with `kdbench make-data --suite SUITE --dataset {spec.dataset}`")


def resumable(ckpt_path: Path, recorded: dict | None, now: dict) -> bool:
    """Whether a checkpoint may be resumed by a run reading ``now`` (its ``read`` record).

    Other data under the same run id is refused: the data changed under the run (real data is
    identified by its name, see :func:`kdbench.engine.spec.dataset_identity`). Another teacher file
    means the teacher was made again (a deleted teacher run retrained, on a GPU not bit for bit):
    Snakemake reruns the student for that reason, so it restarts from its first epoch (False) instead
    of mixing two teachers in one run."""
    if recorded is None:  # a checkpoint written before kdbench recorded its inputs
        return True
    if recorded.get("data") != now["data"]:
        raise CheckpointError(f"{ckpt_path}: was trained on other data than this run reads now (dataset fingerprint "
                              f"{recorded.get('data')} vs {now['data']}): the data changed under the run. Delete "
                              f"{ckpt_path.parent} to train this run afresh on the data there now")
    if recorded.get("teachers") != now["teachers"]:
        print(f"kdbench: {ckpt_path} was trained against another teacher file (SHA-256 {recorded.get('teachers')} vs "
              f"{now['teachers']}): the teacher was made again, so this run restarts from its first epoch",
              file=sys.stderr, flush=True)
        return False
    return True


def _sgd(params, lr: float, recipe) -> SGD:
    return SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def fit(spec: RunSpec, out_dir: str | Path, device: str = "auto", run_id: str | None = None,
        progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """Train one run to completion (resuming if a checkpoint exists) and return its metrics.

    ``stop_after_epochs`` stops after that many epochs of this invocation (for tests of resume).
    """
    if spec.protocol == "linear_probe":
        from .linear_probe import fit_probe
        failure = failed_source([spec.init_ckpt], "probed model")
        if failure is not None:
            metrics = run_record(spec, {"curve": []}, "failed", failure, run_id, None, 0.0,
                                 provenance(resolve_device(device)))
            atomic_write_json(Path(out_dir) / "metrics.json", metrics)
            return metrics
        return fit_probe(spec, out_dir, device=device, run_id=run_id, progress=progress)
    return drive(fit_steps(spec, out_dir, device, run_id, progress, stop_after_epochs))


def drive(steps) -> dict:
    """Run a :func:`fit_steps` generator alone, answering its teacher requests; its metrics."""
    try:
        request = next(steps)
        while True:
            request = steps.send(request.runtime.teacher_features(request.teacher, [request])[0])
    except StopIteration as done:
        return done.value


def fit_steps(spec: RunSpec, out_dir: str | Path, device: str = "auto", run_id: str | None = None,
              progress: bool = True, stop_after_epochs: int | None = None, shared: dict | None = None):
    """:func:`_fit_steps` holding the run folder (:func:`kdbench.engine.run_folder.claim`: one
    writer at a time, a killed writer's temporary files removed); under torchrun rank 0 holds it."""
    # under torchrun rank 0 holds the folder; every rank reads the same files, so all take one path
    with run_folder.claim(out_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        done = finished_run(out_dir, spec)
        if done is not None:  # another process finished it while this one waited (or earlier)
            print(f"kdbench: {run_id or out_dir} is already finished ({Path(out_dir) / 'metrics.json'}); nothing to do",
                  file=sys.stderr, flush=True)
            return done
        return (yield from _fit_steps(spec, out_dir, device, run_id, progress, stop_after_epochs, shared))


def finished_run(out_dir: str | Path, spec: RunSpec) -> dict | None:
    """The metrics of a finished run of ``spec`` in ``out_dir`` (metrics.json of this run's hash, with
    its model.pt when it succeeded), or None. Snakemake deletes a job's outputs before rerunning it,
    so this is a run another process finished while this one waited for the folder."""
    m = read_json(Path(out_dir) / "metrics.json")
    if m is None or m.get("hash") != spec.config_hash() or m.get("status") not in ("ok", "failed"):
        return None
    return m if m["status"] == "failed" or (Path(out_dir) / "model.pt").is_file() else None


def _fit_steps(spec: RunSpec, out_dir: str | Path, device: str = "auto", run_id: str | None = None,
               progress: bool = True, stop_after_epochs: int | None = None, shared: dict | None = None):
    """:func:`fit` as a generator of :class:`TeacherRequest` (see :func:`_epoch`) returning the
    metrics: :func:`drive` runs one, ``pack.py`` several in lockstep. ``shared`` may hold the
    ``data`` and ``loaders`` that several packed runs share, and ``fuse: True`` to yield a
    :class:`StudentStep` per step (``pack.py`` fuses the students)."""
    shared = shared or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dctx = distributed.init(resolve_device(device))  # torchrun: this rank's process group and device
    dev = dctx.device
    recipe = spec.recipe
    check_unlabeled(spec)
    if spec.unlabeled is not None and dctx.enabled:
        raise ValueError("an unlabelled stream (unlabeled) is not supported under DDP (torchrun): run it on one device")
    failure = failed_teacher(spec)
    if failure is not None:  # its students are failed runs too, and the tables count them
        metrics = run_record(spec, {"curve": []}, "failed", failure, run_id, None, 0.0, provenance(dev))
        if dctx.is_main:
            atomic_write_json(out / "metrics.json", metrics)
        return metrics
    check_synthetic_data(spec)
    data = shared.get("data") or load_dataset(spec.dataset, spec.data_root)
    if spec.validation is not None:  # train on the rest of the training set, evaluate on its holdout (not the test set)
        if shared.get("data") or shared.get("loaders"):
            raise ValueError("a run with a validation holdout (validation) cannot share loaders (kdbench pack): run it alone")
        data = holdout_split(data, spec.validation["size"], spec.validation["seed"])
    train_loader, test_loader = shared.get("loaders") or data.loaders(recipe.batch_size, recipe.test_batch_size, dev,
                                                                      **dctx.loader_kwargs())
    unl = spec.unlabeled
    unlabeled = None if unl is None else load_stream(spec.dataset, spec.data_root, unl["split"], unl["batch_size"], dev)

    torch.manual_seed(derive_seed(spec.seed, "init"))
    student = build_model(spec.student, data.num_classes).to(dev)
    method_probe = resolve_method(spec.method, spec.method_overrides)
    teacher = None
    if method_probe.needs_teacher:
        if not spec.teacher_ckpts:
            raise ValueError(f"method {spec.method!r} needs a teacher: give teacher checkpoint(s)")
        cross = spec.teacher_dataset not in (None, spec.dataset)
        if cross and "logits" in method_probe.teacher_needs:
            raise ValueError(f"method {spec.method!r} reads the teacher's logits, but the teacher was trained on "
                             f"{spec.teacher_dataset} and the student on {spec.dataset}: the label spaces differ")
        if len(spec.teacher_ckpts) > 1 and method_probe.teacher_needs & {"stages", "preact"}:
            raise ValueError(f"method {spec.method!r} reads the teacher's stage features, which a teacher ensemble "
                             f"does not have")
        teacher = load_teacher(spec.teacher_ckpts, spec.teacher, None if cross else data.num_classes, dev)
    size = data.info.image_size
    ctx = MethodContext(feature_shapes(student, size), feature_shapes(teacher, size) if teacher is not None else None,
                        data.num_classes, train_loader.labels, spec.student, spec.teacher)
    objective = Objective(method_probe, ctx, unl).to(dev)
    base_lr = recipe.base_lr(spec.student)
    optimizer = _sgd(list(student.parameters()) + list(objective.parameters()), base_lr, recipe)
    runtime = Runtime(spec.execution, dev)  # the fast path's options (kdbench/engine/fast.py)
    runtime.prepare(student, teacher, objective)
    execution_used = spec.execution
    if unl is None:
        runtime.attach_cache(teacher, objective, train_loader)
    elif spec.execution.teacher_cache != "none":
        warnings.warn("execution.teacher_cache skipped: the exact cache holds the labelled training set's teacher "
                      "outputs, and this run's terms read unlabelled images")
        execution_used = dataclasses.replace(spec.execution, teacher_cache="none")

    stages = [(f"init:{n}", t, t.init_epochs) for n, t in objective.terms.items() if t.init_epochs > 0]
    stages.append(("main", None, recipe.epochs))
    model = distributed.wrap(student, find_unused=len(stages) > 1)  # DDP-wrapped under torchrun
    state = {"stage": 0, "epoch": 0, "curve": [], "init_curve": [], "elapsed": 0.0, "started": time.time(),
             "epoch_seconds": {}}
    init_opt = None
    read = {"data": data_fingerprint(data),  # what this run reads, recorded and checked on resume
            "teachers": [file_sha256(p) for p in spec.teacher_ckpts] if teacher is not None else []}
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ck = read_file(ckpt_path, CHECKPOINT_FORMAT)
        if ck["hash"] != spec.config_hash():
            raise CheckpointError(f"{ckpt_path}: belongs to run config {ck['hash']}, not {spec.config_hash()}; "
                                  f"delete it to start this run afresh")
    if ckpt_path.exists() and resumable(ckpt_path, ck.get("read"), read):
        student.load_state_dict(ck["student"])
        objective.load_state_dict(ck["objective"])
        optimizer.load_state_dict(ck["optimizer"])
        state = {"epoch_seconds": {}, **ck["state"]}  # checkpoints from before epoch timing have none
        if ck.get("init_optimizer") is not None:
            init_opt = ck["init_optimizer"]

    prov = provenance(dev)
    prov["world_size"] = dctx.world_size  # DDP processes (per-rank BN batches change results)
    t0 = time.time() - state["elapsed"]
    done_now = 0
    status, failure = "ok", None
    bar = _progress(progress and dctx.is_main, spec, stages, state)
    try:
        for si in range(state["stage"], len(stages)):
            name, term, n_epochs = stages[si]
            opt = optimizer
            if term is not None:
                opt = _sgd(list(term.init_parameters(student)), term.init_lr(base_lr), recipe)
                if init_opt is not None and state["stage"] == si:
                    opt.load_state_dict(init_opt)
            for epoch in range(state["epoch"] + 1, n_epochs + 1):
                if term is None:
                    opt.lr = recipe.lr_at(epoch, spec.student)
                t_epoch = time.time()
                torch.manual_seed(derive_seed(spec.seed, "global", name, epoch))
                gen = generator(dev, derive_seed(spec.seed, "data", name, epoch))
                per_step = None
                if term is None and recipe.schedule != "step":
                    per_step = lambda progress, e=epoch: recipe.lr_at(e, spec.student, progress)  # noqa: E731
                stream = None
                if unlabeled and term is None:
                    stream = unlabeled.stream(len(train_loader),
                                              generator(dev, derive_seed(spec.seed, "unlabeled", name, epoch)))
                stats = yield from _epoch(model, teacher, objective, opt, train_loader, gen, epoch, term, per_step, runtime,
                                          fused=shared.get("fuse", False), stream=stream,
                                          train_modules=None if term is None else term.init_train_modules(student))
                stats = {"epoch": epoch, "lr": opt.lr, **stats}
                if term is None:
                    objective.on_epoch_end(epoch)
                    test = evaluate(student, test_loader)
                    stats.update(test_acc=test["top1"], test_acc5=test["top5"], test_loss=test["loss"])
                    state["curve"].append(stats)
                else:
                    state["init_curve"].append({"stage": name, **stats})
                state["epoch_seconds"].setdefault(name, []).append(time.time() - t_epoch)
                state["epoch"] = epoch
                state["elapsed"] = time.time() - t0
                if dctx.is_main:  # DDP: rank 0 writes
                    atomic_torch_save(ckpt_path, {
                        "format": CHECKPOINT_FORMAT, "hash": spec.config_hash(), "state": state, "read": read,
                        "student": _own(student.state_dict()), "objective": objective.state_dict(),
                        "optimizer": optimizer.state_dict(), "init_optimizer": opt.state_dict() if term is not None else None})
                bar.update(1)
                bar.set_postfix_str(f"{name} ep{epoch} " + (f"acc {stats['test_acc']:.2f}" if term is None else f"loss {stats['loss']:.4f}"))
                done_now += 1
                if stop_after_epochs is not None and done_now >= stop_after_epochs:
                    return {"status": "stopped", "state": state}
            state["stage"], state["epoch"], init_opt = si + 1, 0, None
    except NonFiniteLoss as e:
        status, failure = "failed", str(e)
    finally:
        bar.close()

    metrics = run_record(spec, state, status, failure, run_id, data.num_classes, time.time() - t0, prov,
                         loss=objective.spec.describe(), resolved_method=_method_dict(objective),
                         **used_record(spec, objective, execution_used, optimizer),
                         **({"unlabeled_samples": unlabeled.num_samples} if unlabeled else {}),
                         eval_split="test" if spec.validation is None else "validation", eval_samples=test_loader.num_samples,
                         data_fingerprint=read["data"], teacher_sha256=read["teachers"],
                         **({"holdout": {**spec.validation, "train_samples": train_loader.num_samples}} if spec.validation else {}))
    if status == "ok" and dctx.is_main:
        save_model(out / "model.pt", student, spec.student, data.num_classes, spec.dataset,
                   run=run_id, acc_last=metrics["acc_last"], hash=spec.config_hash(), data_fingerprint=read["data"])
    if dctx.is_main:
        atomic_write_json(out / "metrics.json", metrics)
    distributed.close()
    return metrics


def _own(state: dict) -> dict:
    """Tensors with their own storage: a fused packed student's tensors are views of the fused
    model's, and ``torch.save`` writes a view's whole storage."""
    return {k: v.clone() for k, v in state.items()}


def _method_dict(objective: Objective) -> dict:
    s = objective.spec
    return {"name": s.name, "ce": s.ce, "terms": s.terms, "params": s.params}


def used_record(spec: RunSpec, objective: Objective, execution, optimizer: SGD) -> dict:
    """What the run used where it differs from what was asked, for metrics.json: ``used`` holds the
    terms' parameters as they ran (a term that changes one at run time reports it from
    ``used_params()``, e.g. CRD's nce_k), the execution options as they ran and the SGD kernel;
    ``changed_at_run_time`` lists each ``term.param`` / ``execution.option`` whose used value is
    not the requested one, as {requested, used}."""
    requested = objective.spec.params
    params = {name: {**requested.get(name, {}), **getattr(term, "used_params", dict)()}
              for name, term in objective.terms.items()}
    changed = {f"{t}.{k}": {"requested": requested.get(t, {}).get(k), "used": v}
               for t, p in params.items() for k, v in p.items() if requested.get(t, {}).get(k) != v}
    asked, ran = dataclasses.asdict(spec.execution), dataclasses.asdict(execution)
    changed.update({f"execution.{k}": {"requested": asked[k], "used": ran[k]} for k in asked if asked[k] != ran[k]})
    return {"used": {"params": params, "execution": ran, "sgd_kernel": optimizer.kernel},
            "changed_at_run_time": changed}


def run_record(spec: RunSpec, state: dict, status: str, failure: str | None, run_id: str | None,
               num_classes: int, wall_time_s: float, prov: dict, **extra) -> dict:
    """The content of a run's metrics.json: results, the resolved spec, curves and provenance.
    ``epoch_seconds``: wall seconds of each epoch per stage (``main``, ``init:<term>``; training and
    evaluation), kept apart from the curve so that curves stay exactly reproducible;
    ``seconds_per_epoch``: their mean over the main stage."""
    metrics = summarise(state["curve"])
    seconds = state.get("epoch_seconds", {})
    main = seconds.get("main", [])
    metrics.update(status=status, failure=failure, run=run_id, hash=spec.config_hash(), seed=spec.seed,
                   dataset=spec.dataset, teacher=spec.teacher, student=spec.student, method=spec.method,
                   num_classes=num_classes, spec=spec.to_dict(), **extra, wall_time_s=wall_time_s,
                   seconds_per_epoch=sum(main) / len(main) if main else None, epoch_seconds=seconds,
                   provenance=prov, curve=state["curve"], init_curve=state.get("init_curve", []))
    return metrics


def summarise(curve: list[dict]) -> dict:
    """Last-epoch (CRD/RepDistiller's statistic) and best-epoch (mdistiller's) test accuracy."""
    if not curve:
        return {"acc_last": None, "acc5_last": None, "acc_best": None, "epoch_best": None, "epochs_done": 0}
    best = max(curve, key=lambda r: r["test_acc"])
    last = curve[-1]
    return {"acc_last": last["test_acc"], "acc5_last": last["test_acc5"], "acc_best": best["test_acc"],
            "acc5_best": best["test_acc5"], "epoch_best": best["epoch"], "epochs_done": len(curve)}


def _progress(enabled: bool, spec: RunSpec, stages, state):
    from tqdm.auto import tqdm

    total = sum(n for _, _, n in stages)
    done = sum(n for _, _, n in stages[:state["stage"]]) + state["epoch"]
    return tqdm(total=total, initial=done, disable=not enabled, desc=f"{spec.method} {spec.student} s{spec.seed}",
                unit="ep", dynamic_ncols=True)
