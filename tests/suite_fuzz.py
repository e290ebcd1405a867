"""A seeded mutation fuzzer of suites (issue 24): each mutant is refused naming the key, or plans
exactly what its declarations imply (checked against an oracle written apart from the planner).

Sources are the shipped suites (workflow/suites/*.yaml), cut into units — one file per
experiment with the tables over it, every other key as the suite has it — so that planning a
mutant takes milliseconds (paper.yaml's 1,800 runs would take 0.6 s). Suites made only of
includes are mutated whole. Mutations (each a function of the unit and a random generator):

* ``typo``       a key at any depth renamed by one edit;
* ``duplicate``  a ``key:`` line written twice in the YAML text;
* ``wrong_type`` a leaf replaced by a value of another type;
* ``nonfinite``  a number replaced by .nan, .inf or -.inf;
* ``dangling``   a name (dataset, architecture, method, experiment, reference, include) replaced
  by one that resolves to nothing;
* ``inert``      a declaration added where nothing reads it;
* ``perturb``    a leaf changed to another valid value (the mechanism: a change that alters
  neither a run id, a cell nor a table is inert, and must be refused, warned, or documented).

Outcomes: ``refused`` (SuiteError, the message naming the key or the value), ``warned``
(accepted with a UserWarning naming it), ``effective`` (accepted, the plan changed, the oracle's
cells equal the planner's), ``inert`` (accepted, nothing changed: allowed only for the keys in
:data:`DOCUMENTED_INERT`). :func:`run` returns the counts; tests/test_suite_fuzz.py runs a CI
sample, ``python tests/suite_fuzz.py N`` a longer one.
"""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SUITES = sorted((REPO / "workflow" / "suites").glob("*.yaml"))
SCHEMA = yaml.safe_load((REPO / "kdbench" / "schemas" / "suite.schema.yaml").read_text())

#: leaves whose change alters no run id, cell or table by design (where or how runs execute,
#: text for readers), as docs/guarantees lists them: path patterns ("*" one key or index)
DOCUMENTED_INERT = [
    "name", "description", "device", "threads", "pack", "pack/*", "runs_dir", "imports", "datasets/*/root",
    "execution/channels_last", "execution/compile", "execution/cache_dir", "execution/teacher_cache",
    "experiments/*/execution/channels_last", "experiments/*/execution/compile", "experiments/*/execution/cache_dir",
    "experiments/*/execution/teacher_cache",
    "recipe/test_batch_size", "experiments/*/recipe/test_batch_size", "experiments/*/teacher_recipe/test_batch_size",
    "experiments/*/linear_probe/recipe/test_batch_size",
]


# ---------------------------------------------------------------- the schema, walked with the data

def _resolve(node: dict) -> dict:
    while "$ref" in node:
        target = SCHEMA
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}[type(value)]


def schema_at(path: tuple) -> dict | None:
    """The schema of the value at ``path`` of the shipped data (oneOf: the alternative of the
    value's own type), or None under a free-form object."""
    node, data = _resolve(SCHEMA), None
    for key in path:
        if "oneOf" in node:
            node = _resolve(node["oneOf"][0])
        if isinstance(key, int):
            node = _resolve(node.get("items", {}))
        elif key in node.get("properties", {}):
            node = _resolve(node["properties"][key])
        elif isinstance(node.get("additionalProperties"), dict):
            node = _resolve(node["additionalProperties"])
        else:
            return None
    return node or None


def fixed_keys(path: tuple) -> bool:
    """Whether the mapping at ``path`` has a fixed set of keys (a typo there is an unknown key)."""
    node = schema_at(path)
    if node is None:
        return False
    if "oneOf" in node:
        node = next((_resolve(a) for a in node["oneOf"] if _resolve(a).get("type") == "object"), node)
    return node.get("additionalProperties") is False


# ---------------------------------------------------------------- units

def units(work: Path) -> list[tuple[str, dict]]:
    """(name, config) of every unit: per shipped suite, one per own experiment (with the tables
    whose experiments are all that one), or the whole file for a suite of includes only."""
    out = []
    for path in SUITES:
        cfg = json.loads(json.dumps(yaml.safe_load(path.read_text())))  # no shared (aliased) objects
        if not cfg.get("experiments"):
            out.append((path.stem, cfg))
            continue
        for exp in cfg["experiments"]:
            u = {k: v for k, v in copy.deepcopy(cfg).items() if k != "include"}
            u["experiments"] = [copy.deepcopy(exp)]
            u["tables"] = [t for t in cfg.get("tables", []) if set(_table_experiments(t)) <= {exp["name"]}]
            if not u["tables"]:
                u.pop("tables")
            run = set(exp["methods"])
            u["methods"] = {m: v for m, v in (cfg.get("methods") or {}).items() if m in run}
            if not u["methods"]:
                u.pop("methods", None)
            u["name"] = f"{cfg['name']}.{exp['name']}"
            out.append((f"{path.stem}:{exp['name']}", u))
    return out


def _table_experiments(t: dict) -> list[str]:
    names = list(t["experiments"]) + [e for g in t.get("groups") or [] for e in g.get("experiments") or []]
    for v in ((t.get("stand_in") or {}).get("groups") or {}).values():
        names += v if isinstance(v, list) else [v]
    return names


# ---------------------------------------------------------------- the oracle

def expected_cells(cfg: dict, folder: Path) -> set[tuple]:
    """(experiment, dataset, teacher, student, column, seed) of every table cell the suite's
    declarations imply, derived from the YAML alone (no planner code): teachers per teacher seed
    (one released, none imported), every method per seed, a sweep's grid as method[k=v] columns,
    the same cells again on each linear-probe dataset."""
    from kdbench.methods import METHODS

    out = set()
    for inc in cfg.get("include", []):  # an included suite's cells, with its own suite-level keys
        out |= expected_cells(yaml.safe_load((folder / inc).read_text()), (folder / inc).parent)
    for exp in cfg.get("experiments", []):
        seeds = exp["seeds"] if isinstance(exp["seeds"], list) else list(range(exp["seeds"]["looks"][0]))
        overrides = {**(cfg.get("methods") or {}), **(exp.get("method_overrides") or {})}
        datasets = [exp["dataset"]] + list((exp.get("linear_probe") or {}).get("datasets", []))
        for t, s in exp["pairs"]:
            source = exp.get("teacher", cfg.get("teacher", "train"))
            source = source.get(t, "train") if isinstance(source, dict) else source
            columns = []
            if source == "released":
                columns.append(("teacher", [0]))
            elif t not in (exp.get("teacher_checkpoints") or {}):
                columns.append(("teacher", exp.get("teacher_seeds", [0])))
            for m in exp["methods"]:
                terms = (overrides.get(m) or {}).get("terms", METHODS.get(m).terms)
                keys = [k for k in (exp.get("sweep") or {}) if (k == "ce" and terms) or k.split(".")[0] in terms]
                if not keys:
                    columns.append((m, seeds))
                    continue
                grid = [[]]
                for k in keys:
                    grid = [g + [(k, v)] for g in grid for v in exp["sweep"][k]]
                for point in grid:
                    label = ",".join(f"{k}={format(v, 'g') if isinstance(v, float) else v}" for k, v in point)
                    columns.append((f"{m}[{label}]", seeds))
            for ds in datasets:
                out |= {(exp["name"], ds, t, s, col, seed) for col, ss in columns for seed in ss}
    return out


def _cell(c) -> tuple:
    return (c.experiment, c.dataset, c.teacher, c.student, c.column, c.seed)


def plan(path: Path):
    """(normal form, cells, warnings) of the suite at ``path``, or raises SuiteError."""
    from kdbench.planning.suite import load_suite

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        suite = load_suite(path)
    cells = set(map(_cell, suite.cells))
    form = (tuple(sorted(suite.runs)), tuple(sorted((*cell, c.run) for cell, c in zip(map(_cell, suite.cells), suite.cells))),
            json.dumps(suite.config.get("tables", []), sort_keys=True, default=str))
    return form, cells, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# ---------------------------------------------------------------- mutations

def leaves(node, path=()):
    """(path, value) of every scalar and every list of scalars."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, path + (k,))
    elif isinstance(node, list) and any(isinstance(v, (dict, list)) for v in node):
        for i, v in enumerate(node):
            yield from leaves(v, path + (i,))
    else:
        yield path, node


def mappings(node, path=()):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from mappings(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from mappings(v, path + (i,))


def get(cfg, path):
    for k in path:
        cfg = cfg[k]
    return cfg


def put(cfg, path, value):
    get(cfg, path[:-1])[path[-1]] = value


def typo(word: str, rng: random.Random) -> str:
    word = str(word)
    i = rng.randrange(len(word) + 1)
    kind = rng.choice(["insert", "delete", "swap"]) if len(word) > 2 else "insert"
    if kind == "insert":
        return word[:i] + rng.choice("qxz") + word[i:]
    i = min(i, len(word) - 2)
    out = word[:i] + word[i + 1:] if kind == "delete" else word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return out if out != word else word + "q"


def m_typo(cfg, rng):
    path, node = rng.choice([(p, n) for p, n in mappings(cfg) if n])
    key = rng.choice(list(node))
    new = typo(key, rng)
    get(cfg, path)[new] = get(cfg, path).pop(key) if new not in node else None
    return cfg, {"path": path + (key,), "names": [new, str(key)], "must": "refused" if fixed_keys(path) else None}


OTHER_TYPES = ["x_str", 7, 0.5, True, [1], {"q": 1}, None]


def m_wrong_type(cfg, rng):
    path, value = rng.choice(list(leaves(cfg)))
    new = rng.choice([v for v in OTHER_TYPES if _kind(v) != _kind(value)])
    put(cfg, path, copy.deepcopy(new))
    return cfg, {"path": path, "names": [str(k) for k in path if isinstance(k, str)][-2:], "must": None}


def m_nonfinite(cfg, rng):
    numbers = [(p, v) for p, v in leaves(cfg) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers:
        return None
    path, _ = rng.choice(numbers)
    put(cfg, path, rng.choice([float("nan"), float("inf"), float("-inf")]))
    return cfg, {"path": path, "names": ["not a finite number"], "must": "refused"}


def name_slots(cfg):
    """Paths of the values that name something the suite or kdbench must have."""
    for i, e in enumerate(cfg.get("experiments", [])):
        yield ("experiments", i, "dataset")
        for j in range(len(e["pairs"])):
            yield ("experiments", i, "pairs", j, 0)
            yield ("experiments", i, "pairs", j, 1)
        for j in range(len(e["methods"])):
            yield ("experiments", i, "methods", j)
        for key in ("teacher_dataset",):
            if key in e:
                yield ("experiments", i, key)
        for j in range(len((e.get("linear_probe") or {}).get("datasets", []))):
            yield ("experiments", i, "linear_probe", "datasets", j)
        if isinstance(e["seeds"], dict) and "reference" in e["seeds"]:
            yield ("experiments", i, "seeds", "reference")
        for key in ("recipe", "teacher_recipe"):
            for j in range(len((e.get(key) or {}).get("small_lr_archs", []))):
                yield ("experiments", i, key, "small_lr_archs", j)
    for i, t in enumerate(cfg.get("tables", [])):
        for j in range(len(t["experiments"])):
            yield ("tables", i, "experiments", j)
        if t.get("reference"):
            yield ("tables", i, "reference")
        if "published" in t and "paper" in t["published"]:
            yield ("tables", i, "published", "paper")
    for j in range(len(cfg.get("include", []))):
        yield ("include", j)


def m_dangling(cfg, rng):
    path = rng.choice(list(name_slots(cfg)))
    new = f"zzq{rng.randrange(1000)}" + (".yaml" if path[0] == "include" else "")
    put(cfg, path, new)
    return cfg, {"path": path, "names": [new], "must": "refused"}


def m_inert(cfg, rng):
    """A declaration nothing reads, added (refused, or warned where kdbench documents it)."""
    exp = rng.choice(cfg["experiments"]) if cfg.get("experiments") else None
    if exp is None:
        return None
    run = set(exp["methods"])
    from kdbench.methods import LOSSES, METHODS
    used = {t for m in run for t in METHODS.get(m).terms}
    not_run = sorted(set(METHODS.names()) - run - {"student"})
    unused_terms = sorted(set(LOSSES.names()) - used)
    choices = {
        "milestones under cosine": lambda: exp.setdefault("recipe", {}).update(schedule="cosine", milestones=[1]),
        "warmup under step": lambda: exp.setdefault("recipe", {}).update(schedule="step", warmup_epochs=1),
        "override of a method not run": lambda: exp.setdefault("method_overrides", {}).update({not_run[0]: {"ce": 1.0}}),
        "term_params of an unused term": lambda: exp.setdefault("term_params", {}).update({unused_terms[0]: {}}),
        "checkpoint of a non-teacher": lambda: exp.setdefault("teacher_checkpoints", {}).update({"zzq_arch": "t.pt"}),
        "primary on a seed table": lambda: cfg.setdefault("tables", []).append(
            {"name": "zzq_t", "experiments": [exp["name"]], "primary": {"a": ["b"]}}),
        "alpha on a seed table": lambda: cfg.setdefault("tables", []).append(
            {"name": "zzq_t", "experiments": [exp["name"]], "alpha": 0.1}),
        "stand_in without like": lambda: cfg.setdefault("tables", []).append(
            {"name": "zzq_t", "experiments": [exp["name"]], "rows": {"KD": "kd"}, "stand_in": {"note": "x"}}),
        "sweep without validation": lambda: (exp.pop("validation", None), exp.update(sweep={"ce": [0.5, 1.0]})),
    }
    if not not_run:
        del choices["override of a method not run"]
    if not unused_terms:
        del choices["term_params of an unused term"]
    what = rng.choice(sorted(choices))
    choices[what]()
    return cfg, {"path": ("experiments", what), "names": [], "must": "refused", "what": what}


def m_perturb(cfg, rng):
    """A leaf changed to another value its schema allows."""
    path, value = rng.choice(list(leaves(cfg)))
    node = schema_at(path) or {}
    if "enum" in node and len(node["enum"]) > 1:
        new = rng.choice([v for v in node["enum"] if v != value])
    elif isinstance(value, bool):
        new = not value
    elif isinstance(value, int):
        new = value + rng.choice([1, 2])
    elif isinstance(value, float):
        new = value * rng.choice([0.5, 0.9, 1.5])
    elif isinstance(value, str):
        new = value + "_2"
    elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        new = value + [max(value) + 1]
    else:
        return None
    put(cfg, path, new)
    return cfg, {"path": path, "names": [str(k) for k in path if isinstance(k, str)][-1:] + [str(new)], "must": None}


MUTATIONS = {"typo": m_typo, "wrong_type": m_wrong_type, "nonfinite": m_nonfinite, "dangling": m_dangling,
             "inert": m_inert, "perturb": m_perturb}


def duplicate_line(text: str, rng: random.Random) -> tuple[str, str] | None:
    """``text`` (block-style YAML) with one ``key:`` written again, as ``key: null``, right after
    that key's whole block (so the mapping stays well-formed); and the key."""
    lines = text.splitlines()
    keyed = [i for i, ln in enumerate(lines) if re.match(r"^\s*[A-Za-z_][\w.-]*:( |$)", ln)]
    if not keyed:
        return None
    i = rng.choice(keyed)
    indent = len(lines[i]) - len(lines[i].lstrip())
    key = lines[i].split(":")[0].strip()
    end = i + 1
    while end < len(lines):
        ln = lines[end]
        depth = len(ln) - len(ln.lstrip())
        if ln.strip() and (depth < indent or (depth == indent and not ln.lstrip().startswith("- "))):
            break
        end += 1
    return "\n".join(lines[:end] + [" " * indent + key + ": null"] + lines[end:]) + "\n", key


def _pattern(path: tuple) -> str:
    return "/".join("*" if isinstance(k, int) else str(k) for k in path)


def inert_documented(path: tuple) -> bool:
    p = _pattern(path)
    return any(p == d or re.fullmatch(d.replace("*", "[^/]+"), p) or p.startswith(d + "/") for d in DOCUMENTED_INERT)


def run(n: int, seed: int = 0, work: Path | None = None, verbose: bool = False) -> dict:
    """Plan ``n`` mutants (seeded); returns {"outcomes": Counter, "by_kind": {...}, "failures": [...]}."""
    from kdbench.planning.suite import SuiteError

    rng = random.Random(seed)
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="kdbench-fuzz-")) if own else work
    try:
        for s in SUITES:
            shutil.copy(s, work / s.name)
        base = {}
        for name, cfg in units(work):
            path = work / f"unit--{name.replace(':', '--')}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            try:
                base[name] = (cfg, plan(path))
            except SuiteError:
                pass  # a unit that needs its suite's other experiments (e.g. a shared table): the suite is still covered
        outcomes, by_kind, failures, paths = Counter(), {}, [], {}
        names = sorted(base)
        kinds = [*MUTATIONS, "duplicate"]
        done = 0
        while done < n:
            name = names[done % len(names)]
            kind = kinds[rng.randrange(len(kinds))]
            cfg0, (form0, cells0, warned0) = base[name]
            cfg = json.loads(json.dumps(cfg0))
            path = work / f"mutant-{done % 7}.yaml"
            if kind == "duplicate":
                got = duplicate_line(yaml.safe_dump(cfg, sort_keys=False), rng)
                if got is None:
                    continue
                text, key = got
                want = {"path": (key,), "names": [f"key {key!r} appears twice"], "must": "refused"}
            else:
                mutated = MUTATIONS[kind](cfg, rng)
                if mutated is None:
                    continue
                cfg, want = mutated
                text = yaml.safe_dump(cfg, sort_keys=False)
            path.write_text(text)
            done += 1
            try:
                form, cells, warned = plan(path)
            except SuiteError as e:
                msg = str(e)
                if want["names"] and not any(nm in msg for nm in want["names"]):
                    failures.append((name, kind, want, f"refused without naming {want['names']}: {msg[:300]}"))
                outcome = "refused"
            except Exception as e:  # a crash is a failure: bad input must get a SuiteError
                failures.append((name, kind, want, f"{type(e).__name__}: {e}"[:400]))
                outcome = "crashed"
            else:
                if cells != expected_cells(cfg, work):
                    failures.append((name, kind, want, f"planned cells differ from the oracle's: "
                                     f"{sorted(cells ^ expected_cells(cfg, work))[:4]}"))
                if set(warned) - set(warned0) and form == form0:
                    outcome = "warned"
                elif form != form0:
                    outcome = "effective"
                else:
                    outcome = "inert"
                    if not inert_documented(want["path"]):
                        failures.append((name, kind, want, "accepted and changed nothing: an inert declaration "
                                         "neither refused, warned nor documented"))
                if want["must"] == "refused" and outcome != "warned":
                    failures.append((name, kind, want, f"must be refused, was {outcome}"))
            outcomes[outcome] += 1
            paths.setdefault((kind, outcome), Counter())[_pattern(want["path"])] += 1
            by_kind.setdefault(kind, Counter())[outcome] += 1
            if verbose and failures and failures[-1][0] == name:
                print(failures[-1], file=sys.stderr)
        return {"outcomes": outcomes, "by_kind": by_kind, "failures": failures, "units": len(base), "paths": paths,
                "suites": sorted({n.split(":")[0] for n in base})}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import time

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    t = time.time()
    res = run(n, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(f"{n} mutants of {res['units']} units of {len(res['suites'])} suites in {time.time() - t:.0f} s: "
          f"{dict(res['outcomes'])}")
    for kind, c in sorted(res["by_kind"].items()):
        print(f"  {kind}: {dict(c)}")
    if "-v" in sys.argv:
        for (kind, outcome), c in sorted(res["paths"].items()):
            if outcome != "refused":
                print(f"  {kind} {outcome}: {dict(c.most_common(12))}")
    for f in res["failures"][:40]:
        print("FAIL", f)
    sys.exit(1 if res["failures"] else 0)
