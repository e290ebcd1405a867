"""Method registry. Every module in this package registers its terms and methods on import."""

import importlib
import pkgutil

from .base import (LOSSES, METHODS, Batch, DistillLoss, MethodContext, MethodSpec, Objective,
                   register_loss, register_method)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["LOSSES", "METHODS", "Batch", "DistillLoss", "MethodContext", "MethodSpec", "Objective",
           "register_loss", "register_method", "build_objective"]


def build_objective(method: str | MethodSpec, ctx: MethodContext, overrides: dict | None = None) -> Objective:
    spec = METHODS.get(method) if isinstance(method, str) else method
    return Objective(spec.with_overrides(overrides), ctx)
