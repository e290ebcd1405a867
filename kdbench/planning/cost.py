"""The cost planner (``kdbench plan``): what a suite's runs execute and what they cost on a GPU kind.

**What a run executes** (:func:`run_plan`, exact, no model): its stages, each ``epochs × steps per
epoch``. A step is one global batch: ``ceil(n / batch)`` batches of the training set (``n`` less a
``validation`` holdout), less a last global batch smaller than the DDP processes (dropped, as
:mod:`kdbench.data.sharded` does). A distillation whose terms have an initialisation stage (AB, FT,
FSP: ``init_epochs``) runs that stage first; a linear probe runs the probe recipe on its dataset; an
import (a released teacher) trains nothing. Every main-stage and probe epoch ends with a test pass.
Streamed datasets (ImageNet) run on ``ddp_procs`` processes, one GPU each
(:func:`kdbench.planning.launch.job_resources`, default 4); every other run on one.

**What a step costs**, from one of two sources, named in each :class:`RunCost`:

* ``measured``: a bench record of the device (:func:`read_bench_record`: what
  ``benchmarks/gpu_check.py`` writes, kept as ``results/gpu/<gpu>.json``) gives the engine's plain
  steps/s of one distillation: it costs the training steps of runs with the same teacher, student,
  method and batch, on 32-px images, one process, plain execution.
* ``model``: FLOPs per step / the GPU kind's stated sustained throughput (:data:`GPUS`), at least
  an eager launch floor per step (:data:`STEP_FLOOR_S`), and for streamed data at least the JPEG
  decoding time (:data:`DECODE_IMAGES_PER_CORE_S` × the job's CPU threads per process). FLOPs per
  image are counted once per architecture, class count and image size by
  ``torch.utils.flop_counter`` on the meta device (:func:`forward_flops`, cached on disk); a
  training step counts 3× the student's forward (forward + backward) and 1× each teacher's, a
  probe step 1× the frozen model's. Choices: a term's own FLOPs (CRD's memory bank, adapters), the
  teacher cache and packing are not modelled (upper estimates); an initialisation-stage step costs
  a distillation step; test passes (the model always: the bench times training steps only) cost
  the student's forward per test batch, at least :data:`EVAL_FLOOR_S`; start-up and checkpoints
  are not counted.

**GPU-hours are per GPU**: a run on P processes costs P GPU-hours per wall hour. **Wall time at N
GPUs** (:func:`wall_hours`) is the lower bound of perfect packing: the larger of the GPU-hours / N
and the longest chain of runs that wait for each other (teacher → student → probe).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.core.spec import Execution, resolve_unlabeled
from kdbench.planning.launch import job_resources


@dataclass(frozen=True)
class Gpu:
    """A GPU kind of the model: ``peak_tflops`` of the precision the plain (fp32) engine runs its
    convolutions in, and the fraction of it a training step sustains."""

    name: str
    peak_tflops: float
    precision: str
    sustained_fraction: float

    @property
    def sustained_flops(self) -> float:
        return self.peak_tflops * 1e12 * self.sustained_fraction

    def describe(self) -> str:
        return (f"{self.name}: {self.sustained_flops / 1e12:.0f} TFLOP/s sustained = {self.sustained_fraction:.0%} of "
                f"{self.peak_tflops:g} TFLOP/s {self.precision} peak")


#: H100/H200/A100 convolutions run in TF32 under PyTorch's default cuDNN settings: 30% of its dense
#: peak (the README's 150 TFLOP/s on an H100). V100 has no TF32: 60% of its fp32 peak
#: (performance.md §2.3, RepDistiller's step on a V100). The H200's compute is the H100 SXM's.
GPUS = {"h100": Gpu("H100 SXM", 494.7, "TF32 dense", 0.30), "h200": Gpu("H200", 494.7, "TF32 dense", 0.30),
        "a100": Gpu("A100 SXM", 156.0, "TF32 dense", 0.30), "v100": Gpu("V100 SXM2", 15.7, "fp32", 0.60)}
#: eager launch floor of one training step (seconds): a few hundred kernels at batch 64 (performance.md §2.2)
STEP_FLOOR_S = {"train": 2.5e-3, "distill": 4e-3, "probe": 1.5e-3}
EVAL_FLOOR_S = 1.5e-3  # one test batch (forward only)
DECODE_IMAGES_PER_CORE_S = 400  # PIL decode + crop of full-size ImageNet JPEGs (performance.md §3: 300–500)

#: official (classes, test-set size) of the registered datasets: DatasetInfo has the training size only
OFFICIAL = {"cifar10": (10, 10000), "cifar100": (100, 10000), "svhn": (10, 26032), "svhn_extra": (10, 26032),
            "stl10": (10, 8000), "tinyimagenet": (200, 10000), "tinyimagenet64": (200, 10000),
            "imagenet": (1000, 50000)}

RECORDS_DIR = "results/gpu"  # <gpu>.json: benchmarks/gpu_check.py's report on that GPU kind


# ---------------------------------------------------------------- what a run executes

@dataclass(frozen=True)
class DataSize:
    train: int
    test: int
    classes: int
    image_size: int
    streaming: bool


def data_size(suite_config: dict, dataset: str) -> DataSize:
    """Sizes of ``dataset`` as the suite declares it: the synthetic set's, else the official ones."""
    from kdbench.data import DATASETS

    info = DATASETS.get(dataset)
    synthetic = (suite_config.get("datasets", {}).get(dataset) or {}).get("synthetic")
    if synthetic:
        k = synthetic["classes"]
        return DataSize(k * synthetic["train_per_class"], k * synthetic["test_per_class"], k, info.image_size,
                        info.streaming)
    if dataset not in OFFICIAL:
        raise ValueError(f"dataset {dataset!r}: its class count and test-set size are unknown to the planner; add them "
                         f"to OFFICIAL in kdbench/planning/cost.py (known: {', '.join(OFFICIAL)})")
    classes, test = OFFICIAL[dataset]
    return DataSize(info.train_size, test, classes, info.image_size, info.streaming)


def steps_per_epoch(n: int, batch: int, nproc: int = 1) -> int:
    """Global batches of ``n`` samples, less a last one smaller than the ``nproc`` processes."""
    full, last = divmod(n, batch)
    return full + (1 if last >= max(nproc, 1) else 0)


@dataclass(frozen=True)
class Stage:
    name: str  # "main", "init:<term>" or "probe"
    kind: str  # what a step does: "train", "distill" or "probe" (its launch floor)
    epochs: int
    steps_per_epoch: int
    test_passes: int  # epochs that end with a test pass

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass(frozen=True)
class RunPlan:
    id: str
    kind: str  # train | distill | probe | import
    nproc: int  # processes, one GPU each
    stages: tuple[Stage, ...]
    test_images: int  # per test pass
    import_checks: int = 0  # an import's accuracy check: one test pass

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)


def run_plan(suite, run, ddp_procs: int | None = None) -> RunPlan:
    """The stages and steps of ``run`` (a :class:`kdbench.planning.suite.Run` of ``suite``);
    ``ddp_procs``: processes of a streamed dataset's runs (default: the launcher's)."""
    from kdbench.methods import LOSSES, resolve_method

    spec = run.spec
    size = data_size(suite.config, spec.dataset)
    launch = {"ddp_procs": ddp_procs} if ddp_procs else None
    nproc = job_resources(run, {**suite.config, "device": "auto"}, launch)["nproc"]
    n_train, n_test = size.train, size.test
    if spec.validation is not None:
        n_train, n_test = n_train - spec.validation["size"], spec.validation["size"]
    if run.kind == "import":
        return RunPlan(run.id, run.kind, 1, (), n_test, import_checks=1)
    per_epoch = steps_per_epoch(n_train, spec.recipe.batch_size, nproc)
    if run.kind == "probe":
        return RunPlan(run.id, run.kind, nproc, (Stage("probe", "probe", spec.recipe.epochs, per_epoch,
                                                       spec.recipe.epochs),), n_test)
    method = resolve_method(spec.method, spec.method_overrides)
    stages = [Stage(f"init:{t}", "distill", e, per_epoch, 0) for t in method.terms
              if (e := LOSSES.get(t).init_epochs_for(method.params.get(t, {}))) > 0]
    stages.append(Stage("main", run.kind, spec.recipe.epochs, per_epoch, spec.recipe.test_passes()))
    return RunPlan(run.id, run.kind, nproc, tuple(stages), n_test)


# ---------------------------------------------------------------- FLOPs (the model's input)

def _cache_path() -> Path:
    return Path(os.environ.get("KDBENCH_CACHE", Path.home() / ".cache" / "kdbench")) / "flops.json"


@functools.cache
def _models_fingerprint() -> str:
    """Changes when any model definition does (a cached count is then recounted)."""
    import kdbench.models as models
    h = hashlib.sha1()
    for p in sorted(Path(models.__file__).parent.glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


@functools.cache
def forward_flops(arch: str, classes: int, image_size: int) -> float:
    """FLOPs (2 per multiply-add) of one image's forward pass, counted on the meta device."""
    key = f"{arch}|{classes}|{image_size}|{_models_fingerprint()}"
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from kdbench.models import build_model
        with torch.device("meta"):
            model = build_model(arch, classes)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, image_size, image_size, device="meta"))
        cache[key] = float(counter.get_total_flops())
        try:
            from kdbench.core.io import atomic_write_bytes
            atomic_write_bytes(path, json.dumps(cache, indent=0, sort_keys=True).encode())
        except OSError:  # a read-only home: count again next time
            pass
    return cache[key]


# ---------------------------------------------------------------- measured step costs

@dataclass(frozen=True)
class Measured:
    """One bench measurement: the engine's plain steps of ``method`` on ``pair`` at ``batch``."""

    device_name: str
    pair: tuple[str, str]
    method: str
    batch: int
    seconds_per_step: float
    record: str

    def applies(self, run, nproc: int, image_size: int) -> bool:
        """The bench steps CIFAR-shaped (32 px) batches through one teacher in one process."""
        s = run.spec
        return (run.kind == "distill" and nproc == 1 and image_size == 32 and (s.teacher, s.student) == self.pair
                and s.method == self.method and s.recipe.batch_size == self.batch and len(s.teacher_ckpts) == 1
                and s.unlabeled is None and s.execution == Execution() and s.teacher_dataset in (None, s.dataset))


def _sps(row) -> float:
    """A bench figure: a number, or ``{min, median, max}`` (the median)."""
    return float(row["median"] if isinstance(row, dict) else row)


def read_bench_record(path: str | Path) -> list[Measured]:
    """The measurements of a bench record: ``benchmarks/gpu_check.py``'s report (its ``bench``
    step's ``kd``, ``crd``, ``fitnet`` results) or one ``kdbench bench --json`` file. A dry
    report (CPU figures at toy sizes) is refused."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"bench record {path}: cannot be read ({e})") from None
    if rec.get("dry"):
        raise ValueError(f"bench record {path} is a dry run (CPU figures at toy sizes): use a GPU run's report")
    if "engine" in rec:
        results = [rec]
    elif "methods" in rec:  # `kdbench bench --json`: {"methods": {method: result}, "grid": ...}
        results = list(rec["methods"].values())
    else:
        bench = (rec.get("steps") or {}).get("bench") or {}
        results = [v["result"] for v in bench.values() if isinstance(v, dict) and v.get("result")]
    out = []
    for r in results:
        plain = (r.get("engine") or {}).get("plain")
        if plain and r.get("device", "").startswith("cuda"):
            out.append(Measured(r["device_name"], tuple(r["pair"]), r["method"], int(r["batch"]),
                                1.0 / _sps(plain["sps"]), str(path)))
    if not out:
        raise ValueError(f"bench record {path}: no GPU measurement of the engine's plain step in it")
    return out


def device_records(gpu: str, root: str | Path = RECORDS_DIR) -> list[Measured]:
    """The measurements in ``<root>/<gpu>.json`` (none when it does not exist); a record of
    another device is refused."""
    path = Path(root) / f"{gpu}.json"
    if not path.exists():
        return []
    found = read_bench_record(path)
    wrong = {m.device_name for m in found if gpu.lower() not in m.device_name.lower()}
    if wrong:
        raise ValueError(f"{path} was measured on {', '.join(sorted(wrong))}, not a {gpu}: move it to the file of "
                         f"its GPU kind ({', '.join(f'{k}.json' for k in GPUS)})")
    return found


# ---------------------------------------------------------------- costs

@dataclass(frozen=True)
class RunCost:
    plan: RunPlan
    wall_s: float
    measured_steps: int  # training steps costed from a bench record (the rest: the model)
    source: str  # "measured (<record>)", "model" or "measured + model"

    @property
    def gpu_hours(self) -> float:
        """Per GPU: each of the run's processes holds a GPU for the whole run."""
        return self.plan.nproc * self.wall_s / 3600


def run_cost(suite, run, plan: RunPlan, gpu: Gpu, measured: list[Measured] = (), flops=forward_flops) -> RunCost:
    """What ``run`` costs on ``gpu`` (see the module docstring); ``flops(arch, classes, size)``
    is FLOPs per image's forward pass."""
    spec, P = run.spec, plan.nproc
    size = data_size(suite.config, spec.dataset)
    f_student = flops(spec.student, size.classes, size.image_size)
    # cross-dataset distillation: the teacher has its own dataset's classes and sees the student's images
    t_classes = data_size(suite.config, spec.teacher_dataset or spec.dataset).classes
    f_teachers = len(spec.teacher_ckpts) * flops(spec.teacher, t_classes, size.image_size) if spec.teacher else 0.0
    # streamed data: images decoded per second and process, by the CPU threads the job asks for
    decode = DECODE_IMAGES_PER_CORE_S * job_resources(run, {**suite.config, "device": "auto"},
                                                      {"ddp_procs": P})["threads"] / P if size.streaming else None

    def seconds(flop: float, images: float, floor: float) -> float:
        t = max(flop / gpu.sustained_flops, floor)
        return max(t, images / decode) if decode else t

    b = spec.recipe.batch_size / P  # images per process and step
    unl = resolve_unlabeled(spec.unlabeled)
    u = unl["batch_size"] / P if unl else 0
    b_teacher = u if unl and unl["terms_on"] == "unlabeled" else b + u
    match = next((m for m in measured if m.applies(run, P, size.image_size)), None)
    wall, measured_steps = 0.0, 0
    for st in plan.stages:
        if st.kind == "probe":
            step = seconds(f_student * b, b, STEP_FLOOR_S["probe"])
        elif st.name == "main" and match is not None:
            step, measured_steps = match.seconds_per_step, measured_steps + st.steps
        elif st.kind == "train":
            step = seconds(3 * f_student * (b + u), b + u, STEP_FLOOR_S["train"])
        else:
            step = seconds(3 * f_student * (b + u) + f_teachers * b_teacher, b + u, STEP_FLOOR_S["distill"])
        wall += st.steps * step
    tb = spec.recipe.test_batch_size
    per_rank = math.ceil(plan.test_images / P)
    test_pass = (per_rank // tb) * seconds(f_student * tb, tb, EVAL_FLOOR_S)
    if per_rank % tb:
        test_pass += seconds(f_student * (per_rank % tb), per_rank % tb, EVAL_FLOOR_S)
    wall += test_pass * (sum(st.test_passes for st in plan.stages) + plan.import_checks)
    source = "model" if match is None else (f"measured ({match.record})" if measured_steps == plan.steps
                                             else f"measured ({match.record}) + model")
    return RunCost(plan, wall, measured_steps, source)


@dataclass
class Summary:
    """Runs by kind, steps, GPU-hours per GPU and wall time of a set of runs."""

    runs: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    measured_steps: int = 0
    gpu_hours: float = 0.0
    max_nproc: int = 1
    critical_hours: float = 0.0

    @property
    def total_runs(self) -> int:
        return sum(self.runs.values())

    def wall_hours(self, gpus: int) -> float:
        return wall_hours(self.gpu_hours, self.critical_hours, self.max_nproc, gpus)


def wall_hours(gpu_hours: float, critical_hours: float, max_nproc: int, gpus: int) -> float:
    """The lower bound of perfect packing on ``gpus`` GPUs: work / GPUs, or the longest chain."""
    if gpus < max_nproc:
        raise ValueError(f"{gpus} GPUs: a run of this plan needs {max_nproc} (its DDP processes); plan with "
                         f"--gpus {max_nproc} or more, or fewer processes per run (--ddp-procs)")
    return max(gpu_hours / gpus, critical_hours)


def summarise(costs: dict[str, RunCost], ids, needs: dict[str, tuple[str, ...]]) -> Summary:
    """The summary of the runs ``ids`` (each once); ``needs``: run id -> the runs it waits for."""
    ids = list(dict.fromkeys(ids))
    out = Summary()

    @functools.cache
    def finish(rid: str) -> float:  # hours from the start until ``rid`` can finish
        return costs[rid].wall_s / 3600 + max((finish(n) for n in needs.get(rid, ()) if n in costs), default=0.0)

    for rid in ids:
        c = costs[rid]
        out.runs[c.plan.kind] = out.runs.get(c.plan.kind, 0) + 1
        out.steps += c.plan.steps
        out.measured_steps += c.measured_steps
        out.gpu_hours += c.gpu_hours
        out.max_nproc = max(out.max_nproc, c.plan.nproc)
        out.critical_hours = max(out.critical_hours, finish(rid))
    return out


def with_needs(ids, needs: dict[str, tuple[str, ...]]) -> list[str]:
    """``ids`` and every run they wait for, transitively (teachers, probed models)."""
    out, todo = dict.fromkeys(ids), list(ids)
    while todo:
        for n in needs.get(todo.pop(), ()):
            if n not in out:
                out[n] = None
                todo.append(n)
    return list(out)
