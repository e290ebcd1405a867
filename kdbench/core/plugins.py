"""External models and methods, plugged in without editing kdbench.

Two ways, both ending in kdbench's own registries (``kdbench.models.register_model``,
``kdbench.methods.register_method`` / ``register_loss``):

* **Entry points** of an installed package, group ``kdbench.models`` or ``kdbench.methods``, e.g. in
  its ``pyproject.toml``::

      [project.entry-points."kdbench.models"]
      timm_zoo = "mypkg.kdbench_models"

  Each entry point names a module, whose import registers its names, or a function, called with no
  arguments, that registers them. They load when :mod:`kdbench.models` / :mod:`kdbench.methods` is
  first imported (every kdbench process), after kdbench's own names.
* A suite's ``imports:`` list of module names, imported before the suite's names are checked (the
  module must be importable where the jobs run, e.g. on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
import inspect


def load_entry_points(group: str) -> list[str]:
    """Load every entry point of ``group``; return their names. A failing one names its package."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as e:
            raise ImportError(f"kdbench plugin {ep.name!r} ({ep.value}, entry point group {group!r}) failed to "
                              f"load: {e}. Fix or uninstall the package that declares it") from e
        if callable(obj) and not inspect.ismodule(obj):
            obj()
        loaded.append(ep.name)
    return loaded


def import_modules(names: list[str], where: str) -> None:
    """A suite's ``imports:``; an unimportable one raises ImportError naming it and ``where``."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"{where}: imports: module {name!r} cannot be imported ({e}); install it or put "
                              f"its folder on PYTHONPATH where the jobs run") from e
