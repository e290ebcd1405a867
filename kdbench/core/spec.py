"""What defines a run: the recipe and the run specification, and the hash that names it."""

from __future__ import annotations

import hashlib
import math
import json
from dataclasses import asdict, dataclass, field, fields

#: RepDistiller trains these students (and teachers) with lr 0.01 instead of 0.05.
SMALL_LR_ARCHS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


@dataclass(frozen=True)
class Recipe:
    """RepDistiller's CIFAR-100 recipe (train_student.py / train_teacher.py) as defaults."""

    epochs: int = 240
    milestones: tuple[int, ...] = (150, 180, 210)  # lr ×lr_decay once epoch > m (epochs count from 1)
    lr: float = 0.05
    small_lr: float = 0.01
    small_lr_archs: tuple[str, ...] = SMALL_LR_ARCHS
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    test_batch_size: int = 256  # evaluation only: does not change results
    schedule: str = "step"  # "step" (RepDistiller) or "cosine" (per step, idstcv/KDA)
    warmup_epochs: int = 0  # linear per-step warm-up, cosine schedule only
    #: evaluate on the test split after every n-th epoch and after the last (1: every epoch, as
    #: RepDistiller). Training is the same for any n; acc_best is the best evaluated epoch, so n is
    #: hashed when not 1. It lets a large test split (low seed noise) cost what a small one did.
    test_every: int = 1

    @classmethod
    def from_config(cls, cfg: dict | None) -> "Recipe":
        """Build from a suite's ``recipe`` block. Setting ``epochs`` without ``milestones``
        scales the default milestones with it (150/180/210 of 240 → same fractions)."""
        cfg = dict(cfg or {})
        valid = {f.name for f in fields(cls)}
        unknown = set(cfg) - valid
        if unknown:
            raise ValueError(f"unknown recipe keys {sorted(unknown)}; valid: {sorted(valid)}")
        if "epochs" in cfg and "milestones" not in cfg:
            cfg["milestones"] = scale_milestones(cls.milestones, cls.epochs, cfg["epochs"])
        for k in ("milestones", "small_lr_archs"):
            if k in cfg:
                cfg[k] = tuple(cfg[k])
        if int(cfg.get("test_every", 1)) < 1:
            raise ValueError(f"test_every {cfg['test_every']!r}: must be >= 1 (evaluate after every n-th epoch)")
        if cfg.get("schedule", "step") not in ("step", "cosine"):
            raise ValueError(f"unknown schedule {cfg['schedule']!r}; valid: step, cosine")
        return cls(**cfg)

    @staticmethod
    def layer(base: dict | None, block: dict | None, defaults: dict | None = None) -> dict:
        """The recipe block ``block`` laid over ``base`` (an experiment's ``recipe`` or
        ``teacher_recipe`` over the suite's ``recipe``). A block that sets ``epochs`` without
        ``milestones`` gets the DEFAULT milestones scaled to its epochs, never the milestones of the
        block below it: ``teacher_recipe: {epochs: 10}`` under ``recipe: {epochs: 8, milestones:
        [5, 6, 7]}`` trains with 6/8/9, not 5/6/7. ``defaults`` (``epochs`` and ``milestones``) are
        RepDistiller's 150/180/210 of 240 unless given (the linear probe has its own)."""
        block = dict(block or {})
        out = {**(base or {}), **block}
        if "epochs" in block and "milestones" not in block:
            d = defaults or {"epochs": Recipe.epochs, "milestones": Recipe.milestones}
            out["milestones"] = list(scale_milestones(d["milestones"], d["epochs"], block["epochs"]))
        return out

    def tests_after(self, epoch: int) -> bool:
        """Whether ``epoch`` (from 1) of the main stage ends with a test pass."""
        return epoch % self.test_every == 0 or epoch == self.epochs

    def test_passes(self) -> int:
        return sum(self.tests_after(e) for e in range(1, self.epochs + 1))

    def base_lr(self, arch: str) -> float:
        return self.small_lr if arch in self.small_lr_archs else self.lr

    def lr_at(self, epoch: int, arch: str, progress: float = 0.0) -> float:
        """lr in ``epoch`` (from 1) after ``progress`` ∈ [0, 1) of its steps.

        step: base·decay^(number of milestones < epoch), constant within an epoch.
        cosine (idstcv/KDA main_kda.py): linear warm-up over ``warmup_epochs``, then
        base·½(1 + cos(π·t)) with t the fraction of post-warm-up training done, per step.
        """
        base = self.base_lr(arch)
        if self.schedule == "step":
            return base * self.lr_decay ** sum(epoch > m for m in self.milestones)
        t = epoch - 1 + progress
        if t < self.warmup_epochs:
            return base * (t + 1e-12) / self.warmup_epochs if self.warmup_epochs else base
        frac = (t - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1e-12)
        return base * 0.5 * (1 + math.cos(math.pi * frac))


#: linear_probe defaults (:mod:`kdbench.engine.linear_probe`). CRD never published its probe recipe
#: (HobbitLong/RepDistiller#44); the DKD maintainers' guidance is wd 0 with a frozen backbone and BN
#: (mdistiller#59).
PROBE_RECIPE = {"epochs": 40, "milestones": [20, 30], "lr": 0.1, "weight_decay": 0.0, "batch_size": 64}


def scale_milestones(milestones, from_epochs: int, to_epochs: int) -> tuple[int, ...]:
    """Milestones at the same fractions of ``to_epochs`` as of ``from_epochs`` (at least 1)."""
    return tuple(max(1, round(m * to_epochs / from_epochs)) for m in milestones)


PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("none", "graph", "compile")
CACHE_DTYPES = ("none", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Execution:
    """How a run executes: options that speed it up (``kdbench/engine/fast.py``,
    ``teacher_cache.py``). Only options that change what is computed enter the run hash:

    - ``precision``: ``fp32`` (default) or ``bf16`` autocast for the forward passes (losses stay
      fp32). bf16 changes the results, so ``bf16`` is hashed; ``fp32`` is not (old ids stay).
    - ``channels_last``: NHWC memory layout for models and inputs. Same maths, only the order of
      floating-point sums inside a convolution may change (like cuDNN's algorithm choice): not hashed.
    - ``compile``: ``none`` (eager), ``graph`` (the whole step captured as a CUDA graph, CUDA only)
      or ``compile`` (``torch.compile`` of the models). Same maths, fused kernels: not hashed.
    - ``teacher_cache``: ``none``, or the storage dtype of the exact teacher-output cache.
      ``fp32`` stores the teacher's outputs as computed (exact): not hashed; ``bf16``/``fp16``
      round them (different results): hashed.
    - ``cache_dir``: where teacher caches are kept between processes (None: in memory for this
      process only). A path: not hashed.
    - ``fuse``: the student may be trained horizontally fused with its pack's other students of its
      architecture (``kdbench/engine/fusion.py``). Grouped kernels round differently, and in
      float32 the difference grows to seed noise within a few epochs, so ``True`` is hashed
      (``False`` is not: unfused ids stay). Set by the suite's ``pack: {fuse: true}`` only
      (``kdbench.planning.suite``), never from a suite's ``execution`` block.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: str = "none"
    teacher_cache: str = "none"
    cache_dir: str | None = None
    fuse: bool = False

    def __post_init__(self):
        if not isinstance(self.fuse, bool):
            raise ValueError(f"execution.fuse: expected true or false, not {self.fuse!r}")
        for key, valid in (("precision", PRECISIONS), ("compile", COMPILE_MODES), ("teacher_cache", CACHE_DTYPES)):
            if getattr(self, key) not in valid:
                raise ValueError(f"execution.{key}: unknown value {getattr(self, key)!r}; valid: {', '.join(valid)}")

    @classmethod
    def from_config(cls, cfg: "dict | Execution | None") -> "Execution":
        if isinstance(cfg, Execution):
            return cfg
        cfg = dict(cfg or {})
        valid = {f.name for f in fields(cls)}
        unknown = set(cfg) - valid
        if unknown:
            raise ValueError(f"unknown execution keys {sorted(unknown)}; valid: {sorted(valid)}")
        return cls(**cfg)

    def hashed(self) -> dict:
        """The options that change results (empty for the plain fp32 path)."""
        out = {}
        if self.precision != "fp32":
            out["precision"] = self.precision
        if self.teacher_cache not in ("none", "fp32"):
            out["teacher_cache"] = self.teacher_cache
        if self.fuse:
            out["fuse"] = True
        return out


#: ``RunSpec.unlabeled``: its keys, their defaults (FKD's STL-10 setting) and the valid choices
UNLABELED_DEFAULTS = {"split": "unlabeled", "batch_size": 512, "terms_on": "unlabeled", "bn": "joint"}
UNLABELED_CHOICES = {"terms_on": ("unlabeled", "all"), "bn": ("joint", "separate")}


def _with_defaults(name: str, cfg: dict | None, defaults: dict) -> dict | None:
    """An optional RunSpec mapping with its defaults filled in (so equal settings hash equally),
    or None; unknown keys are refused with the valid ones."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ValueError(f"{name}: expected a mapping with keys {', '.join(defaults)}, not {cfg!r}")
    unknown = set(cfg) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {name} keys {sorted(unknown)}; valid: {', '.join(defaults)}")
    return {**defaults, **cfg}


def resolve_unlabeled(cfg: dict | None) -> dict | None:
    """``RunSpec.unlabeled`` with its defaults filled in, validated, or None."""
    out = _with_defaults("unlabeled", cfg, UNLABELED_DEFAULTS)
    if out is None:
        return None
    if not isinstance(out["split"], str) or not out["split"]:
        raise ValueError(f"unlabeled.split: expected a split name of the dataset (e.g. 'unlabeled'), not {out['split']!r}")
    bs = out["batch_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2:
        raise ValueError(f"unlabeled.batch_size: expected an integer ≥ 2 (kernel terms compare pairs), not {bs!r}")
    for key, valid in UNLABELED_CHOICES.items():
        if out[key] not in valid:
            raise ValueError(f"unlabeled.{key}: unknown value {out[key]!r}; valid: {', '.join(valid)}")
    return out


#: ``RunSpec.validation``: its keys and defaults
VALIDATION_DEFAULTS = {"size": None, "seed": 0}


def resolve_validation(cfg: dict | None) -> dict | None:
    """``RunSpec.validation`` with its defaults filled in, validated, or None."""
    out = _with_defaults("validation", cfg, VALIDATION_DEFAULTS)
    if out is None:
        return None
    for key, low in (("size", 1), ("seed", 0)):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"validation.{key}: expected an integer ≥ {low}, not {v!r}")
    return out


@dataclass(frozen=True)
class RunSpec:
    """One training run. ``teacher_ckpts`` has one path (a teacher) or several (an ensemble).

    ``unlabeled`` (None: off) adds a second training stream for the distillation terms, FKD's
    STL-10 protocol: ``{"split": "unlabeled", "batch_size": 512, "terms_on": "unlabeled", "bn":
    "joint"}`` (these are the defaults; see ``kdbench/engine/run.py``). It is hashed only when set,
    so the ids of runs without it are those from before it existed.

    ``validation`` (None: off) trains on the labelled training set minus a held-out, stratified
    part of ``size`` samples drawn with ``seed`` (:func:`kdbench.data.holdout_split`; the split's
    seed, not the run's, so every run of a sweep shares it) and evaluates on that part instead of
    the test set: ``{"size": 5000, "seed": 0}``. Hashed only when set, as ``unlabeled``.

    ``data_id`` and ``teacher_ids`` make the run id name the data and the teacher(s), never their
    paths: ``data_id`` is :func:`dataset_identity` (synthetic data: its generator's parameters);
    ``teacher_ids`` are the teachers' run ids, or ``sha256:<hex>`` of an imported teacher file
    (:func:`teacher_file_id`). What a run actually read is also recorded in its checkpoint and
    metrics.json (``kdbench.engine.fit``), and a resume that disagrees is refused.
    """

    dataset: str
    data_root: str
    student: str
    method: str = "student"
    seed: int = 0
    teacher: str | None = None
    teacher_ckpts: tuple[str, ...] = ()
    #: what identifies the teacher(s) for the hash: their run ids (paths to files are not hashed)
    teacher_ids: tuple[str, ...] = ()
    method_overrides: dict = field(default_factory=dict)
    recipe: Recipe = field(default_factory=Recipe)
    #: cross_dataset_distill: the dataset the teacher was trained on (None = the student's)
    teacher_dataset: str | None = None
    #: "fit" (train or distill) or "linear_probe" (train a new linear layer on a frozen model)
    protocol: str = "fit"
    #: linear_probe: the frozen model's file (not hashed) and its run id (hashed)
    init_ckpt: str | None = None
    init_id: str | None = None
    #: execution options (see :class:`Execution`); only ``Execution.hashed()`` enters the hash
    execution: Execution = field(default_factory=Execution)
    #: a second, unlabelled training stream for the distillation terms (see :func:`resolve_unlabeled`)
    unlabeled: dict | None = None
    #: hold out a labelled validation part of the training set and evaluate on it (see :func:`resolve_validation`)
    validation: dict | None = None
    #: what identifies the data beyond its name (see :func:`dataset_identity`); hashed only when set
    data_id: str | None = None
    #: a dress-rehearsal run (:mod:`kdbench.planning.rehearsal`): hashed only when True, so a
    #: rehearsal never shares an id with a real run and real ids stay as they were
    rehearsal: bool = False

    def __post_init__(self):
        object.__setattr__(self, "unlabeled", resolve_unlabeled(self.unlabeled))
        object.__setattr__(self, "validation", resolve_validation(self.validation))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recipe"] = asdict(self.recipe)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        d = dict(d)
        d["recipe"] = Recipe.from_config(d.get("recipe"))
        d["teacher_ckpts"] = tuple(d.get("teacher_ckpts", ()))
        d["teacher_ids"] = tuple(d.get("teacher_ids", ()))
        d["execution"] = Execution.from_config(d.get("execution"))
        return cls(**d)

    def config_hash(self) -> str:
        """8 hex digits of everything that defines the result (file paths excluded)."""
        d = self.to_dict()
        d.pop("data_root")
        d.pop("teacher_ckpts")
        d.pop("init_ckpt")
        d.pop("execution")
        for key in ("unlabeled", "validation", "data_id"):  # hashed only when set: older run ids stay
            if d[key] is None:
                d.pop(key)
        if not d["rehearsal"]:
            d.pop("rehearsal")
        if d["recipe"]["test_every"] == 1:
            d["recipe"].pop("test_every")
        if self.execution.hashed():
            d["execution"] = self.execution.hashed()
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:8]


def run_id(spec: RunSpec, source: str | None = None) -> str:
    """The run's id, a path that says what defines it and ends with its :meth:`RunSpec.config_hash`
    (the one place run ids are built)::

        <dataset>/scratch/<arch>/seed<k>-<hash>                      teachers and plain students
        <dataset>/<teacher>--<student>/<method>/seed<k>-<hash>       distillations
        <dataset>/<teacher dataset>.<teacher>--<student>/...         cross-dataset distillations
        <dataset>/probe/<probed run id>/probe-<hash>                 linear probes (protocol linear_probe)
        <dataset>/released/<arch>/<source>-<hash>                    released teachers (protocol import)

    ``source``: the released teacher's source (``repdistiller``, ``torchvision``), for import runs only."""
    digest = spec.config_hash()
    if spec.protocol == "import":
        if not source:
            raise ValueError("an import run's id names its released teacher's source: give source")
        return f"{spec.dataset}/released/{spec.student}/{source}-{digest}"
    if spec.protocol == "linear_probe":
        return f"{spec.dataset}/probe/{spec.init_id}/probe-{digest}"
    if not spec.teacher_ckpts:
        return f"{spec.dataset}/scratch/{spec.student}/seed{spec.seed}-{digest}"
    teacher = spec.teacher if spec.teacher_dataset in (None, spec.dataset) else f"{spec.teacher_dataset}.{spec.teacher}"
    return f"{spec.dataset}/{teacher}--{spec.student}/{spec.method}/seed{spec.seed}-{digest}"


#: the file in each run's folder that holds what its job runs (:func:`job_record`)
JOB_FILE = "spec.json"


def job_record(run: str, kind: str, spec: RunSpec, method: dict | None, device: str, threads: int) -> dict:
    """What a run's job reads instead of its suite (``runs/<id>/spec.json``, written by the planner,
    :func:`kdbench.planning.suite.write_specs`): its id and kind (train, distill, probe), the
    suite's device and threads, the method it trains as resolved from every override layer
    (``{name, ce, terms, params}``, None for probes: for the reader, the engine resolves the
    same from ``spec``) and the run specification itself."""
    return {"run": run, "kind": kind, "device": device, "threads": threads, "method": method, "spec": spec.to_dict()}


def read_job_record(path) -> tuple[dict, RunSpec]:
    """``(record, spec)`` of a :func:`job_record` file; ValueError, with the fix, if it is missing,
    damaged, or its spec does not give its run id (a hand edit: the id ends with the spec's hash)."""
    from pathlib import Path

    fix = "run snakemake (or `kdbench distill --suite FILE --run ID` by hand) again to rewrite it"
    try:
        record = json.loads(Path(path).read_text())
        spec = RunSpec.from_dict(record["spec"])
    except FileNotFoundError:
        raise ValueError(f"{path} not found: the planner writes it when snakemake starts; {fix}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a run's spec ({type(e).__name__}: {e}); {fix}") from None
    if not str(record.get("run", "")).endswith("-" + spec.config_hash()):
        raise ValueError(f"{path}: its spec hashes to {spec.config_hash()}, which is not the hash its run id "
                         f"{record.get('run')!r} ends with (edited by hand?); {fix}")
    return record, spec


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:16]


def dataset_identity(name: str, cfg: dict) -> str | None:
    """``RunSpec.data_id`` of a suite's dataset ``name`` declared as ``cfg`` (its ``datasets:`` entry).

    Synthetic data is what its generator's parameters make: ``synthetic:<16 hex digits>`` of the
    record ``kdbench make-data`` writes next to the data (``kdbench-synthetic.json``: the dataset
    name and the ``synthetic:`` mapping as written in the suite, so ``{seed: 0}`` written out or
    left to its default gives two ids; they are never shared wrongly). A real dataset is the
    official release its name says (``kdbench fetch`` checks the published MD5 sums): None, as
    the name is in the run id already; no file is read or listed when a suite loads, so run ids are
    the same before and after the data is fetched. The data a run actually reads is fingerprinted
    when it trains (:func:`kdbench.core.io.data_fingerprint`) and checked on resume.
    """
    if "synthetic" not in cfg:
        return None
    return "synthetic:" + _digest(synthetic_record(name, cfg["synthetic"] or {}))


def synthetic_record(name: str, params: dict) -> dict:
    """What ``kdbench make-data`` writes to ``<root>/kdbench-synthetic.json``."""
    return {"dataset": name, **params}


_TEACHER_IDS: dict[tuple, str] = {}


def teacher_file_id(path: str) -> str:
    """``sha256:<hex>`` of a teacher file given by path (``teacher_checkpoints``): the content, not
    the path, enters the run id. Cached per (file, size, mtime), so a suite that names a file in
    many runs reads it once. A missing file raises FileNotFoundError."""
    import os

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _TEACHER_IDS:
        from kdbench.core.io import file_sha256
        _TEACHER_IDS[key] = "sha256:" + file_sha256(path)
    return _TEACHER_IDS[key]
