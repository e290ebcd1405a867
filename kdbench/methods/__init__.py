"""Method registry. Every module in this package registers its terms and methods on import."""

import importlib
import pkgutil

from kdbench.core.plugins import load_entry_points
from kdbench.methods.base import (LOSSES, METHODS, Batch, DistillLoss, MethodContext, MethodSpec, Objective,
                   build_objective, merge_overrides, register_loss, register_method, resolve_method)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

# external methods: installed packages' entry points, group "kdbench.methods" (kdbench/core/plugins.py)
load_entry_points("kdbench.methods")

__all__ = ["LOSSES", "METHODS", "Batch", "DistillLoss", "MethodContext", "MethodSpec", "Objective",
           "merge_overrides", "register_loss", "register_method", "build_objective", "resolve_method"]
