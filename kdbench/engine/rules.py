"""What a run cannot do, and what runs must share to be packed: each rule written once.

:func:`run_problems` lists why a run cannot train as specified; :func:`pack_key` and
:func:`unpackable` say which runs one ``kdbench pack`` job may train together. The suite
(:mod:`kdbench.planning.suite`) turns them into errors with the experiment's context when it loads and
plans its packs with them; the engine checks the same before a run or a pack starts.
"""

from __future__ import annotations

import os

from kdbench.data import DATASETS, check_stream_split
from kdbench.methods import METHODS, MethodSpec, resolve_method
from kdbench.methods.base import label_free_methods
from kdbench.core.distributed import NO_DDP
from kdbench.core.spec import RunSpec

STAGE_FIELDS = frozenset({"stages", "preact"})


def run_problems(spec: RunSpec, ddp: bool = False, method: MethodSpec | None = None) -> list[str]:
    """Why ``spec`` cannot run (empty: it can); ``ddp``: it would run under torchrun. Nothing is read.
    ``method``: the run's method already resolved (the planner's), else resolved here."""
    if spec.protocol == "linear_probe":  # its method names the probed run's, which it does not train
        return [] if spec.init_ckpt else ["a linear_probe run needs init_ckpt: the probed model's model.pt"]
    method = method or resolve_method(spec.method, spec.method_overrides)
    needs = method.teacher_needs if method.needs_teacher else frozenset()
    problems = []
    if method.needs_teacher and not spec.teacher_ckpts:
        problems.append(f"method {spec.method!r} needs a teacher: give teacher checkpoint(s)")
    if spec.teacher_dataset not in (None, spec.dataset) and "logits" in needs:
        problems.append(f"cross-dataset distillation ({spec.teacher_dataset} teacher, {spec.dataset} student): "
                        f"{spec.method} read the teacher's logits, which cannot apply because the label spaces "
                        f"differ. Methods that can: {', '.join(label_space_free_methods())}")
    if len(spec.teacher_ckpts) > 1 and needs & STAGE_FIELDS:
        problems.append(f"a teacher ensemble has no single feature map, but {spec.method} read the teacher's stage "
                        f"features; ensembles work with methods on logits or pooled features")
    if spec.unlabeled is not None:
        problems += _unlabeled_problems(spec, method, ddp)
    if ddp and spec.execution.compile == "graph":
        problems.append("execution.compile 'graph' is not supported under DDP (torchrun); use 'none' or 'compile'")
    return problems


def _unlabeled_problems(spec: RunSpec, method, ddp: bool) -> list[str]:
    problems = []
    why = method.unlabeled_problem()
    if why:
        problems.append(f"method {spec.method!r} cannot take an unlabelled stream (unlabeled: {spec.unlabeled}): "
                        f"{why}. Methods that can: {', '.join(label_free_methods())}")
    if spec.protocol != "fit":
        problems.append(f"unlabeled applies to protocol 'fit' runs, not {spec.protocol!r}")
    try:
        check_stream_split(spec.dataset, spec.unlabeled["split"])
    except ValueError as e:
        problems.append(str(e))
    if spec.execution.teacher_cache not in ("none", "fp32"):
        problems.append(f"execution.teacher_cache {spec.execution.teacher_cache!r} does not apply to a run with an "
                        f"unlabelled stream (the cache holds the labelled training set's teacher outputs); use 'none'")
    if ddp:
        problems.append("an unlabelled stream (unlabeled) is not supported under DDP (torchrun): run it on one device")
    return problems


def label_space_free_methods() -> list[str]:
    """The registered methods that never read the teacher's logits (cross-dataset distillation)."""
    return [m for m in METHODS.names() if "logits" not in METHODS.get(m).teacher_needs]


def check_run(spec: RunSpec, ddp: bool = False) -> None:
    """Raise ValueError with every problem of :func:`run_problems`."""
    problems = run_problems(spec, ddp)
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------- packing



def teacher_key(spec: RunSpec) -> tuple:
    """What identifies a run's teacher: packed runs share it, and one forward pass answers them all."""
    return spec.teacher, spec.teacher_ckpts, spec.teacher_dataset


def unpackable(spec: RunSpec) -> str | None:
    """Why ``spec`` cannot be packed with other runs, or None."""
    if spec.protocol != "fit":
        return f"only protocol 'fit' runs can be packed (not {spec.protocol})"
    if spec.unlabeled is not None:
        return ("runs with an unlabelled stream (unlabeled) cannot be packed: their steps concatenate a second batch "
                "that the pack's shared teacher pass and fused students do not handle; run them alone")
    if spec.validation is not None:
        return ("runs with a validation holdout (validation) cannot be packed: the pack shares one training set and "
                "test loader between its runs; run them alone")
    if DATASETS.get(spec.dataset).streaming:
        return f"runs on {spec.dataset} (streamed, trained with DDP) cannot be packed: {NO_DDP}"
    return None


def pack_key(spec: RunSpec) -> dict:
    """What runs must share to be packed, by name: dataset, data root, execution options, batch
    size and teacher (a run without a teacher, None here, packs with any teacher's runs)."""
    return {"datasets": spec.dataset, "data roots": spec.data_root, "execution options": spec.execution,
            "batch sizes": spec.recipe.batch_size, "teachers": teacher_key(spec) if spec.teacher_ckpts else None}


def check_packable(specs: list[RunSpec]) -> None:
    """Refuse (ValueError, with the reason) runs that cannot be trained together in one pack, or a
    pack started under torchrun."""
    if not specs:
        raise ValueError("nothing to pack: give at least one run")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{NO_DDP}: start `kdbench pack` without torchrun")
    for s in specs:
        why = unpackable(s)
        if why:
            raise ValueError(why)
    keys = [pack_key(s) for s in specs]
    for name in keys[0]:
        values = list(dict.fromkeys(repr(k[name]) for k in keys if k[name] is not None))
        if len(values) > 1 and name == "teachers":
            raise ValueError("packed runs must share their teacher; found " + ", ".join(sorted(values)))
        if len(values) > 1:
            raise ValueError(f"runs with different {name} cannot be packed: {values[0]} vs {values[1]}; pack runs "
                             f"that share {', '.join(keys[0])}")
