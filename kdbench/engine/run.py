"""One training run, and the loop every run goes through (with :mod:`kdbench.engine.step`, the
whole training path: data → step → evaluate → checkpoint).

:func:`loop` is THE sequence of a run's stages, epochs and steps — the loop of RepDistiller's
``train_student.py`` (and mdistiller's ``train()``): for each stage and epoch, set the lr; for each
batch, the teacher's forward pass, then one step; evaluate; checkpoint. It is a generator cut at
each step, so that one run (:func:`train`), a pack of runs in lockstep
(:class:`kdbench.engine.pack.Lockstep`, also what ``kdbench bench`` times) and the linear probe
(:class:`kdbench.engine.linear_probe.ProbeRun`) all go through it. A :class:`TrainingRun` holds what
the loop needs — data, student, teacher,
objective, optimizers, progress — and writes into its folder: ``checkpoint.pt`` after every
epoch (a killed run resumes from it and ends with the same metrics as an uninterrupted one),
then ``model.pt`` and ``metrics.json`` (atomically). Inside an epoch there is no host
synchronisation: losses and accuracies accumulate on the device and are read once per epoch. A
non-finite loss ends the run with ``status: failed``.

How a step executes is the run's ``execution`` (:class:`~kdbench.engine.step.Eager`, or a fast
path of :mod:`kdbench.engine.fast`), not known here.

**Stages.** Methods with an initialisation stage (AB, FT, FSP; FitNet with ``hint_epochs``) train
it first, at a constant lr, with an optimizer over the term's own parameters; the main stage
follows with the recipe's schedule. ``epoch`` counts from 1 within each stage.

**Unlabelled stream** (``RunSpec.unlabeled``, FKD's STL-10 protocol: "batch 512 for the KD terms
(uses the unlabelled split) vs 64 for CE"). Each main-stage step draws the labelled batch as
usual and ``batch_size`` images of ``split`` (:meth:`~kdbench.data.loader.TensorLoader.stream`:
the same crop + flip, from its own generator ``derive_seed(seed, "unlabeled", stage, epoch)``, so
a resumed run replays exactly), appended to the labelled batch (:func:`with_stream`). An epoch
stays one pass over the labelled set; the unlabelled stream takes a fresh permutation per epoch
and one batch per step, wrapping around if the split is too small. The student runs ONE forward
pass over the concatenation [labelled; unlabelled] (``bn: joint``, the default: one BN batch, as
when a single loader yields mixed batches; ``bn: separate`` runs one pass per part). CE reads the
labelled part, the distillation terms the unlabelled part (``terms_on: unlabeled``) or both
(``all``); the teacher sees only the images the terms read. Loss and train_acc in the curve are
per labelled sample, as without the stream. What cannot take a stream is listed in
:func:`kdbench.engine.rules.run_problems`; the exact ``fp32`` teacher cache is skipped (it covers
the labelled training set only).

**Progress**: one line per epoch on stderr (every job log), and tqdm's bar when stderr is a terminal.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch

from kdbench.data import holdout_split, load_dataset, load_stream
from kdbench.methods import Batch, MethodContext, Objective, resolve_method
from kdbench.models import build_model, feature_shapes
from kdbench.core import distributed
from kdbench.engine.checkpoint import CHECKPOINT_FORMAT, CheckpointError, read_file, save_model
from kdbench.core.io import atomic_torch_save, atomic_write_json, data_fingerprint, file_sha256, provenance, read_json
from kdbench.engine.optim import SGD
from kdbench.core.seeding import derive_seed, generator
from kdbench.core.spec import RunSpec
from kdbench.engine.teachers import load_teacher
from kdbench.engine.step import Eager, NonFiniteLoss, TeacherInput, epoch_means, evaluate, set_train_modes, step_names


#: sent to a run's :func:`loop` when the step was taken elsewhere (a pack's fused step)
TAKEN = object()


def loop(run: "TrainingRun", stop_after_epochs: int | None = None):
    """``run`` from where its checkpoint left it to its end, cut at each step: yields each step's
    ``(batch, augmentation view ids or None)`` and is sent the teacher's Features of the batch (then
    it takes the step) or :data:`TAKEN` (the step was taken for it). Returns the run's metrics.
    ``stop_after_epochs``: stop after that many epochs of this call (tests of resume)."""
    try:
        for stage in run.stages_left():
            for epoch in run.epochs_left(stage):
                run.start_epoch(stage, epoch)  # lr, seeds, train modes
                for batch, view in run.batches():
                    t = yield batch, view
                    if t is not TAKEN:
                        run.step(batch, t)
                run.end_epoch()  # metrics, test set, checkpoint, progress line
                if run.epochs_now == stop_after_epochs:
                    return run.stopped()
            run.end_stage(stage)
    except NonFiniteLoss as e:
        return run.finish("failed", str(e))
    finally:
        run.log.close()
    return run.finish()


def train(run: "TrainingRun", stop_after_epochs: int | None = None) -> dict:
    """Train one run through :func:`loop`, the teacher's forward pass answering each step; its metrics."""
    steps = loop(run, stop_after_epochs)
    try:
        request = next(steps)
        while True:
            request = steps.send(run.teacher_outputs(*request))
    except StopIteration as done:
        return done.value


@dataclasses.dataclass(eq=False)
class TrainingStage:
    name: str  # the main stage (TrainingRun.main_stage), or "init:<term>"
    term: object  # the term whose initialisation stage this is (None: the main stage)
    epochs: int


class TrainingRun:
    """A run of ``spec`` in ``out_dir`` on ``dctx.device`` (:func:`kdbench.core.distributed.init`)
    as :func:`loop` trains it, resumed from its checkpoint if there is one
    (:func:`kdbench.engine.fit.prepared` makes it, once :func:`kdbench.engine.rules.check_run` has
    passed). ``execution``: how steps execute (default :class:`~kdbench.engine.step.Eager`).
    ``data`` and ``loaders``: a dataset and loaders shared with other runs (``pack.py``)."""

    #: the name of the stage that trains the recipe's epochs and evaluates each one (it seeds the
    #: data order and augmentation of its epochs: ``derive_seed(seed, "data", name, epoch)``)
    main_stage = "main"

    def __init__(self, spec: RunSpec, out_dir: str | Path, dctx, run_id: str | None = None, execution=None,
                 data=None, loaders=None, progress: bool = True, log_prefix: str = ""):
        self.spec, self.out, self.dctx, self.run_id = spec, Path(out_dir), dctx, run_id
        self.execution = execution or Eager()
        dev = self.device = dctx.device
        check_synthetic_data(spec)
        self.data = data or load_dataset(spec.dataset, spec.data_root)
        if spec.validation is not None:  # train on the rest of the training set, evaluate on its holdout
            self.data = holdout_split(self.data, spec.validation["size"], spec.validation["seed"])
        self.train_loader, self.test_loader = loaders or self.data.loaders(
            spec.recipe.batch_size, spec.recipe.test_batch_size, dev, **dctx.loader_kwargs())
        unl = spec.unlabeled
        self.unlabeled = None if unl is None else load_stream(spec.dataset, spec.data_root, unl["split"],
                                                             unl["batch_size"], dev)
        self._build_models()
        self.stages = [TrainingStage(f"init:{n}", t, t.init_epochs)
                       for n, t in self.objective.terms.items() if t.init_epochs > 0]
        self.stages.append(TrainingStage(self.main_stage, None, spec.recipe.epochs))
        self.model = distributed.wrap(self.student, find_unused=len(self.stages) > 1)  # DDP-wrapped under torchrun
        self.state = {"stage": 0, "epoch": 0, "curve": [], "init_curve": [], "elapsed": 0.0, "started": time.time(),
                      "epoch_seconds": {}}
        self.read = self.inputs()
        self.init_opt_state = None
        self._resume()
        self.prov = provenance(dev)
        self.prov["world_size"] = dctx.world_size  # DDP processes (per-rank BN batches change results)
        self.t0 = time.time() - self.state["elapsed"]
        self.epochs_now = 0
        done = sum(s.epochs for s in self.stages[:self.state["stage"]]) + self.state["epoch"]
        self.log = EpochLog(sum(s.epochs for s in self.stages), done, dctx.is_main, progress and dctx.is_main,
                            log_prefix or run_id or f"{spec.method} {spec.student} s{spec.seed}")
        if done == self.log.total and dctx.is_main:  # e.g. Snakemake removed the metrics.json of a finished run
            self.log.write(f"kdbench: {run_id or self.out} is complete in {self.out / 'checkpoint.pt'}; writing its "
                           f"model.pt and metrics.json from it, without training")

    def inputs(self) -> dict:
        """What this run reads, recorded in its checkpoint and checked on resume (:func:`resumable`)."""
        return {"data": data_fingerprint(self.data),
                "teachers": [file_sha256(p) for p in self.spec.teacher_ckpts] if self.teacher is not None else []}

    def _build_models(self) -> None:
        spec, dev = self.spec, self.device
        torch.manual_seed(derive_seed(spec.seed, "init"))
        self.student = build_model(spec.student, self.data.num_classes).to(dev)
        method = resolve_method(spec.method, spec.method_overrides)
        self.teacher = None
        if method.needs_teacher:
            cross = spec.teacher_dataset not in (None, spec.dataset)
            self.teacher = load_teacher(spec.teacher_ckpts, spec.teacher, None if cross else self.data.num_classes, dev)
        size = self.data.info.image_size
        ctx = MethodContext(feature_shapes(self.student, size),
                            feature_shapes(self.teacher, size) if self.teacher is not None else None,
                            self.data.num_classes, self.train_loader.labels, spec.student, spec.teacher)
        self.objective = Objective(method, ctx, spec.unlabeled).to(dev)
        self.lr_arch = spec.student  # the architecture whose lr the recipe gives (Recipe.lr_at)
        self.base_lr = spec.recipe.base_lr(spec.student)
        self.optimizer = sgd(list(self.student.parameters()) + list(self.objective.parameters()), self.base_lr,
                              spec.recipe)
        self.execution.prepare(self.student, self.teacher, self.objective)
        self.execution_used = spec.execution
        if spec.unlabeled is None:
            self.execution.attach_cache(self.teacher, self.objective, self.train_loader)
        elif spec.execution.teacher_cache != "none":
            warnings.warn("execution.teacher_cache skipped: the exact cache holds the labelled training set's teacher "
                          "outputs, and this run's terms read unlabelled images")
            self.execution_used = dataclasses.replace(spec.execution, teacher_cache="none")

    def _resume(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            return
        ck = read_file(path, CHECKPOINT_FORMAT)
        if ck["hash"] != self.spec.config_hash():
            raise CheckpointError(f"{path}: belongs to run config {ck['hash']}, not {self.spec.config_hash()}; "
                                  f"delete it to start this run afresh")
        if not resumable(path, ck.get("read"), self.read):
            return
        self.student.load_state_dict(ck["student"])
        self.objective.load_state_dict(ck["objective"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.state = {"epoch_seconds": {}, **ck["state"]}  # checkpoints from before epoch timing have none
        self.init_opt_state = ck.get("init_optimizer")

    # ---- the loop's steps, in order
    def stages_left(self) -> list[TrainingStage]:
        return self.stages[self.state["stage"]:]

    def epochs_left(self, stage: TrainingStage) -> range:
        """The stage's epochs still to train; an initialisation stage gets its optimizer here."""
        self.stage, self.opt = stage, self.optimizer
        if stage.term is not None:
            self.opt = sgd(list(stage.term.init_parameters(self.student)), stage.term.init_lr(self.base_lr),
                            self.spec.recipe)
            if self.init_opt_state is not None:  # resumed inside this stage
                self.opt.load_state_dict(self.init_opt_state)
        return range(self.state["epoch"] + 1, stage.epochs + 1)

    def start_epoch(self, stage: TrainingStage, epoch: int) -> None:
        """The epoch's lr, seeds (global RNG, data order and augmentation), train modes and metric sums."""
        spec, dev, term = self.spec, self.device, stage.term
        if term is None:
            self.opt.lr = spec.recipe.lr_at(epoch, self.lr_arch)
        self.epoch, self.t_epoch, self.steps_done = epoch, time.time(), 0
        torch.manual_seed(derive_seed(spec.seed, "global", stage.name, epoch))
        self.gen = generator(dev, derive_seed(spec.seed, "data", stage.name, epoch))
        self.stream = None
        if self.unlabeled is not None and term is None:
            self.stream = self.unlabeled.stream(len(self.train_loader),
                                                generator(dev, derive_seed(spec.seed, "unlabeled", stage.name, epoch)))
        self.train_modules = self.stage_train_modules(term)
        set_train_modes(self.model, self.objective, self.train_modules)
        self.term, self.names = term, step_names(self.objective, term)
        self.sums = torch.zeros(len(self.names) + 1, device=dev, dtype=torch.float64)
        self._step = None

    def stage_train_modules(self, term) -> list | None:
        """The modules in train mode in ``term``'s initialisation stage (None: the main stage, all)."""
        return None if term is None else term.init_train_modules(self.student)

    def batches(self):
        """The epoch's training batches (``Batch``, augmentation view ids or None), in order."""
        batches = ((x, y, idx, view[0] if view else None, None)
                   for x, y, idx, *view in self.train_loader.batches(self.gen, views=self.execution.needs_views))
        if self.stream is not None:
            batches = with_stream(batches, self.stream)
        for x, y, idx, view, labeled in batches:
            yield Batch(self.execution.input(x), y, idx, self.epoch, self.gen, labeled), view

    def teacher_input(self, batch: Batch, view) -> TeacherInput | None:
        """What the teacher sees of ``batch`` (None without a teacher)."""
        if self.teacher is None:
            return None
        part = self.objective.terms_part(batch)  # what the terms read: the teacher sees only those images
        return TeacherInput(batch.x[part], batch.index[part], view)

    def teacher_outputs(self, batch: Batch, view):
        """The teacher's Features of the part of ``batch`` the terms read (None without a teacher)."""
        part = self.teacher_input(batch, view)
        return None if part is None else self.execution.teacher_features(self.teacher, [part])[0]

    def step(self, batch: Batch, t) -> None:
        """One training step (:func:`kdbench.engine.step.train_step`, as the execution runs it)."""
        self.set_step_lr()
        if self._step is None:
            self._step = self.execution.stepper(self.model, self.objective, self.opt, self.names, self.sums,
                                                self.epoch, self.gen, self.term)
        self._step(batch, t)

    def set_step_lr(self) -> None:
        """Per-step schedules (cosine) set the lr before each step; the step schedule per epoch."""
        if self.term is None and self.spec.recipe.schedule != "step":
            self.opt.lr = self.spec.recipe.lr_at(self.epoch, self.lr_arch, self.steps_done / len(self.train_loader))
        self.steps_done += 1

    def fusable(self) -> bool:
        """Whether this epoch's steps may be fused with other runs' (``pack.py``): the whole student
        trains (a fused BN has one mode for all its members)."""
        return self.train_modules is None or any(m is self.model for m in self.train_modules)

    def end_epoch(self) -> None:
        """Read the epoch's metrics, evaluate (main stage), checkpoint and log the epoch."""
        distributed.sync_buffers(self.model)  # DDP: every rank takes rank 0's BN statistics
        stats = {"epoch": self.epoch, "lr": self.opt.lr, **self.epoch_stats()}
        name = self.stage.name
        if self.term is None:
            self.objective.on_epoch_end(self.epoch)
            if self.spec.recipe.tests_after(self.epoch):
                test = evaluate(self.student, self.test_loader)
                stats.update(test_acc=test["top1"], test_acc5=test["top5"], test_loss=test["loss"])
            self.state["curve"].append(stats)
        else:
            self.state["init_curve"].append({"stage": name, **stats})
        seconds = time.time() - self.t_epoch
        self.state["epoch_seconds"].setdefault(name, []).append(seconds)
        self.state["epoch"] = self.epoch
        self.state["elapsed"] = time.time() - self.t0
        self.save_checkpoint()
        self.epochs_now += 1
        self.log.epoch(name, self.epoch, self.stage.epochs, stats, seconds)

    def epoch_stats(self) -> dict:
        """The epoch's mean loss terms and train accuracy (:func:`~kdbench.engine.step.epoch_means`)."""
        return epoch_means(self.sums, self.names, self.train_loader.num_samples, self.epoch)

    def save_checkpoint(self) -> None:
        if not self.dctx.is_main:  # DDP: rank 0 writes
            return
        atomic_torch_save(self.out / "checkpoint.pt", {
            "format": CHECKPOINT_FORMAT, "hash": self.spec.config_hash(), "state": self.state, "read": self.read,
            "student": _own(self.student.state_dict()), "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "init_optimizer": self.opt.state_dict() if self.term is not None else None})

    def end_stage(self, stage: TrainingStage) -> None:
        self.state["stage"], self.state["epoch"] = self.stages.index(stage) + 1, 0
        self.init_opt_state = None

    def stopped(self) -> dict:
        return {"status": "stopped", "state": self.state}

    def finish(self, status: str = "ok", failure: str | None = None) -> dict:
        """Write model.pt (if the run succeeded) and metrics.json; the metrics."""
        spec = self.spec
        metrics = run_record(spec, self.state, status, failure, self.run_id, self.data.num_classes,
                             time.time() - self.t0, self.prov, **self.record())
        if status == "ok" and self.dctx.is_main:
            save_model(self.out / "model.pt", self.student, spec.student, self.data.num_classes, spec.dataset,
                       run=self.run_id, acc_last=metrics["acc_last"], hash=spec.config_hash(), **self.model_meta())
        if self.dctx.is_main:
            atomic_write_json(self.out / "metrics.json", metrics)
        distributed.close()
        return metrics


    def record(self) -> dict:
        """What metrics.json records besides :func:`run_record`'s own fields."""
        spec, read = self.spec, self.read
        return dict(
            loss=self.objective.spec.describe(), resolved_method=_method_dict(self.objective),
            **used_record(spec, self.objective, self.execution_used, self.optimizer),
            **({"unlabeled_samples": self.unlabeled.num_samples} if self.unlabeled else {}),
            eval_split="test" if spec.validation is None else "validation", eval_samples=self.test_loader.num_samples,
            data_fingerprint=read["data"], teacher_sha256=read["teachers"],
            **({"holdout": {**spec.validation, "train_samples": self.train_loader.num_samples}} if spec.validation else {}))

    def model_meta(self) -> dict:
        """model.pt's metadata besides the run id, acc_last and hash."""
        return {"data_fingerprint": self.read["data"]}


def with_stream(batches, stream):
    """Each labelled batch followed by the unlabelled stream's next batch, as one batch
    (``labeled``: the number of labelled samples first)."""
    for x, y, idx, view, _ in batches:
        xu, yu, iu = next(stream)
        yield torch.cat([x, xu]), torch.cat([y, yu]), torch.cat([idx, iu]), view, x.shape[0]


class EpochLog:
    """One line per finished epoch on stderr (what a job log shows: epoch/total, lr, loss terms,
    train/test accuracy, seconds per epoch, ETA), and tqdm's bar when stderr is a terminal."""

    def __init__(self, total: int, done: int, lines: bool, bar: bool, prefix: str):
        self.total, self.done, self.lines, self.prefix = total, done, lines, prefix
        self.seconds: list[float] = []
        self.bar = None
        if bar and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=done, desc=prefix, unit="ep", dynamic_ncols=True)

    def epoch(self, stage: str, epoch: int, epochs: int, stats: dict, seconds: float) -> None:
        self.done += 1
        self.seconds.append(seconds)
        if self.bar is not None:
            self.bar.update(1)
        if self.lines:
            self.write(epoch_line(self.prefix, stage, epoch, epochs, self.done, self.total, stats, self.seconds))

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def epoch_line(prefix: str, stage: str, epoch: int, epochs: int, done: int, total: int, stats: dict,
               seconds: list[float]) -> str:
    """``<prefix> main 3/240 lr 0.05 loss 1.234 ce 0.5 kd 0.7 train 61.20 test 58.30 12.3 s/epoch ETA 0:47:10``
    (the ETA: the run's remaining epochs at the mean seconds per epoch of this process)."""
    skip = {"epoch", "lr", "train_acc", "test_acc", "test_acc5", "test_loss"}
    terms = " ".join(f"{k} {v:.4g}" for k, v in stats.items() if k not in skip)
    test = f" test {stats['test_acc']:.2f}" if "test_acc" in stats else ""
    mean = sum(seconds) / len(seconds)
    eta = int(round(mean * (total - done)))
    return (f"{prefix} {stage} {epoch}/{epochs} lr {stats['lr']:.4g} {terms} train {stats['train_acc']:.2f}{test} "
            f"{mean:.1f} s/epoch ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


# ---------------------------------------------------------------- what a run records and checks

def check_synthetic_data(spec: RunSpec) -> None:
    """Synthetic data on disk must be what the run's suite declares (``RunSpec.data_id``): two suites
    that share a root with different ``synthetic:`` settings would otherwise train on each other's."""
    from kdbench.data.synthetic_files import MARKER
    from kdbench.core.spec import _digest

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
    identified by its name, see :func:`kdbench.core.spec.dataset_identity`). Another teacher file
    (or, for a linear probe, another probed model file, ``init``) means it was made again (a deleted
    teacher run retrained, on a GPU not bit for bit): Snakemake reruns the run for that reason, so it
    restarts from its first epoch (False) instead of mixing two teachers in one run."""
    if recorded is None:  # a checkpoint written before kdbench recorded its inputs
        return True
    if recorded.get("data") != now["data"]:
        raise CheckpointError(f"{ckpt_path}: was trained on other data than this run reads now (dataset fingerprint "
                              f"{recorded.get('data')} vs {now['data']}): the data changed under the run. Delete "
                              f"{ckpt_path.parent} to train this run afresh on the data there now")
    for key, what in (("teachers", "teacher"), ("init", "probed model")):
        if recorded.get(key) != now.get(key):
            print(f"kdbench: {ckpt_path} was trained against another {what} file (SHA-256 {recorded.get(key)} vs "
                  f"{now.get(key)}): the {what} was made again, so this run restarts from its first epoch",
                  file=sys.stderr, flush=True)
            return False
    return True


def sgd(params, lr: float, recipe) -> SGD:
    """kdbench's SGD with the recipe's momentum and weight decay."""
    return SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


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
    """Last-epoch (CRD/RepDistiller's statistic) and best-epoch (mdistiller's) test accuracy; a
    curve's epochs without a test pass (``Recipe.test_every``) are skipped."""
    tested = [r for r in curve if "test_acc" in r]  # every epoch, or every n-th and the last (test_every)
    if not tested:
        return {"acc_last": None, "acc5_last": None, "acc_best": None, "epoch_best": None, "epochs_done": len(curve)}
    best = max(tested, key=lambda r: r["test_acc"])
    last = tested[-1]
    return {"acc_last": last["test_acc"], "acc5_last": last["test_acc5"], "acc_best": best["test_acc"],
            "acc5_best": best["test_acc5"], "epoch_best": best["epoch"], "epochs_done": len(curve)}
