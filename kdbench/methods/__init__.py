"""Method registry. Every module in this package registers its terms and methods on import."""

import importlib
import pkgutil

from kdbench.core.plugins import load_entry_points
from kdbench.methods.base import (LOSSES, METHODS, Batch, DistillLoss, MethodContext, MethodSpec, Objective,
                   register_loss, register_method)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

# external methods: installed packages' entry points, group "kdbench.methods" (kdbench/core/plugins.py)
load_entry_points("kdbench.methods")

__all__ = ["LOSSES", "METHODS", "Batch", "DistillLoss", "MethodContext", "MethodSpec", "Objective",
           "register_loss", "register_method", "build_objective", "resolve_method"]


def resolve_method(method: str | MethodSpec, overrides: dict | None = None) -> MethodSpec:
    """A registered method (or a given spec) with a suite's overrides applied."""
    spec = METHODS.get(method) if isinstance(method, str) else method
    return spec.with_overrides(overrides)


def build_objective(method: str | MethodSpec, ctx: MethodContext, overrides: dict | None = None) -> Objective:
    return Objective(resolve_method(method, overrides), ctx)
