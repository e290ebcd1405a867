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

import inspect
import math
import re
import warnings
from collections import Counter
from pathlib import Path

from kdbench.core.names import did_you_mean  # noqa: F401  (re-exported: checks' messages and older callers)


class SuiteError(ValueError):
    """An invalid suite file; the message names the location and the valid choices."""


def check_name(kind: str, name: str, valid, where: str) -> None:
    if name not in valid:
        raise SuiteError(f"{where}: unknown {kind} {name!r}.{did_you_mean(name, valid)} "
                         f"Valid {kind}s: {', '.join(sorted(valid))}")


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


def term_defaults(term: str) -> dict:
    """Parameter -> its default value, for the keyword parameters of a term that have one."""
    from kdbench.methods import LOSSES

    out: dict = {}
    for cls in LOSSES.get(term).__mro__:
        if "__init__" in vars(cls):
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.default is not p.empty:
                    out.setdefault(p.name, p.default)
    return out


def _same_kind(value, default) -> bool:
    """Whether ``value`` may stand where the term's default ``default`` does: a bool for a bool,
    a number for a number. Other defaults are not checked (a term may read a string default
    or a list, e.g. OT's and ReMD's ``layers``)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def check_term_params(term: str, params: dict, where: str) -> None:
    valid = term_parameters(term)
    defaults = term_defaults(term)
    for p, value in params.items():
        if p not in valid:
            raise SuiteError(f"{where}: the term {term!r} has no parameter {p!r}.{did_you_mean(p, valid)} "
                             f"Valid parameters of {term!r}: {', '.join(valid) or '(none)'}")
        if p in defaults and not _same_kind(value, defaults[p]):
            raise SuiteError(f"{where}: {p}: {value!r} is not a value of {term!r}'s {p}: it takes a "
                             f"{'true/false' if isinstance(defaults[p], bool) else 'number'}, like its default "
                             f"{defaults[p]!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SuiteError(f"{where}: {p}: {value!r} is not a finite number")


# ---- one suite file, as written ---------------------------------------------------------------

def check_file(cfg: dict, path: Path) -> None:
    """Checks of one suite file's own content (schema-valid), before includes are merged."""
    from kdbench.methods import METHODS

    _check_device(cfg.get("device", "auto"), f"{path}: device")
    for key in ("experiments", "tables"):
        _unique([item["name"] for item in cfg.get(key, [])], f"{path}: {key}", f"two {key} named",
                "give each a different name (or delete the copy)")
    own = cfg.get("experiments", [])
    for exp in own:  # the names first: what follows reads the methods' terms
        for m in exp["methods"]:
            check_name("method", m, METHODS.names(), f"{path}: experiment {exp['name']!r}")
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
    _check_recipe_effects(cfg, path)
    _check_paths(cfg, path)
    _check_table_keys(cfg, path)


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
    if "terms" in over and not over["terms"] and METHODS.get(method).needs_teacher:
        raise SuiteError(f"{where}: terms: {{}} leaves {method!r} no distillation term (it would train with plain CE "
                         f"and still read a teacher). Name its terms, or run the method student")
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


#: keys a path is written in: (where, the path strings of one suite file)
def _path_values(cfg: dict):
    for inc in cfg.get("include") or []:
        yield "include", inc
    if "runs_dir" in cfg:
        yield "runs_dir", cfg["runs_dir"]
    for name, d in (cfg.get("datasets") or {}).items():
        yield f"datasets: {name}: root", d["root"]
    for block in [cfg.get("execution") or {}] + [e.get("execution") or {} for e in cfg.get("experiments", [])]:
        if block.get("cache_dir"):
            yield "execution: cache_dir", block["cache_dir"]
    for exp in cfg.get("experiments", []):
        for arch, files in (exp.get("teacher_checkpoints") or {}).items():
            for f in files if isinstance(files, list) else [files]:
                yield f"experiment {exp['name']!r}: teacher_checkpoints: {arch}", f
    for t in cfg.get("tables", []):
        if "like" in t:
            yield f"table {t['name']!r}: like: suite", t["like"]["suite"]


def _check_paths(cfg: dict, path: Path) -> None:
    """Paths are taken as written (relative to the folder snakemake runs in, includes to the
    suite's folder): a shell would expand ``~`` and ``$VAR``, kdbench does not, so a path that
    relies on it is refused rather than read as a folder literally named ``~`` or ``$HOME``.
    (Choice: refuse, not expand — an expanded path would differ per user and machine, and
    dataset roots and teacher files are part of what a suite says.)"""
    for where, value in _path_values(cfg):
        if value.startswith("~") or "$" in value:
            what = "`~`" if value.startswith("~") else "`$`"
            raise SuiteError(f"{path}: {where}: {value!r} relies on the shell's {what} expansion, which kdbench does "
                             f"not do (paths are taken as written). Write the path out, e.g. an absolute path or "
                             f"one relative to the folder snakemake runs in")


#: recipe keys that only the step schedule reads, and those only the cosine schedule reads
STEP_ONLY, COSINE_ONLY = ("milestones", "lr_decay"), ("warmup_epochs",)


def _check_recipe_effects(cfg: dict, path: Path) -> None:
    """A recipe key that the schedule of every run it reaches never reads is refused: milestones
    or lr_decay under the cosine schedule, warmup_epochs (> 0) under the step schedule. An
    experiment's recipe and teacher_recipe reach their own runs; the suite's recipe reaches every
    run of this file's experiments (their blocks laid over it) — so a suite-level milestone list
    is refused only when no run of the file uses the step schedule."""
    base = cfg.get("recipe") or {}
    blocks = {}  # where -> (block as written, the schedules of the runs it reaches)
    for exp in cfg.get("experiments", []):
        for key in ("recipe", "teacher_recipe"):
            if key == "teacher_recipe" and key not in exp:
                continue
            own = exp.get(key) or {}
            schedule = {**base, **own}.get("schedule", "step")
            blocks[f"experiment {exp['name']!r}: {key}"] = (own, {schedule})
            blocks.setdefault("recipe", (base, set()))[1].add(schedule)
    for where, (block, schedules) in blocks.items():
        for schedule, keys in (("cosine", STEP_ONLY), ("step", COSINE_ONLY)):
            idle = [k for k in keys if block.get(k) not in (None, 0)]
            if idle and schedules == {schedule}:
                other = "step" if schedule == "cosine" else "cosine"
                raise SuiteError(f"{path}: {where}: {', '.join(idle)} take no effect with the {schedule} schedule "
                                 f"(only the {other} schedule reads them). Delete them, or set schedule: {other}")


#: table keys only a paper table (one with rows, published or like) reads
PAPER_TABLE_ONLY = ("primary", "alpha", "layout", "published_runs", "groups", "figure", "stand_in")


def _check_table_keys(cfg: dict, path: Path) -> None:
    for t in cfg.get("tables", []):
        where = f"{path}: table {t['name']!r}"
        idle = [k for k in PAPER_TABLE_ONLY if k in t and not _is_paper(t)]
        if idle:
            raise SuiteError(f"{where}: {', '.join(idle)} take no effect on a seed table (they configure a paper "
                             f"table: one with rows, published or like). Delete them, or give the table rows or "
                             f"published")
        if "stand_in" in t and "like" not in t:
            raise SuiteError(f"{where}: stand_in takes effect only with like (a miniature of another suite's "
                             f"table). Delete it, or add like: {{suite: ...}}")
        for filt, w in [(t.get("published"), "published")] + [
                (({**(t.get("published") or {}), **g["published"]}), f"groups: {g.get('label', i)}: published")
                for i, g in enumerate(t.get("groups") or []) if g.get("published")]:
            if not filt or _published_rows(filt):
                continue
            msg = (f"{where}: {w}: the filter {filt} matches no row of kdbench/reference/published.csv"
                   f"{_closest_published(filt)}")
            if "paper" in filt and not _published_rows({"paper": filt["paper"]}):
                raise SuiteError(msg + ". Correct the paper key (the first word of published.csv's paper column)")
            # legal but inert (a paper whose values were not transcribed): the table prints reproduced values only
            warnings.warn(msg + "; the table prints no published values", stacklevel=2)
        _check_row_labels(t, where)


def _check_row_labels(t: dict, where: str) -> None:
    """A paper table's row label is the published ``method`` it is matched with: under a filter
    that selects published rows, a label (with its own ``published`` refinement) that selects none
    but is close to one that does is a typo, refused with the labels that exist. A label close
    to none is a row the paper does not print (e.g. DKD's teachers): reproduced values only."""
    base = t.get("published") or {}
    if not base or not _published_rows(base):
        return
    methods = {r["method"] for r in _published_rows(base)}
    for label, row in (t.get("rows") or {}).items():
        own = row.get("published") or {} if isinstance(row, dict) else {}
        if "method" in own or _published_rows({**base, "method": label, **own}) or not did_you_mean(label, methods):
            continue
        raise SuiteError(f"{where}: rows: {label!r} is no published method of this table's filter {base}"
                         f"{did_you_mean(label, methods)} Published methods here: {', '.join(sorted(methods))}. "
                         f"Row labels are the published method names")


def _published_table() -> list[dict]:
    import csv

    global _PUBLISHED
    if _PUBLISHED is None:
        with open(Path(__file__).resolve().parent.parent / "reference" / "published.csv", newline="") as f:
            _PUBLISHED = [{**r, "paper": r["paper"].split()[0] if r["paper"] else ""} for r in csv.DictReader(f)]
    return _PUBLISHED


_PUBLISHED: list[dict] | None = None


def _published_rows(filt: dict) -> list[dict]:
    """published.csv's rows the filter selects (``paper``: the first word of its paper column), as
    :func:`kdbench.report.paper_tables.match_published` reads them."""
    return [r for r in _published_table() if all(str(r.get(k)) == str(v) for k, v in filt.items())]


def _closest_published(filt: dict) -> str:
    for key, value in filt.items():
        if not _published_rows({key: value}):
            return f" ({key} {value!r} is in no row.{did_you_mean(value, {r[key] for r in _published_table()})})"
    return " (each key matches some rows, not all together)"


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
    _check_references(suite)
    if check_files:
        check_files_exist(suite)


def _check_references(suite) -> None:
    """Names that must resolve to what the suite runs: each table's and each seed budget's
    ``reference`` is a column of its experiments, every architecture in ``small_lr_archs`` exists."""
    from kdbench.models import MODELS
    from kdbench.planning.budget import budget

    columns: dict[str, set[str]] = {}
    for c in suite.cells:
        columns.setdefault(c.experiment, set()).add(c.column)
    for exp in suite.config["experiments"]:
        where = f"{suite.path}: experiment {exp['name']!r}"
        for key in ("recipe", "teacher_recipe"):
            for arch in (exp.get(key) or {}).get("small_lr_archs", []):
                check_name("architecture", arch, MODELS.names(), f"{where}: {key}: small_lr_archs")
        b = budget(exp) if isinstance(exp["seeds"], dict) else None
        if b is not None:
            check_name("column", b["reference"], columns.get(exp["name"], set()) - {"teacher"},
                       f"{where}: seeds: reference (the columns this experiment runs)")
    for t in suite.config.get("tables", []):
        if t.get("reference") is not None:  # as written (the default, student, applies where there is one)
            have = set().union(*(columns.get(e, set()) for e in t["experiments"]))
            check_name("column", t["reference"], have, f"{suite.path}: table {t['name']!r}: reference (the columns "
                       f"its experiments run)")


def _is_paper(table: dict) -> bool:
    return any(k in table for k in ("published", "like", "rows"))


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


def check_released_teachers(suite, teachers_dir: str | Path = "teachers", mode: str = "auto") -> None:
    """The pipeline's pre-flight for released teachers: each import run not yet imported needs its
    raw file in ``teachers_dir`` or a download. ``auto``: refuse (SuiteError) when a file is missing
    and no download source answers; ``never``: refuse whenever one is missing; ``download``: leave it
    to the jobs. The refusal lists every missing file with where to put it, in one message."""
    from kdbench.core.io import read_json
    from kdbench.teachers.released import FETCH_MODES, by_hand, released_teacher, sources_reachable

    if mode not in FETCH_MODES:
        raise SuiteError(f"fetch_teachers={mode!r}: valid values are {', '.join(FETCH_MODES)}")
    missing = []
    for rid, run in suite.runs.items():
        if run.kind != "import" or (read_json(Path(suite.run_dir(rid)) / "metrics.json") or {}).get("status") == "ok":
            continue
        rt = released_teacher(run.spec.dataset, run.spec.student)
        if not (Path(teachers_dir) / rt.file).is_file():
            missing.append(rt)
    if not missing or mode == "download" or (mode == "auto" and sources_reachable(missing[0])):
        return
    why = "no download source answered within 5 s" if mode == "auto" else "fetch_teachers=never"
    resume = f"snakemake again (or `kdbench fetch-teachers --suite {suite.path}`)"
    lines = [by_hand(rt, Path(teachers_dir) / rt.file, resume) for rt in dict.fromkeys(missing)]
    raise SuiteError(f"{len(lines)} released teacher file(s) are not in {teachers_dir}/ and cannot be downloaded "
                     f"here ({why}); no job was started. `kdbench fetch-teachers --suite {suite.path} --list` "
                     f"lists them; by hand:\n  " + "\n  ".join(lines)
                     + "\n(--config fetch_teachers=download lets the jobs try anyway.)")
