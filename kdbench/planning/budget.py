"""Seeds as a budget, the declaration: an experiment's ``seeds: {looks, ...}`` and each cell's
seeds so far, read when the suite is loaded. The looks themselves (boundaries, decisions, the
loop) are :mod:`kdbench.commands.looks`, which reads the suite's runs; this module reads no run, so
the suite can import it without an import circle.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from contextlib import contextmanager
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


# ----------------------------------------------------------------------------- the state file
#
# ``<runs_dir>/looks/<suite>.json``: {experiment: its looks so far, ..., STAMP: {format, digest}}.
# Each experiment's entry holds the whole budget declaration it was taken under ("declaration");
# the stamp's digest is the SHA-256 of the experiments' entries as kdbench wrote them, so a hand
# edit (a seed count changed, a decision deleted) is refused instead of obeyed. Readers hold a
# shared flock on the looks folder, a look (read, decide, write) an exclusive one, so two
# ``kdbench looks --next`` run one after the other, each on the state the other left.

STAMP = "kdbench:stamp"  # not a possible experiment name (names match [A-Za-z0-9_.-]+)
STATE_FORMAT = 2
_HELD: dict[str, int] = {}  # looks folder -> this process's lock depth (flock is per open file)


class StateError(ValueError):
    """A looks state that cannot be used as it is; the message names the file, the cause and the fix."""


@contextmanager
def state_lock(cfg: dict, exclusive: bool = True):
    """Hold the lock of the suite's looks folder (shared to read, exclusive to take a look);
    re-entrant within a process. A shared lock on a missing folder is a no-op (no state yet)."""
    folder = state_path(cfg).parent
    key = str(folder.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    if not exclusive and not folder.is_dir():
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise StateError(f"cannot lock {folder}: {e.strerror}; make the folder readable and writable, or set "
                         f"runs_dir to a writable place") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        _HELD[key] = 1
        yield
    finally:
        _HELD.pop(key, None)
        os.close(fd)  # releases the lock


def _digest(experiments: dict) -> str:
    return hashlib.sha256(json.dumps(experiments, sort_keys=True, default=str).encode()).hexdigest()


def _refuse(path: Path, cause: str) -> StateError:
    return StateError(f"looks state {path}: {cause}. Restore the file kdbench wrote (from a backup), or delete it to "
                      f"start the looks again (the runs stay; their seeds are taken again from look 1)")


_ENTRY = {"looks": list, "spending": str, "alpha": (int, float), "look": int, "seeds": dict, "decisions": list}


def read_state(cfg: dict) -> dict:
    """The looks taken so far, per experiment ({} before the first), checked: a file that is not
    JSON, not the shape kdbench writes, or whose content no longer matches its stamp (a hand edit)
    is refused with the fix (:class:`StateError`)."""
    path = state_path(cfg)
    with state_lock(cfg, exclusive=False):
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise StateError(f"cannot read the looks state {path}: {e.strerror}; make it readable") from None
    try:
        state = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(path, f"not JSON ({e})") from None
    if not isinstance(state, dict):
        raise _refuse(path, f"a JSON {type(state).__name__}, not the object kdbench writes")
    stamp = state.pop(STAMP, None)
    for name, st in state.items():
        bad = [k for k, t in _ENTRY.items() if not isinstance(st, dict) or not isinstance(st.get(k), t)
               or isinstance(st.get(k), bool)]
        if bad:
            raise _refuse(path, f"experiment {name!r}: {', '.join(bad)} missing or of the wrong type")
        if any(not isinstance(n, int) or isinstance(n, bool) for n in st["seeds"].values()):
            raise _refuse(path, f"experiment {name!r}: seeds must map cells to whole numbers")
    if stamp is None:  # written before stamps (kdbench-looks/1): usable, cannot be checked
        warnings.warn(f"looks state {path} has no stamp (an older kdbench wrote it): hand edits cannot be detected "
                      f"until the next look stamps it", stacklevel=2)
    elif not isinstance(stamp, dict) or stamp.get("digest") != _digest(state):
        raise _refuse(path, "its content does not match the stamp kdbench wrote with it: it was edited by hand "
                            "(the seeds of each cell follow from the looks' decisions, never from an edit)")
    return state


def write_state(cfg: dict, state: dict) -> None:
    """Write ``state`` atomically with each experiment's whole budget declaration and the stamp;
    the caller holds :func:`state_lock`."""
    from kdbench.core.io import atomic_write_bytes

    exps = {e["name"]: e for e in cfg["experiments"]}
    body = {n: {**st, "declaration": budget(exps[n])} if n in exps and budget(exps[n]) else st for n, st in state.items()}
    atomic_write_bytes(state_path(cfg), json.dumps({**body, STAMP: {"format": STATE_FORMAT, "digest": _digest(body)}},
                                                   indent=1).encode())


def cell_key(teacher: str, student: str, column: str) -> str:
    return f"{teacher}--{student}/{column}"


def cell_seeds(exp: dict, teacher: str, student: str, column: str, state: dict, state_file: str) -> list[int]:
    """The seeds of one cell: the experiment's list, or under a budget 0 … n−1 with n the cell's
    count in the looks ``state`` (``looks[0]`` before the first decision). ``exp`` needs only the
    experiment's ``name`` and ``seeds``; ``state_file`` is where the state lives (for the message)."""
    b = budget(exp)
    if b is None:
        return list(exp["seeds"])
    st = state.get(exp["name"])
    declared = (st or {}).get("declaration")
    if declared is not None and declared != b:
        changed = ", ".join(f"{k} {declared.get(k)!r} → {b.get(k)!r}" for k in sorted(set(declared) | set(b))
                            if declared.get(k) != b.get(k))
        raise ValueError(f"experiment {exp['name']!r}: its seed budget changed after looks were taken ({changed}); a "
                         f"sequential design is fixed in advance. Restore it, or delete {state_file} to start "
                         f"the looks again")
    if st is not None and (st["looks"], st["spending"], st["alpha"]) != (b["looks"], b["spending"], b["alpha"]):
        raise ValueError(f"experiment {exp['name']!r}: its seed budget changed after looks were taken "
                         f"({st['looks']}, {st['spending']}, α {st['alpha']} → {b['looks']}, {b['spending']}, "
                         f"α {b['alpha']}); a sequential design is fixed in advance. Restore it, or delete "
                         f"{state_file} to start the looks again")
    n = (st or {}).get("seeds", {}).get(cell_key(teacher, student, column), b["looks"][0])
    return list(range(n))
