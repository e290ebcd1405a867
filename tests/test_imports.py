"""The package's import graph (every import statement of every module, those inside functions
included): no circle, and no import from a lower layer to a higher one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kdbench"

#: the layers, lowest first, each a set of folders of kdbench/: a module may import its own layer
#: and those below it, never above. Every module lives in one of these folders (``kdbench`` itself
#: is the package's ``__init__``, which holds only the version).
LAYERS = [
    ("foundations", ["core"]),
    ("data and models", ["data", "models"]),
    ("methods", ["methods"]),
    ("engine", ["engine"]),
    ("teacher sources", ["teachers"]),
    ("planning", ["planning"]),
    ("statistics", ["stats"]),
    ("report", ["report"]),
    ("commands", ["commands"]),
]
#: the plain training path, and what it must not import (the fast paths wrap it, never the reverse)
PLAIN = ["kdbench.engine.run", "kdbench.engine.step"]
FAST = ["kdbench.engine.fast", "kdbench.engine.pack", "kdbench.engine.fusion", "kdbench.engine.teacher_cache",
        "kdbench.engine.fit"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The kdbench modules ``path`` imports anywhere in its code (``from . import x`` of a
    submodule x counts as importing x)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "kdbench"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "kdbench":
                target = node.module
            else:
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out |= subs or {target}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer(name: str) -> int:
    """The layer of a module: the one holding its folder (``kdbench.engine.run`` -> engine)."""
    parts = name.split(".")
    if parts == ["kdbench"]:
        return 0
    folder = parts[1]
    for k, (_, folders) in enumerate(LAYERS):
        if folder in folders:
            return k
    raise AssertionError(f"{name} is in no layer folder of {__file__}: put it in one of "
                         f"{', '.join(f for _, fs in LAYERS for f in fs)}")


def test_every_module_is_in_a_layer_folder():
    for name in modules():
        layer(name)
    assert [p.name for p in PACKAGE.glob("*.py")] == ["__init__.py"]


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    g = graph()
    assert "kdbench.engine.linear_probe" in g["kdbench.engine.fit"]  # imported inside fit()


def test_no_import_circle():
    assert cycles(graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    g = graph()
    up = sorted(f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
                for a, bs in g.items() for b in bs if layer(b) > layer(a))
    assert up == []


def test_the_plain_training_path_imports_no_fast_path():
    g = graph()
    assert {(a, b) for a in PLAIN for b in g[a] if b in FAST} == set()
