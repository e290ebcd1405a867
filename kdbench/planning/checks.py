"""Checks a suite must pass before any job runs, beyond its schema.

The schema (``schemas/suite.schema.yaml``) fixes the keys and types; these checks read the
values: names against the registries and the terms' signatures (with "did you mean"), duplicate
names, seeds, methods and pairs, overrides that would apply to nothing, non-finite weights,
devices torch cannot parse, lr milestones that never take effect, holdouts as large as the
training set, and (``check_files``) the files a suite names. Each message says where and what
to change. :func:`check_file` reads one suite file as written (before includes are merged);
:func:`check_suite` reads the resolved runs.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import warnings
from collections import Counter
from pathlib import Path


class SuiteError(ValueError):
    """An invalid suite file; the message names the location and the valid choices."""


def check_name(kind: str, name: str, valid, where: str) -> None:
    if name not in valid:
        raise SuiteError(f"{where}: unknown {kind} {name!r}.{did_you_mean(name, valid)} "
                         f"Valid {kind}s: {', '.join(sorted(valid))}")


def did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=3)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def term_parameters(term: str) -> list[str]:
    """The keyword parameters of a distillation term's constructor (what ``params`` may set),
    following ``**kwargs`` to the parent classes that receive them."""
    from kdbench.methods import LOSSES

    names: list[str] = []
    for cls in LOSSES.get(term).__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names += [p.name for p in params if p.name not in ("self", "ctx") and p.name not in names
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def check_term_params(term: str, params: dict, where: str) -> None:
    valid = term_parameters(term)
    for p in params:
        if p not in valid:
            raise SuiteError(f"{where}: the term {term!r} has no parameter {p!r}.{did_you_mean(p, valid)} "
                             f"Valid parameters of {term!r}: {', '.join(valid) or '(none)'}")


# ---- one suite file, as written ---------------------------------------------------------------

def check_file(cfg: dict, path: Path) -> None:
    """Checks of one suite file's own content (schema-valid), before includes are merged."""
    from kdbench.methods import METHODS

    _check_device(cfg.get("device", "auto"), f"{path}: device")
    for key in ("experiments", "tables"):
        _unique([item["name"] for item in cfg.get(key, [])], f"{path}: {key}", f"two {key} named",
                "give each a different name (or delete the copy)")
    own = cfg.get("experiments", [])
    run_anywhere = {m for exp in own for m in exp["methods"]}
    includes = bool(cfg.get("include"))
    for method, over in (cfg.get("methods") or {}).items():
        where = f"{path}: methods: {method}"
        check_name("method", method, METHODS.names(), where)
        if method not in run_anywhere:
            raise SuiteError(f"{where}: overrides a method that no experiment of this suite runs (its experiments "
                             f"run: {', '.join(sorted(run_anywhere)) or 'nothing'}). Delete the override or add "
                             f"{method!r} to an experiment's methods")
        _check_override(method, over, where)
    _check_term_params(cfg.get("term_params") or {}, {m for m in run_anywhere if m in METHODS}, includes,
                       f"{path}: term_params")
    for exp in own:
        where = f"{path}: experiment {exp['name']!r}"
        for key, fix in (("seeds", "list each seed once"), ("teacher_seeds", "list each teacher seed once"),
                         ("methods", "list each method once"), ("pairs", "list each [teacher, student] pair once")):
            if isinstance(exp.get(key), list):
                _unique([tuple(v) if isinstance(v, list) else v for v in exp[key]], f"{where}: {key}",
                        "repeats", fix)
        for method, over in (exp.get("method_overrides") or {}).items():
            w = f"{where}: method_overrides: {method}"
            check_name("method", method, METHODS.names(), w)
            if method not in exp["methods"]:
                raise SuiteError(f"{w}: overrides a method this experiment does not run (it runs "
                                 f"{', '.join(exp['methods'])}). Delete the override or add {method!r} to its methods")
            _check_override(method, over, w)
        exp_methods = {m for m in exp["methods"] if m in METHODS}
        _check_term_params(exp.get("term_params") or {}, exp_methods, False, f"{where}: term_params")
        _check_device_free_keys(exp, where)


def _unique(values: list, where: str, what: str, fix: str) -> None:
    twice = [v for v, n in Counter(values).items() if n > 1]
    if twice:
        shown = ", ".join(repr(list(v)) if isinstance(v, tuple) else repr(v) for v in twice)
        raise SuiteError(f"{where}: {what} {shown}: {fix}")


def _check_device(device: str, where: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(device)):
        raise SuiteError(f"{where}: {device!r} is not a device. Valid: auto (CUDA if available, else CPU), cpu, "
                         f"cuda, cuda:N (GPU number N), mps")


def _finite(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SuiteError(f"{where}: {value!r} is not a finite number; write a number such as 1.0")


def _check_override(method: str, over: dict, where: str) -> None:
    """A method override ``{ce, terms, params}``: finite weights, known terms, parameters that
    the terms take, and params only for terms the (overridden) method has."""
    from kdbench.methods import LOSSES, METHODS

    if "ce" in over:
        _finite(over["ce"], f"{where}: ce")
    for term, weight in (over.get("terms") or {}).items():
        check_name("distillation term", term, LOSSES.names(), f"{where}: terms")
        _finite(weight, f"{where}: terms: {term}")
    terms = set(over.get("terms") or METHODS.get(method).terms)
    for term, params in (over.get("params") or {}).items():
        if term not in terms:
            raise SuiteError(f"{where}: params: {method!r} has no term {term!r}.{did_you_mean(term, terms)} Its "
                             f"terms: {', '.join(sorted(terms)) or '(none: it is plain CE)'}")
        check_term_params(term, params, f"{where}: params: {term}")


def _check_term_params(term_params: dict, methods: set[str], includes: bool, where: str) -> None:
    from kdbench.methods import LOSSES, METHODS

    used = {t for m in methods for t in METHODS.get(m).terms}
    for term, params in term_params.items():
        check_name("distillation term", term, LOSSES.names(), where)
        check_term_params(term, params, f"{where}: {term}")
        if term not in used:
            msg = (f"{where}: {term!r} is a term of no method run here (terms in use: "
                   f"{', '.join(sorted(used)) or 'none'}); its parameters apply to nothing")
            if not includes:
                raise SuiteError(msg + ". Delete the entry or run a method that has the term")
            warnings.warn(msg, stacklevel=2)


def _check_device_free_keys(exp: dict, where: str) -> None:
    """Values in an experiment that the schema cannot bound: the sweep's loss weights stay
    finite (the sweep's own checks live in kdbench.planning.suite)."""
    for key, values in (exp.get("sweep") or {}).items():
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise SuiteError(f"{where}: sweep: {key}: {v!r} is not a finite number")


# ---- the resolved suite ------------------------------------------------------------------------

def check_suite(suite, check_files: bool = False) -> None:
    """Checks of the resolved runs: recipes, holdouts and (``check_files``) that every dataset
    root and imported teacher file the runs read exists (existence only: nothing is read)."""
    seen: set[tuple] = set()
    for run in suite.runs.values():
        spec, where = run.spec, f"{suite.path}: experiment {run.experiment!r}"
        key = (run.experiment, spec.recipe)
        if key not in seen:
            seen.add(key)
            _check_recipe(spec.recipe, where + (" (teacher recipe)" if run.kind == "train" and
                                                 spec.validation is None and _is_teacher(suite, run.id) else ""))
        if spec.validation is not None:
            _check_holdout(suite, spec, where)
    if check_files:
        check_files_exist(suite)


def _is_teacher(suite, run_id: str) -> bool:
    return any(c.run == run_id and c.column == "teacher" for c in suite.cells)


def _check_recipe(recipe, where: str) -> None:
    from kdbench.core.spec import scale_milestones

    ms = list(recipe.milestones)
    scaled_default = list(scale_milestones(type(recipe).milestones, type(recipe).epochs, recipe.epochs))
    if recipe.schedule == "step" and ms != scaled_default:  # milestones someone wrote
        if ms != sorted(set(ms)):
            raise SuiteError(f"{where}: recipe milestones {ms} must be strictly increasing, e.g. "
                             f"{sorted(set(ms))}")
        late = [m for m in ms if not 1 <= m < recipe.epochs]
        if late:
            raise SuiteError(f"{where}: recipe milestones {late} never take effect in {recipe.epochs} epochs (the lr "
                             f"drops once the epoch passes a milestone, epochs count from 1): use milestones between "
                             f"1 and {recipe.epochs - 1}, or omit them to scale 150/180/210 of 240 to {recipe.epochs}")
    for name in ("lr", "weight_decay", "momentum"):
        v = getattr(recipe, name, None)
        if v is not None and (not math.isfinite(v) or v < 0 or (name == "lr" and v == 0)):
            raise SuiteError(f"{where}: recipe {name} {v!r} must be a finite number"
                             f"{' > 0' if name == 'lr' else ' >= 0'}")


def _train_size(suite, dataset: str) -> int | None:
    from kdbench.data import DATASETS

    d = suite.config["datasets"].get(dataset, {})
    syn = d.get("synthetic")
    if syn is not None:
        return syn.get("classes", 10) * syn.get("train_per_class", 100)
    return getattr(DATASETS.get(dataset), "train_size", None) if dataset in DATASETS else None


def _check_holdout(suite, spec, where: str) -> None:
    n = _train_size(suite, spec.dataset)
    size = spec.validation["size"]
    if n is not None and size >= n:
        raise SuiteError(f"{where}: validation size {size} must be smaller than the {n} training images of "
                         f"{spec.dataset} (the students train on the rest); FKD held out 5,000 of CIFAR-10's 50,000")


def check_files_exist(suite) -> None:
    """Every real dataset root and imported teacher file the suite's runs read exists."""
    from kdbench.data import DATASETS

    missing: list[str] = []
    synthetic = suite.synthetic_datasets()
    roots = {(s.dataset, s.data_root) for s in (r.spec for r in suite.runs.values())}
    roots |= {(s.teacher_dataset, suite.config["datasets"][s.teacher_dataset]["root"])
              for s in (r.spec for r in suite.runs.values()) if s.teacher_dataset}
    for name, root in sorted(roots):
        if name not in synthetic and not Path(root).exists():
            howto = f"kdbench fetch {name} --root {root}" if name in DATASETS else "see the README's Datasets section"
            missing.append(f"dataset {name!r}: its root {root} does not exist. Get it with `{howto}`, or point "
                           f"`datasets: {name}: root:` at your copy")
    produced = {f"{suite.runs_dir}/{r}/model.pt" for r in suite.runs}
    ckpts = sorted({p for r in suite.runs.values() for p in (r.spec.teacher_ckpts + ((r.spec.init_ckpt,)
                    if r.spec.init_ckpt else ())) if p not in produced})
    for p in ckpts:
        if not Path(p).is_file():
            missing.append(f"teacher file {p} does not exist. Import a published checkpoint with `kdbench "
                           f"import-teacher SRC {p}`, or fix the path in teacher_checkpoints")
    if missing:
        raise SuiteError(f"{suite.path}: " + "\n  ".join(["files the runs need are missing:"] + missing))
