"""A dress rehearsal of a suite: every kind of job it has, each cut to a few optimisation steps.

A suite file with a ``rehearsal:`` key (e.g. ``{name: rehearsal, include: [paper.yaml],
rehearsal: {}}``) is loaded as its rehearsal (:func:`rehearse`, applied by
:func:`kdbench.planning.suite.load_suite` to the flattened suite, before any run is built), so
every job and every ``kdbench`` command that reads the suite sees the same runs. What it keeps
and what it cuts (choices; the numbers are the ``rehearsal:`` options, :data:`DEFAULTS`):

- **Every cell, once.** Each experiment keeps all its pairs, methods, sweep points, probes
  (``linear_probe``), cross-dataset teachers (``teacher_dataset``), unlabelled streams and
  teacher ensembles (every ``teacher_seeds`` entry: an ensemble of E is its own cell), but only
  the first student seed (a seed budget becomes ``[first look's seed 0]``). So every distinct
  dataset × pair × method × protocol of the suite is run once.
- **Tiny synthetic data in each dataset's real format.** Every dataset's root becomes
  ``<data_root>/<dataset>`` with ``synthetic: {classes, train_per_class, test_per_class, seed}``:
  CIFAR pickles, SVHN ``.mat``, STL-10 binaries (with an unlabelled split), Tiny-ImageNet and
  ImageNet JPEG folders, read by the real loaders (:mod:`kdbench.data.synthetic_files`).
- **A few steps per run.** Every recipe (students', probes'; teachers' below) is cut to
  ``epochs`` epochs of ``batch_size`` (milestones scaled by :class:`kdbench.core.spec.Recipe`, a
  cosine warm-up to at most 1 epoch): ``classes × train_per_class / batch_size`` steps an epoch
  (2 × 2 with the defaults), at ``lr_scale`` times the recipe's learning rates. A term's
  initialisation stages and warm-ups (any integer parameter whose
  name says ``epochs`` or ``warmup``: AB/FT/FSP ``init_epochs``, DKD ``warmup``, KDA
  ``warmup_epochs``) are cut to at most 1 epoch, so both their stages run; CRD's ``nce_k`` to
  the other-class images there are; an unlabelled stream's batch to ``batch_size``.
- **Teachers long enough for their batch-norm statistics.** A teacher trains ``teacher_epochs``
  (32: 64 steps). A network distils from its teacher in eval mode, through the running
  statistics its BN layers keep (momentum 0.1); after 4 steps those are still mostly their
  initial (0, 1), and a deep residual net's eval-mode features explode: resnet110's reach 2.6e7
  untrained and 7e2 after 4 steps, 62 after 64 (its train-mode features: 21 to 50), and CC and FT
  on them are infinite. Together with ``lr_scale`` (every learning rate times 0.1: 4 steps of
  batch 8 at the paper's rate diverge, resnet110's loss 14.6) this keeps the terms finite, which
  is what a rehearsal of the wiring needs; neither is a result.
- **Teachers trained here.** ``teacher: released`` (a download; the machine may have no network)
  becomes ``teacher: train``: the released teacher is trained in the rehearsal like any other
  (``released: train``, the only choice so far). Imported ``teacher_checkpoints`` files are kept.
- **Marked.** Every run's spec has ``rehearsal: true`` (in its hash: a rehearsal never shares a
  run id with a real run), every table's caption starts with :data:`NOTE` and every figure's
  title with ``REHEARSAL``; results land in ``results/<suite name>/`` (name it ``rehearsal``).

The suite's own top-level keys still apply: set ``device: cpu`` and ``runs_dir`` there.
"""

from __future__ import annotations

import copy
import inspect

from kdbench.core.spec import PROBE_RECIPE, Recipe, scale_milestones
from kdbench.planning.checks import SuiteError

#: the ``rehearsal:`` options and their defaults
DEFAULTS = {
    "epochs": 2,  # per run (students, probes)
    "teacher_epochs": 32,  # per teacher: 64 updates of BN's running statistics (below)
    "batch_size": 8,
    "lr_scale": 0.1,  # every recipe's lr and small_lr: a deep net's few steps at the paper's lr diverge
    "classes": 4,  # of every synthetic dataset
    "train_per_class": 4,  # 16 training images: 2 steps an epoch at batch 8
    "test_per_class": 2,
    "seed": 0,  # of the synthetic data
    "data_root": "data/rehearsal",  # <data_root>/<dataset>
    "released": "train",  # what replaces a released teacher
    "tables": None,  # a slice: only these tables and the experiments they read (None: all)
}
RELEASED_CHOICES = ("train",)

#: the first words of every rehearsal table's caption (and figure titles begin with its first word)
NOTE = ("REHEARSAL — not results: a wiring check of every job on tiny synthetic data, each run cut to a "
        "few optimisation steps (kdbench/planning/rehearsal.py).")
MARK = "REHEARSAL"


def options(cfg: dict) -> dict | None:
    """The suite's ``rehearsal:`` options with their defaults, or None when it is no rehearsal."""
    given = cfg.get("rehearsal")
    if given is None:
        return None
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise SuiteError(f"rehearsal: unknown option(s) {', '.join(sorted(unknown))}; valid: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **given}
    if out["released"] not in RELEASED_CHOICES:
        raise SuiteError(f"rehearsal.released: {out['released']!r}; valid: {', '.join(RELEASED_CHOICES)}")
    return out


def rehearse(cfg: dict) -> dict:
    """The rehearsal of a flattened suite ``cfg`` (:func:`kdbench.planning.suite.flatten`), or
    ``cfg`` itself when it has no ``rehearsal:`` key. Never changes ``cfg``."""
    opts = options(cfg)
    if opts is None:
        return cfg
    out = copy.deepcopy(cfg)
    out["rehearsal"] = opts
    out["datasets"] = {name: {"root": f"{opts['data_root']}/{name}", "synthetic": {
        k: opts[k] for k in ("classes", "train_per_class", "test_per_class", "seed")}} for name in cfg["datasets"]}
    tables = _sliced(cfg.get("tables", []), opts["tables"])
    read = {e for t in tables for e in t["experiments"]} if opts["tables"] is not None else None
    out["experiments"] = [_experiment(e, opts) for e in cfg["experiments"] if read is None or e["name"] in read]
    out["tables"] = [_table(t) for t in tables]
    used = {d for e in out["experiments"] for d in (e["dataset"], e.get("teacher_dataset"),
                                                   *(e.get("linear_probe") or {}).get("datasets", [])) if d}
    out["datasets"] = {n: d for n, d in out["datasets"].items() if n in used}
    return out


def _sliced(tables: list[dict], names: list[str] | None) -> list[dict]:
    if names is None:
        return tables
    known = [t["name"] for t in tables]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SuiteError(f"rehearsal.tables: {', '.join(unknown) or '(empty)'} is no table of this suite; valid: "
                         f"{', '.join(known)}")
    return [t for t in tables if t["name"] in names]


def is_rehearsal_caption(text: str | None) -> bool:
    return bool(text) and text.startswith(NOTE)


def _experiment(exp: dict, opts: dict) -> dict:
    e = dict(exp)
    seeds = exp["seeds"]
    e["seeds"] = seeds[:1] if isinstance(seeds, list) else [0]  # a budget's first look starts at seed 0
    e["recipe"] = _recipe(exp.get("recipe"), opts)
    e["teacher_recipe"] = _recipe(exp.get("teacher_recipe") or exp.get("recipe"), opts, epochs=opts["teacher_epochs"])
    if "linear_probe" in exp:
        probe = exp["linear_probe"]
        e["linear_probe"] = {**probe, "recipe": _recipe(probe.get("recipe"), opts, PROBE_RECIPE)}
    teacher = exp.get("teacher")
    if teacher == "released":
        e["teacher"] = opts["released"]
    elif isinstance(teacher, dict):
        e["teacher"] = {t: opts["released"] if v == "released" else v for t, v in teacher.items()}
    if exp.get("unlabeled"):
        e["unlabeled"] = {**exp["unlabeled"], "batch_size": min(exp["unlabeled"].get("batch_size", 512),
                                                                 opts["batch_size"])}
    if exp.get("validation"):  # one held-out image per class
        e["validation"] = {**exp["validation"], "size": opts["classes"]}
    e["term_params"] = _term_params(exp.get("term_params") or {}, opts)
    e["suite_overrides"] = _suite_overrides(exp.get("suite_overrides"), opts)
    e["method_overrides"] = {m: _cut_params(o, opts) for m, o in (exp.get("method_overrides") or {}).items()}
    if not e["method_overrides"]:
        e.pop("method_overrides")
    return e


def _recipe(block: dict | None, opts: dict, defaults: dict | None = None, epochs: int | None = None) -> dict:
    """``block`` (a recipe mapping) cut to ``epochs`` of ``batch_size``: its milestones (or the
    ``defaults``', RepDistiller's 150/180/210 of 240 unless given) scaled to the new length, those
    that would never take effect dropped; a cosine warm-up of at most 1 epoch; ``epochs``: instead
    of the option's (a teacher's ``teacher_epochs``)."""
    block, defaults = dict(block or {}), defaults or {"epochs": Recipe.epochs, "milestones": Recipe.milestones}
    epochs = epochs or opts["epochs"]
    given = block if "milestones" in block else defaults  # epochs without milestones: the defaults, scaled
    scaled = scale_milestones(given["milestones"], given.get("epochs", defaults["epochs"]), epochs)
    rates = {k: round(opts["lr_scale"] * block.get(k, defaults.get(k, getattr(Recipe, k))), 12) for k in ("lr", "small_lr")}
    out = {**block, **rates, "epochs": epochs, "batch_size": opts["batch_size"],
           "milestones": sorted({m for m in scaled if m < epochs})}
    if out.get("warmup_epochs"):
        out["warmup_epochs"] = min(out["warmup_epochs"], 1, epochs - 1)
    return out


def _stage_cuts(opts: dict) -> dict[str, dict]:
    """term -> the parameters the rehearsal cuts: stages and warm-ups (integer parameters named
    ``*epochs*`` or ``warmup*`` with a default above 1) to 1 epoch; ``nce_k`` to the other-class
    training images of the synthetic set."""
    negatives = (opts["classes"] - 1) * opts["train_per_class"]
    cuts = {}
    from kdbench.methods import LOSSES  # here: the report layer imports this module for --help without torch

    for term in LOSSES.names():
        for name, p in inspect.signature(LOSSES.get(term).__init__).parameters.items():
            stage = ("epochs" in name or name.startswith("warmup")) and isinstance(p.default, int) and p.default > 1
            if stage:
                cuts.setdefault(term, {})[name] = 1
            elif name == "nce_k" and isinstance(p.default, int):
                cuts.setdefault(term, {})[name] = min(p.default, negatives)
    return cuts


def _term_params(own: dict, opts: dict) -> dict:
    cuts = _stage_cuts(opts)
    return {t: {**own.get(t, {}), **cuts.get(t, {})} for t in {**cuts, **own}}


def _cut_params(overrides: dict | None, opts: dict) -> dict:
    """A method override whose own ``params`` set a stage length or ``nce_k``: cut as well."""
    if not overrides or not overrides.get("params"):
        return overrides
    cuts = _stage_cuts(opts)
    params = {t: {**p, **{k: v for k, v in cuts.get(t, {}).items() if k in p}} for t, p in overrides["params"].items()}
    return {**overrides, "params": params}


def _suite_overrides(block: dict | None, opts: dict) -> dict | None:
    """The suite's ``methods:`` entries cut as :func:`_cut_params`; its ``term_params`` sit below
    the experiment's (which hold the cuts) and stay."""
    if not block:
        return block
    return {**block, "methods": {m: _cut_params(o, opts) for m, o in (block.get("methods") or {}).items()}}


def _table(table: dict) -> dict:
    t = dict(table)
    t["caption"] = NOTE + (" " + table["caption"] if table.get("caption") else "")
    if table.get("figure"):
        t["figure"] = {**table["figure"], "title": f"{MARK}: {table['figure'].get('title', table['name'])}"}
    return t
