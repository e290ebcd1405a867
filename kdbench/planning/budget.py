"""Seeds as a budget, the declaration: an experiment's ``seeds: {looks, ...}`` and each cell's
seeds so far, read when the suite is loaded. The looks themselves (boundaries, decisions, the
loop) are :mod:`kdbench.commands.looks`, which reads the suite's runs; this module reads no run, so
the suite can import it without an import circle.
"""

from __future__ import annotations

import json
from pathlib import Path

SPENDING = ("obrien_fleming", "pocock")


# ----------------------------------------------------------------------------- the declaration

def budget(exp: dict) -> dict | None:
    """The experiment's seed budget with defaults filled (None: its seeds are a plain list)."""
    seeds = exp["seeds"]
    if isinstance(seeds, list):
        return None
    where = f"experiment {exp['name']!r}: seeds"
    looks = list(seeds["looks"])
    if any(b <= a for a, b in zip(looks, looks[1:])) or looks[0] < 2:
        raise ValueError(f"{where}: looks {looks} must be increasing seed counts from at least 2, e.g. [3, 5, 10]")
    if seeds.get("min", looks[0]) != looks[0]:
        raise ValueError(f"{where}: min {seeds['min']} is the first look's seed count; set looks[0] = {seeds['min']} "
                         f"(looks: [{seeds['min']}, ...]) or drop min")
    spending = seeds.get("spending", "obrien_fleming")
    if spending not in SPENDING:
        raise ValueError(f"{where}: spending {spending!r}; valid: {', '.join(SPENDING)}")
    return {"looks": looks, "spending": spending, "alpha": float(seeds.get("alpha", 0.05)),
            "margin": seeds.get("margin"), "reference": seeds.get("reference", "student"),
            "metric": seeds.get("metric", "acc_last")}


def state_path(cfg: dict) -> Path:
    return Path(cfg.get("runs_dir", "runs")) / "looks" / f"{cfg['name']}.json"


def read_state(cfg: dict) -> dict:
    path = state_path(cfg)
    return json.loads(path.read_text()) if path.is_file() else {}


def cell_key(teacher: str, student: str, column: str) -> str:
    return f"{teacher}--{student}/{column}"


def cell_seeds(cfg: dict, exp: dict, teacher: str, student: str, column: str, state: dict | None = None) -> list[int]:
    """The seeds of one cell: the experiment's list, or under a budget 0 … n−1 with n the cell's
    count in the looks state (``looks[0]`` before the first decision)."""
    b = budget(exp)
    if b is None:
        return list(exp["seeds"])
    st = (read_state(cfg) if state is None else state).get(exp["name"])
    if st is not None and (st["looks"], st["spending"], st["alpha"]) != (b["looks"], b["spending"], b["alpha"]):
        raise ValueError(f"experiment {exp['name']!r}: its seed budget changed after looks were taken "
                         f"({st['looks']}, {st['spending']}, α {st['alpha']} → {b['looks']}, {b['spending']}, "
                         f"α {b['alpha']}); a sequential design is fixed in advance. Restore it, or delete "
                         f"{state_path(cfg)} to start the looks again")
    n = (st or {}).get("seeds", {}).get(cell_key(teacher, student, column), b["looks"][0])
    return list(range(n))
