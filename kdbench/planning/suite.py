"""Suites: a YAML file naming datasets, experiments (pairs × methods × seeds) and tables.

:func:`load_suite` validates the file against ``schemas/suite.schema.yaml`` and every name
against kdbench's registries, so a typo fails before any job runs, naming the valid choices.
It then enumerates the runs, each identified by a path that says what defines it::

    <dataset>/scratch/<arch>/seed<k>-<hash>              # teachers and plain students
    <dataset>/<teacher>--<student>/<method>/seed<k>-<hash>   # distilled students

A plain student ("student" method) does not depend on the teacher, so every pair that shares
a student shares its run. A teacher is the plain-trained run of its architecture with seed
``teacher_seeds[i]``; several teacher seeds make a teacher ensemble.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml

from kdbench.data import DATASETS
from kdbench.engine.rules import pack_key, run_problems, unpackable
from kdbench.core.spec import (JOB_FILE, PROBE_RECIPE, Execution, Recipe, RunSpec, dataset_identity, job_record, run_id,
                               teacher_file_id)
from kdbench.methods import LOSSES, METHODS, MethodSpec, merge_overrides, resolve_method
from kdbench.models import MODELS
from kdbench.core import yaml_strict
from kdbench.core.names import did_you_mean
from kdbench.core.plugins import import_modules
from kdbench.planning.budget import budget, cell_seeds
from kdbench.planning.budget import read_state as read_looks
from kdbench.planning.budget import state_path as looks_path
from kdbench.planning.suite_files import suite_file
from kdbench.planning.checks import SuiteError, check_file, check_suite
from kdbench.planning.checks import check_name as _check_name
from kdbench.planning.rehearsal import rehearse

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "suite.schema.yaml"


@dataclass
class Run:
    id: str
    spec: RunSpec
    experiment: str | None = None
    needs: tuple[str, ...] = ()  # run ids whose model.pt this run reads (teachers, probed model)
    method: MethodSpec | None = None  # what a fit run trains: its method with the suite's overrides, resolved once

    @property
    def kind(self) -> str:
        if self.spec.protocol == "linear_probe":
            return "probe"
        if self.spec.protocol == "import":  # a released teacher (kdbench.teachers.released)
            return "import"
        return "distill" if self.spec.teacher_ckpts else "train"


@dataclass(frozen=True)
class Cell:
    """One seed of one table cell: ``column`` is a method name or "teacher"."""

    experiment: str
    dataset: str
    teacher: str
    student: str
    column: str
    seed: int
    run: str


@dataclass
class Suite:
    name: str
    path: Path
    config: dict
    runs: dict[str, Run] = field(default_factory=dict)
    experiment_runs: dict[str, list[str]] = field(default_factory=dict)  # experiment -> run ids (incl. teachers)
    cells: list["Cell"] = field(default_factory=list)  # what each run is in each experiment's tables

    @property
    def runs_dir(self) -> str:
        return self.config.get("runs_dir", "runs")

    def run_dir(self, run_id: str) -> str:
        return f"{self.runs_dir}/{run_id}"

    def trained_teacher_experiments(self) -> set[str]:
        """Experiments whose teachers this suite trains (``teacher: train``): every student interval
        of theirs is conditional on that one teacher run (captions say so)."""
        return {c.experiment for c in self.cells if c.column == "teacher" and self.runs[c.run].kind == "train"}

    def fused_experiments(self) -> set[str]:
        """Experiments with runs trained fused (``pack: {fuse: true}``, :func:`_fused`): captions say so."""
        return {c.experiment for c in self.cells if self.runs[c.run].spec.execution.fuse}

    def synthetic_datasets(self) -> dict[str, dict]:
        return {n: d for n, d in self.config["datasets"].items() if "synthetic" in d}

    def pack_options(self, overrides: dict | None = None) -> dict:
        """The suite's ``pack: {size, fuse}``, where Snakemake's ``--config pack_size=N``
        (``overrides``) wins: packing is a choice of machine, not of suite, and changes no result
        beyond float rounding. Fusion is in the run ids (:func:`_fused`), so ``pack_fuse`` may only
        repeat the suite's own ``fuse``, and a fusing suite needs packs of 2 or more."""
        own, overrides = self.config.get("pack") or {}, overrides or {}
        size, fuse = overrides.get("pack_size", own.get("size", 1)), overrides.get("pack_fuse", own.get("fuse", False))
        if isinstance(fuse, str) and fuse.lower() in ("true", "false"):
            fuse = fuse.lower() == "true"
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or not isinstance(fuse, bool):
            raise SuiteError(f"pack_size={size!r} pack_fuse={fuse!r}: pack_size is a whole number >= 1 (1: one job "
                             f"per run), pack_fuse is true or false")
        if fuse != bool(own.get("fuse", False)) or (fuse and size < 2):  # fusion is in the run ids (_fused)
            raise SuiteError(f"pack_fuse={fuse} pack_size={size} with the suite's pack: {own}: fusion is part of the "
                             f"run ids (fused runs differ from unfused ones by about seed noise), so only the suite "
                             f"decides it: set `pack: {{size: N, fuse: true}}` (N >= 2) in the suite, or drop "
                             f"pack_fuse from --config")
        return {"size": size, "fuse": fuse}

    def packs(self, size: int) -> dict[str, list[str]]:
        """Pack id -> the runs one ``kdbench pack`` job trains together (one process, one device).

        Only distillations are packed (kind "distill"; teachers, plain students and probes stay one
        job each), and only those :func:`kdbench.engine.rules.unpackable` allows (not on streamed
        datasets, with an unlabelled stream or a validation holdout). Runs are grouped by what
        :func:`kdbench.engine.rules.pack_key` says packed runs share (dataset and root, execution
        options, batch size, teacher); inside a group
        they are ordered by student, method, seed, so same-student runs sit together (fusion fuses
        neighbours), and the group is cut into ceil(n/size) packs of near-equal size (a pack of
        one run is left to rule ``fit``). A pack's id names its dataset, teacher and students and
        ends with a hash of its run ids: same runs, same id. Run ids and folders do not depend on
        packing, so switching it does not retrain finished runs."""
        if size < 2:
            return {}
        groups: dict[str, list[Run]] = {}
        for run in self.runs.values():
            if run.kind == "distill" and unpackable(run.spec) is None:
                groups.setdefault(repr(pack_key(run.spec)), []).append(run)
        packs = {}
        for key in sorted(groups):
            runs = sorted(groups[key], key=lambda r: (r.spec.student, r.spec.method, r.spec.seed, r.id))
            n = math.ceil(len(runs) / size)
            cuts = [len(runs) * i // n for i in range(n + 1)]
            for chunk in (runs[a:b] for a, b in zip(cuts, cuts[1:])):
                if len(chunk) > 1:
                    packs[_pack_id(chunk)] = [r.id for r in chunk]
        return packs


def _hashed_defaults(terms, overrides: dict) -> dict:
    """``overrides`` with the defaults that the loss classes of ``terms`` list in ``hashed_defaults``
    filled in (parameters added after runs were named that change the loss: OT's ``center``), so a
    changed loss gets new run ids while methods without such terms keep theirs; an explicit value wins."""
    fill = {t: LOSSES.get(t).hashed_defaults for t in sorted(terms) if getattr(LOSSES.get(t), "hashed_defaults", None)}
    if not fill:
        return overrides
    given = overrides.get("params") or {}
    return {**overrides, "params": {t: {**fill.get(t, {}), **given.get(t, {})} for t in {**fill, **given}}}


def _fused(spec: RunSpec, cfg: dict) -> RunSpec:
    """``spec`` marked ``execution.fuse`` (hashed: a new run id) where the suite's ``pack: {fuse:
    true}`` lets ``kdbench pack --fuse`` fuse it: a packable distillation whose student is an
    architecture :mod:`kdbench.engine.fusion` supports. Teachers, plain students and other runs
    keep their ids. One left alone of its architecture in its pack trains unfused under the
    fused id: a separate id, never one shared with a run of the other kind."""
    from dataclasses import replace

    from kdbench.engine.fusion import SUPPORTED_ARCHS

    if (cfg.get("pack") or {}).get("fuse") and spec.student in SUPPORTED_ARCHS and unpackable(spec) is None:
        return replace(spec, execution=replace(spec.execution, fuse=True))
    return spec


def write_specs(suite: Suite, run_ids=None) -> int:
    """The planner's output: each run's :func:`kdbench.core.spec.job_record` in
    ``<runs_dir>/<id>/spec.json``, which its job reads instead of the suite (``kdbench distill
    --spec``). Written atomically, and only where the content changed, so an unchanged file keeps
    its time stamp. ``run_ids``: only these (default: all). Returns how many files were written."""
    from kdbench.core.io import atomic_write_json, read_json

    device, threads = suite.config.get("device", "auto"), suite.config.get("threads", 1)
    written = 0
    for rid in suite.runs if run_ids is None else run_ids:
        run = suite.runs[rid]
        m = run.method
        method = None if m is None else {"name": m.name, "ce": m.ce, "terms": m.terms, "params": m.params}
        record = json.loads(json.dumps(job_record(rid, run.kind, run.spec, method, device, threads), default=list))
        path = Path(suite.run_dir(rid)) / JOB_FILE
        if read_json(path) != record:
            atomic_write_json(path, record)
            written += 1
    return written


def _pack_id(runs: list[Run]) -> str:
    """``<dataset>.<teacher>--<student>[+<student>...].<8 hex digits of the run ids>``."""
    s = runs[0].spec
    teacher = f"{s.teacher_dataset}.{s.teacher}" if s.teacher_dataset not in (None, s.dataset) else s.teacher
    students = "+".join(dict.fromkeys(r.spec.student for r in runs))
    digest = hashlib.sha1("\n".join(sorted(r.id for r in runs)).encode()).hexdigest()[:8]
    return f"{s.dataset}.{teacher}--{students}.{digest}"


def load_suite(path: str | Path, check_files: bool = False) -> Suite:
    """Load and check a suite; ``check_files``: also require every dataset root and imported
    teacher file its runs read to exist (the pipeline checks this before any job)."""
    try:
        path = suite_file(path)
    except FileNotFoundError as e:
        raise SuiteError(str(e)) from None
    cfg = flatten(read_suite_file(path), path)
    if "rehearsal" in cfg:  # a real suite's values never pass through kdbench.planning.rehearsal
        cfg = rehearse(cfg)
    suite = build_suite(cfg, path)
    check_suite(suite, check_files)
    return suite


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(yaml_strict.load(SCHEMA))


def read_suite_file(path: Path) -> dict:
    if not path.is_file():
        raise SuiteError(f"suite file {path} not found")
    try:  # duplicate keys, non-finite numbers and YAML's 1e-3-is-a-string refused (kdbench.core.yaml_strict)
        cfg = yaml_strict.load(path) or {}
    except yaml_strict.StrictYamlError as e:
        raise SuiteError(str(e)) from None
    except yaml.YAMLError as e:
        raise SuiteError(f"{path} is not valid YAML: {e}") from None
    errors = sorted(_validator().iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            where = "/".join(map(str, e.absolute_path)) or "(top level)"
            msg = e.message
            if e.validator == "additionalProperties":
                allowed = list((e.schema.get("properties") or {}).keys())
                msg += f" — allowed keys here: {', '.join(allowed)}"
            elif e.context:  # oneOf/anyOf: say what the alternative of the value's own type wants
                kind = {list: "array", dict: "object", str: "string"}.get(type(e.instance))
                same = [c for c in e.context if (e.validator_value[c.relative_schema_path[0]] or {}).get("type") == kind]
                best = jsonschema.exceptions.best_match(same or e.context)
                inner = "/".join(map(str, best.absolute_path))
                msg += f" — closest form: {inner + ': ' if inner else ''}{best.message}"
                if e.schema.get("description"):
                    msg += f" ({e.schema['description']})"
            lines.append(f"  {where}: {msg}")
        raise SuiteError(f"{path} is not a valid suite:\n" + "\n".join(lines))
    try:  # external models and methods register their names before check_file checks any
        import_modules(cfg.get("imports") or [], str(path))
    except ImportError as e:
        raise SuiteError(str(e)) from e
    check_file(cfg, path)
    return cfg


def flatten(cfg: dict, path: Path, seen: tuple = ()) -> dict:
    """Fold the suite-level recipe, execution and teacher into each experiment, attach the suite's
    methods and term_params to it (``suite_overrides``, merged by :func:`_method_overrides`), and
    merge the included suites, so a run resolves identically whichever suite names it (and is run once)."""
    here = path.resolve()
    if here in seen:
        raise SuiteError(f"{path}: include cycle through {' -> '.join(map(str, seen))}")
    out = {k: v for k, v in cfg.items() if k not in ("include", "recipe", "methods", "term_params", "execution")}
    out["datasets"], out["experiments"], out["tables"] = {}, [], []

    def add(sub: dict, where: Path) -> None:
        for name, d in sub.get("datasets", {}).items():
            if out["datasets"].setdefault(name, d) != d:
                raise SuiteError(f"{where}: dataset {name!r} is declared differently in two included suites")
        for key in ("experiments", "tables"):
            for item in sub.get(key, []):
                twin = next((x for x in out[key] if x["name"] == item["name"]), None)
                if twin is None:
                    out[key].append(item)
                elif twin != item:
                    raise SuiteError(f"{where}: {key[:-1]} {item['name']!r} is defined differently in two suites")

    for inc in cfg.get("include", []):
        ipath = path.parent / inc
        add(flatten(read_suite_file(ipath), ipath, seen + (here,)), ipath)
    recipe, methods, terms = cfg.get("recipe") or {}, cfg.get("methods") or {}, cfg.get("term_params") or {}
    own = []
    for exp in cfg.get("experiments", []):
        e = dict(exp)
        e["recipe"] = Recipe.layer(recipe, exp.get("recipe"))
        if "teacher_recipe" in exp:
            e["teacher_recipe"] = Recipe.layer(recipe, exp["teacher_recipe"])
        if "teacher" in cfg:  # the suite's teacher source, unless the experiment names its own
            e.setdefault("teacher", cfg["teacher"])
        if methods or terms:  # merged under the experiment's own by _method_overrides
            e["suite_overrides"] = {"methods": methods, "term_params": terms}
        e["execution"] = {**(cfg.get("execution") or {}), **(exp.get("execution") or {})}
        own.append(e)
    add({"datasets": cfg.get("datasets", {}), "experiments": own, "tables": cfg.get("tables", [])}, path)
    if not out["experiments"]:
        raise SuiteError(f"{path}: a suite needs experiments (its own or through include)")
    return out


def build_suite(cfg: dict, path: Path) -> Suite:
    """The suite of a flattened ``cfg``; every file's ``imports:`` were imported when it was read."""
    suite = Suite(cfg["name"], path, cfg)
    for name in cfg["datasets"]:
        _check_name("dataset", name, DATASETS.names(), f"{path}: datasets")
    base_recipe = cfg.get("recipe") or {}
    seen_exp = set()
    for exp in cfg["experiments"]:
        where = f"{path}: experiment {exp['name']!r}"
        if exp["name"] in seen_exp:
            raise SuiteError(f"{where}: duplicate experiment name")
        seen_exp.add(exp["name"])
        _check_name("dataset", exp["dataset"], cfg["datasets"], where + " (datasets declared in this suite)")
        for t, s in exp["pairs"]:
            _check_name("architecture", t, MODELS.names(), where)
            _check_name("architecture", s, MODELS.names(), where)
        for m in exp["methods"]:
            _check_name("method", m, METHODS.names(), where)
        for m in exp.get("method_overrides", {}):
            _check_name("method", m, METHODS.names(), where + " (method overrides)")
        for t in exp.get("term_params", {}):
            _check_name("distillation term", t, LOSSES.names(), where + " (term_params)")
        methods = _experiment_methods(exp, where)
        _check_transfer(cfg, exp, where)
        try:
            recipe = Recipe.from_config(Recipe.layer(base_recipe, exp.get("recipe")))
            teacher_recipe = Recipe.from_config(Recipe.layer(base_recipe, exp.get("teacher_recipe") or exp.get("recipe")))
        except ValueError as e:
            raise SuiteError(f"{where}: {e}") from None
        ids = suite.experiment_runs.setdefault(exp["name"], [])
        for cell, run in _experiment_runs(cfg, exp, methods, recipe, teacher_recipe, suite.runs_dir):
            suite.runs.setdefault(run.id, run)
            suite.cells.append(cell)
            if run.id not in ids:
                ids.append(run.id)
    for table in cfg.get("tables", []):
        for e in table["experiments"]:
            _check_name("experiment", e, seen_exp, f"{path}: table {table['name']!r}")
    return suite


def _check_transfer(cfg: dict, exp: dict, where: str) -> None:
    """Every dataset and teacher an experiment names must be declared (what each run can do is
    :func:`_check_run`'s)."""
    if "teacher_dataset" in exp:
        _check_name("dataset", exp["teacher_dataset"], cfg["datasets"], where + " (teacher_dataset, datasets declared in this suite)")
    for pds in (exp.get("linear_probe") or {}).get("datasets", []):
        _check_name("dataset", pds, cfg["datasets"], where + " (linear_probe, datasets declared in this suite)")
    for arch in exp.get("teacher_checkpoints", {}):
        if arch not in {t for t, _ in exp["pairs"]}:
            raise SuiteError(f"{where}: teacher_checkpoints names {arch!r}, which is no teacher of this experiment")


def _check_run(spec: RunSpec, exp: dict, method: MethodSpec) -> None:
    """What a run cannot do (:func:`kdbench.engine.rules.run_problems`: cross-dataset with logit
    methods, ensembles with stage features, an unusable unlabelled stream), before any job runs."""
    try:
        problems = run_problems(spec, method=method)
    except ValueError as e:  # a term refuses parameters it cannot read (e.g. OT layers)
        problems = [str(e)]
    if problems:
        raise SuiteError(f"experiment {exp['name']!r}: {problems[0]}")


@dataclass(frozen=True)
class Variant:
    """One way an experiment runs a method: its table ``column`` (the method, or
    ``method[key=value,...]`` for a sweep point), the ``overrides`` its runs hash
    (``RunSpec.method_overrides``) and the ``method`` they train (resolved once, here)."""

    column: str
    overrides: dict
    method: MethodSpec


def _method_overrides(exp: dict, method: str) -> dict:
    """The overrides that runs of ``method`` in ``exp`` hash: where a suite value meets the method
    (the one merge, :func:`kdbench.methods.merge_overrides`), lowest first: the suite's
    ``term_params`` and the experiment's (each for the method's terms only), the suite's
    ``methods:`` entry and the experiment's ``method_overrides`` entry. ``term_params: {kd: {T:
    2}}`` gives ``{"params": {"kd": {"T": 2}}}`` to every method with a ``kd`` term."""
    suite = exp.get("suite_overrides") or {}
    own = [(suite.get("methods") or {}).get(method), (exp.get("method_overrides") or {}).get(method)]
    terms = merge_overrides({"terms": METHODS.get(method).terms}, *own)["terms"]
    shared = [{"params": {t: p for t, p in (block or {}).items() if t in terms}}
              for block in (suite.get("term_params"), exp.get("term_params"))]
    out = merge_overrides(*shared, *own)
    if "params" in (own[0] or {}):  # a suite `methods:` entry's `params: {}` has always been hashed: ids stay
        out.setdefault("params", {})
    return out


def _check_validation(exp: dict, where: str, terms: set[str]) -> None:
    """``validation`` and ``sweep``: a sweep needs a holdout, and each sweep key must name a term
    (its loss weight), a term's parameter or ``ce`` that some method of the experiment has
    (``terms``: the terms of the experiment's methods)."""
    if exp.get("validation") is not None and exp.get("linear_probe"):
        raise SuiteError(f"{where}: validation and linear_probe cannot be combined (the probe would train and be "
                         f"scored on the probe dataset's test set); tune in an experiment without linear_probe")
    sweep = exp.get("sweep")
    if not sweep:
        return
    if exp.get("validation") is None:
        raise SuiteError(f"{where}: a sweep needs `validation: {{size: N, seed: S}}`: its runs must be scored on a "
                         f"held-out part of the training set, never on the test set (choosing values by test "
                         f"accuracy is tuning on the test set). Retrain the chosen value without validation")
    choices = ", ".join(sorted(terms)) or "(none: no method of this experiment distils)"
    if "ce" in sweep and not terms:
        raise SuiteError(f"{where}: sweep key 'ce' applies to distillations, and this experiment has none")
    for key, values in sweep.items():
        term, _, param = key.partition(".")
        if key.endswith(".") or key.startswith("."):
            raise SuiteError(f"{where}: sweep key {key!r}: write ce, a term (its loss weight) or term.param")
        if key != "ce" and term not in terms:
            known = "" if term in LOSSES.names() else " (no such distillation term)"
            hint = did_you_mean(term, terms)
            raise SuiteError(f"{where}: sweep key {key!r}: no method of this experiment has the term {term!r}{known}."
                             f"{hint} Valid keys: ce, or <term> (its loss weight) or <term>.<param> of the terms "
                             f"{choices}")
        if param:
            sig = inspect.signature(LOSSES.get(term).__init__)
            valid = [n for n, p in sig.parameters.items() if n not in ("self", "ctx")
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if param not in valid:
                raise SuiteError(f"{where}: sweep key {key!r}: {term!r} has no parameter {param!r}; valid: "
                                 f"{', '.join(valid) or '(none)'}")
        elif any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise SuiteError(f"{where}: sweep key {key!r}: a loss weight takes numbers, not {values!r}")
        if len({repr(v) for v in values}) != len(values):
            raise SuiteError(f"{where}: sweep key {key!r}: repeated values {values!r}")


def _format_value(v) -> str:
    return format(v, "g") if isinstance(v, float) else str(v)


def _method_variants(exp: dict, base: Variant) -> list[Variant]:
    """Each run variant of ``base`` (a method as the experiment sets it): ``base`` alone without a
    sweep or when the method has none of the swept terms; else one per point of the grid
    (cartesian product) of the sweep keys that apply to it, named ``method[key=value,...]``.
    ``ce`` applies to distillations (methods with terms), ``term`` / ``term.param`` to methods
    with that term. The value enters the run through its method overrides (so its run id): the
    point is the top layer of :func:`kdbench.methods.merge_overrides`."""
    spec = base.method
    keys = [k for k in (exp.get("sweep") or {})
            if (k == "ce" and spec.terms) or k.partition(".")[0] in spec.terms]
    if not keys:
        return [base]
    out = []
    for values in itertools.product(*(exp["sweep"][k] for k in keys)):
        point = {"terms": dict(spec.terms), "params": {}}
        for key, v in zip(keys, values):
            term, _, param = key.partition(".")
            if key == "ce":
                point["ce"] = float(v)
            elif param:
                point["params"].setdefault(term, {})[param] = v
            else:
                point["terms"][term] = float(v)
        own = merge_overrides(base.overrides, point)
        column = f"{base.column}[{','.join(f'{k}={_format_value(v)}' for k, v in zip(keys, values))}]"
        out.append(Variant(column, own, resolve_method(base.column, own)))
    return out


def _experiment_methods(exp: dict, where: str) -> dict[str, list[Variant]]:
    """Method name -> its variants in ``exp`` (``student`` too: the plain runs), each resolved once."""
    bases = {m: _variant(exp, m) for m in dict.fromkeys([*exp["methods"], "student"])}
    _check_validation(exp, where, {t for m in exp["methods"] for t in bases[m].method.terms})
    return {m: _method_variants(exp, b) for m, b in bases.items()}


def _variant(exp: dict, method: str) -> Variant:
    own = _method_overrides(exp, method)
    own = _hashed_defaults(own.get("terms") or METHODS.get(method).terms, own)  # sweeps build on it
    return Variant(method, own, resolve_method(method, own))


def _experiment_runs(cfg: dict, exp: dict, methods: dict[str, list[Variant]], recipe: Recipe, teacher_recipe: Recipe,
                     runs_dir: str):
    ds = exp["dataset"]
    root = cfg["datasets"][ds]["root"]
    execution = Execution.from_config(exp.get("execution"))
    try:  # seeds as a budget: each cell's seeds so far (kdbench.commands.looks)
        declared = {"name": exp["name"], "seeds": exp["seeds"]}  # all the budget reads of the experiment
        looks, looks_file = (read_looks(cfg), str(looks_path(cfg))) if budget(declared) else ({}, "")
        cell_seeds(declared, "", "", "", looks, looks_file)
    except ValueError as e:
        raise SuiteError(f"{cfg.get('name')}: {e}") from None
    tds = exp.get("teacher_dataset", ds)  # cross_dataset_distill when it differs
    external = exp.get("teacher_checkpoints", {})

    def data_id(dataset: str) -> str | None:
        return dataset_identity(dataset, cfg["datasets"][dataset])

    validation = exp.get("validation")  # the students' holdout; teachers train on the full training set
    rehearsal = "rehearsal" in cfg  # kdbench.planning.rehearsal: in every run's hash

    def scratch(arch: str, seed: int, recipe: Recipe = recipe, dataset: str = ds, validation: dict | None = None) -> Run:
        plain = methods["student"][0]
        spec = RunSpec(dataset, cfg["datasets"][dataset]["root"], arch, "student", seed, recipe=recipe,
                       method_overrides=plain.overrides, execution=execution, validation=validation,
                       data_id=data_id(dataset), rehearsal=rehearsal)
        return Run(run_id(spec), spec, exp["name"], method=plain.method)

    def probes(column: str, seed: int, src: Run, t_arch: str, s_arch: str):
        """linear_probe: the frozen model of ``src`` gets a new linear layer on each probe dataset."""
        lp = exp.get("linear_probe")
        if not lp:
            return
        probe_recipe = Recipe.from_config(Recipe.layer(PROBE_RECIPE, lp.get("recipe"), defaults=PROBE_RECIPE))
        for pds in lp["datasets"]:
            spec = RunSpec(pds, cfg["datasets"][pds]["root"], src.spec.student, "student", seed, recipe=probe_recipe,
                           protocol="linear_probe", init_ckpt=f"{runs_dir}/{src.id}/model.pt", init_id=src.id,
                           execution=execution, data_id=data_id(pds), rehearsal=rehearsal)
            run = Run(run_id(spec), spec, exp["name"], (src.id,))
            yield Cell(exp["name"], pds, t_arch, s_arch, column, seed, run.id), run

    for t_arch, s_arch in exp["pairs"]:
        def cell(column: str, seed: int, run: Run):
            yield Cell(exp["name"], ds, t_arch, s_arch, column, seed, run.id), run
            yield from probes(column, seed, run, t_arch, s_arch)

        teacher_seeds = exp.get("teacher_seeds", [0])
        if _teacher_source(exp, t_arch) == "released":
            imported = _released_run(cfg, exp, t_arch, tds)
            teachers, ckpts, tids = [imported], (f"{runs_dir}/{imported.id}/model.pt",), (imported.id,)
            yield from cell("teacher", 0, imported)
        elif t_arch in external:
            paths = external[t_arch] if isinstance(external[t_arch], list) else [external[t_arch]]
            teachers, ckpts, tids = [], tuple(paths), tuple(_teacher_file_id(p, exp) for p in paths)
        else:
            teachers = [scratch(t_arch, ts, teacher_recipe, tds) for ts in teacher_seeds]
            ckpts, tids = tuple(f"{runs_dir}/{t.id}/model.pt" for t in teachers), tuple(t.id for t in teachers)
            for ts, t in zip(teacher_seeds, teachers):
                yield from cell("teacher", ts, t)
        for method in exp["methods"]:
            for variant in methods[method]:  # one, or one per sweep point
                for seed in cell_seeds(declared, t_arch, s_arch, variant.column, looks, looks_file):
                    if not METHODS.get(method).needs_teacher:
                        yield from cell(variant.column, seed, scratch(s_arch, seed, validation=validation))
                        continue
                    spec = RunSpec(ds, root, s_arch, method, seed, t_arch, ckpts, tids, variant.overrides, recipe,
                                   teacher_dataset=None if tds == ds else tds, execution=execution,
                                   unlabeled=exp.get("unlabeled"), validation=validation, data_id=data_id(ds),
                                   rehearsal=rehearsal)
                    spec = _fused(spec, cfg)
                    _check_run(spec, exp, variant.method)
                    run = Run(run_id(spec), spec, exp["name"], tuple(t.id for t in teachers), variant.method)
                    yield from cell(variant.column, seed, run)


def _teacher_file_id(path: str, exp: dict) -> str:
    """An imported teacher enters run ids by its content (``sha256:<hex>``), so it must exist."""
    try:
        return teacher_file_id(path)
    except FileNotFoundError:
        raise SuiteError(f"experiment {exp['name']!r}: teacher_checkpoints file {path} not found (paths are relative "
                         f"to the directory snakemake runs in). Import the published checkpoint there with "
                         f"`kdbench import-teacher SOURCE {path}`, or correct the path") from None


def _teacher_source(exp: dict, t_arch: str) -> str:
    """``teacher:`` of an experiment (or its suite): ``train`` (the default: a teacher run per
    teacher seed), ``released`` (the checkpoint the papers used, :mod:`kdbench.teachers.released`),
    or a mapping teacher architecture -> one of these (unnamed teachers are trained)."""
    source = exp.get("teacher", "train")
    if isinstance(source, dict):
        unknown = set(source) - {t for t, _ in exp["pairs"]}
        if unknown:
            raise SuiteError(f"experiment {exp['name']!r}: teacher: names {sorted(unknown)}, which are no teachers of "
                             f"this experiment (its teachers: {sorted({t for t, _ in exp['pairs']})})")
        return source.get(t_arch, "train")
    return source


def _released_run(cfg: dict, exp: dict, t_arch: str, dataset: str) -> Run:
    """The import run of ``t_arch``'s released teacher: its id hashes the source's identity (the
    file is fetched by the run's job, after the suite is loaded)."""
    from kdbench.teachers.released import released_teacher

    where = f"experiment {exp['name']!r}: teacher: released"
    if t_arch in exp.get("teacher_checkpoints", {}):
        raise SuiteError(f"{where} and teacher_checkpoints both give the {t_arch} teacher; keep one (to use the file, "
                         f"set this experiment's teacher: {{{t_arch}: train}} or remove teacher: released)")
    if "teacher_seeds" in exp:
        raise SuiteError(f"{where}: a released teacher is one file; teacher_seeds (trained teachers, ensembles) "
                         f"applies with teacher: train")
    try:
        rt = released_teacher(dataset, t_arch)
    except KeyError as e:
        raise SuiteError(f"{where}: {e.args[0]}") from None
    spec = RunSpec(dataset, cfg["datasets"][dataset]["root"], t_arch, "student", 0, protocol="import",
                   init_id=rt.identity(), rehearsal="rehearsal" in cfg)
    return Run(run_id(spec, rt.source), spec, exp["name"])
