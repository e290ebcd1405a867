"""Every file kdbench writes goes through the atomic writers of kdbench/core/io.py.

A static scan of the package: a bare ``torch.save(obj, path)``, ``open(path, "w"/"a"/"x"/"+")``,
``Path.write_text``/``write_bytes`` or ``savefig(path)`` outside kdbench/core/io.py fails this
test, unless it writes into the file object of a ``with atomic_file(...) as f`` block. The few
exceptions are listed with the reason each is safe.
"""

import ast
from pathlib import Path

from conftest import REPO

#: (file, line's code) -> why a bare write is safe there
ALLOWED = {
    ("kdbench/data/cifar.py", 'with open(base / f, "wb") as fh:'):
        "synthetic dataset files, written under the dataset's flock; the marker is written atomically last "
        "(kdbench/data/synthetic_files.py), so a killed make-data is redone whole",
    ("kdbench/data/cifar.py", 'with open(base / meta_file, "wb") as fh:'): "as above",
    ("kdbench/data/stl10.py", '(base / "class_names.txt").write_text("\\n".join(classes) + "\\n")'): "as above",
    ("kdbench/data/tinyimagenet.py", '(base / "wnids.txt").write_text("".join(f"{w}\\n" for w in ids))'): "as above",
    ("kdbench/data/tinyimagenet.py",
     '(base / "words.txt").write_text("".join(f"{w}\\t{c}\\n" for w, c in zip(ids, train.classes)))'): "as above",
    ("kdbench/data/tinyimagenet.py",
     '(base / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{k}.JPEG\\t0\\t0\\t63\\t63\\n" for k in range(c)))'):
        "as above",
    ("kdbench/data/tinyimagenet.py", '(base / "val" / "val_annotations.txt").write_text("".join(lines))'): "as above",
    ("kdbench/data/synthetic_files.py", 'with open(root_path / LOCK, "a") as lock:'): "a lock file: no content",
    ("kdbench/commands/bench.py",
     'torch.save({"epoch": epoch + 1, "model": student.state_dict(), "optimizer": optimizer.state_dict()},'):
        "kdbench bench's reference loop writes as RepDistiller's train_student.py does (a plain per-epoch "
        "torch.save), into a scratch folder of its own: the write is what is timed, and nobody reads the file",
    ("kdbench/commands/bench.py", '(folder / "metrics.json").write_text(json.dumps(curve))'): "as above",
}


def _mode(call: ast.Call) -> str:
    args = call.args[1:2] + [k.value for k in call.keywords if k.arg == "mode"]
    return args[0].value if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str) else "r"


def bare_writes(source: str) -> list[tuple[int, str]]:
    """(line, code) of every write in ``source`` that bypasses the atomic writers."""
    tree = ast.parse(source)
    atomic_names: set[int] = set()  # ids of Name nodes bound by `with atomic_file(...) as name` and used inside
    for node in ast.walk(tree):
        if isinstance(node, ast.With):
            bound = {item.optional_vars.id for item in node.items
                     if isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", None)
                     == "atomic_file" and isinstance(item.optional_vars, ast.Name)}
            for inner in ast.walk(ast.Module(body=node.body, type_ignores=[])):
                if isinstance(inner, ast.Name) and inner.id in bound:
                    atomic_names.add(id(inner))
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        into_atomic = any(id(a) in atomic_names for a in node.args)
        bad = ((name == "save" and isinstance(f, ast.Attribute) and getattr(f.value, "id", None) == "torch"
                and not into_atomic)
               or (name == "open" and isinstance(f, ast.Name) and set(_mode(node)) & set("wax+"))
               or (name in ("write_text", "write_bytes") and isinstance(f, ast.Attribute))
               or (name == "savefig" and not into_atomic))
        if bad:
            found.append((node.lineno, lines[node.lineno - 1].strip()))
    return found


def test_the_scan_finds_each_kind_of_bare_write():
    src = ("import torch\nfrom pathlib import Path\n"
           "torch.save({}, 'x.pt')\nopen('y', 'w').write('')\nPath('z').write_text('')\nfig.savefig('a.png')\n"
           "with open('r') as f: pass\n"
           "with atomic_file('ok.pt') as f:\n    torch.save({}, f)\n    fig.savefig(f, format='png')\n")
    assert sorted(line for line, _ in bare_writes(src)) == [3, 4, 5, 6]


def test_no_bare_write_of_an_output_outside_core_io():
    offenders = []
    for path in sorted((REPO / "kdbench").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "kdbench/core/io.py":
            continue
        for line, code in bare_writes(path.read_text()):
            if (rel, code) not in ALLOWED:
                offenders.append(f"{rel}:{line}: {code}")
    assert not offenders, ("write these through kdbench.core.io (atomic_file, atomic_write_bytes/json, "
                           "atomic_torch_save):\n" + "\n".join(offenders))


def test_every_allowed_exception_still_exists():
    """An exception whose code is gone is removed from the list (it would excuse a new write)."""
    present = {(p.relative_to(REPO).as_posix(), code) for p in (REPO / "kdbench").rglob("*.py")
               for _, code in bare_writes(p.read_text())}
    assert set(ALLOWED) <= present, set(ALLOWED) - present
