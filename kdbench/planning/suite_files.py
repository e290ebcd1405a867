"""Where a suite lives: a suite file's path, or a suite's name (``crd`` = ``workflow/suites/crd.yaml``),
the same for every ``--suite`` of the ``kdbench`` command and for Snakemake's ``--config suite=NAME``.
Imports nothing heavy, so that ``--help`` and the small commands stay fast."""

from __future__ import annotations

from pathlib import Path

from kdbench.core.names import did_you_mean

#: the shipped suites: the working directory's ``workflow/suites`` first, then kdbench's checkout's
SUITE_FOLDERS = (Path("workflow/suites"), Path(__file__).resolve().parents[2] / "workflow" / "suites")


def suite_names() -> list[str]:
    return sorted({p.stem for f in SUITE_FOLDERS if f.is_dir() for p in f.glob("*.yaml")})


def suite_file(name_or_path: str | Path) -> Path:
    """The suite file ``name_or_path`` names: an existing file, or ``<folder>/<name>.yaml`` in
    :data:`SUITE_FOLDERS` for a bare name. FileNotFoundError naming the valid suite names otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bare = len(path.parts) == 1 and path.suffix not in (".yaml", ".yml")
    for folder in SUITE_FOLDERS if bare else ():
        if (folder / f"{path}.yaml").is_file():
            return folder / f"{path}.yaml"
    names = suite_names()
    raise FileNotFoundError(f"suite file {path} not found, and {str(path)!r} is not a suite name."
                            f"{did_you_mean(path.stem, names)} Suite names: {', '.join(names) or '(none found)'}; "
                            f"or give a suite file's path")
