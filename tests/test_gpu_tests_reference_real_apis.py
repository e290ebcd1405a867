"""Every test that only a GPU runs (marked ``cuda`` by conftest.py: a skipif whose reason names a
GPU or CUDA) references only kdbench names that exist, and calls kdbench functions and classes
with arguments their signatures accept — checked here on CPU, from the tests' source, so that a
renamed function or a changed signature can never again hide behind the skip (test_pack.py once
called ``bench._epoch_gen``, deleted long before, and "passed" because it was skipped).

What is resolved (:func:`problems`): ``import kdbench...`` and ``from kdbench... import name``
anywhere in the test's module or its body; every attribute chain ``name.attr...`` whose root is
bound to a kdbench module, class or function, as long as the value is a module or a class (an
instance's attributes are not known without running it); every call of such a resolved function or
class, bound against its signature with the call's number of positional arguments and keyword names
(calls with ``*args``/``**kwargs`` are not bound)."""

import ast
import importlib
import inspect
import types
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _text(node) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant))
    return ""


def gpu_skip(decorator) -> bool:
    """Whether ``decorator`` is ``pytest.mark.skipif(..., reason=...)`` with a reason naming a GPU
    or CUDA: what conftest.py marks ``cuda``."""
    if not (isinstance(decorator, ast.Call) and _dotted(decorator.func).endswith("mark.skipif")):
        return False
    reason = " ".join(_text(k.value) for k in decorator.keywords if k.arg == "reason").lower()
    return "gpu" in reason or "cuda" in reason


def gpu_tests(tree: ast.Module) -> list[ast.FunctionDef]:
    """The test functions of a module that conftest.py marks ``cuda`` (their own decorator, their
    class's, or the module's ``pytestmark``)."""
    def marks(value) -> list:
        return value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value]

    module_skip = any(gpu_skip(m) for node in tree.body if isinstance(node, ast.Assign)
                      and any(_dotted(t) == "pytestmark" for t in node.targets) for m in marks(node.value))
    found = []
    for node in tree.body:
        scope = [node] if isinstance(node, ast.FunctionDef) else []
        skipped = module_skip
        if isinstance(node, ast.ClassDef):
            skipped |= any(gpu_skip(d) for d in node.decorator_list)
            scope = [n for n in node.body if isinstance(n, ast.FunctionDef)]
        found += [f for f in scope if f.name.startswith("test") and (skipped or any(gpu_skip(d) for d in f.decorator_list))]
    return found


def _import(module: str, where: str, out: list[str]):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        out.append(f"{where}: import {module}: {e}")
        return None


def _bind(node: ast.AST, scope: dict, where: str, out: list[str]) -> None:
    """Bind the names an import node defines (kdbench ones to their objects, others to None)."""
    if isinstance(node, ast.Import):
        for a in node.names:
            top = a.name.split(".")[0]
            mod = _import(a.name, where, out) if top == "kdbench" else None
            scope[a.asname or top] = mod if a.asname else (importlib.import_module(top) if mod else None)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "kdbench":
        mod = _import(node.module, where, out)
        for a in node.names:
            if mod is None:
                scope[a.asname or a.name] = None
            elif hasattr(mod, a.name):
                scope[a.asname or a.name] = getattr(mod, a.name)
            else:  # a submodule not imported yet
                try:
                    scope[a.asname or a.name] = importlib.import_module(f"{node.module}.{a.name}")
                except ImportError:
                    out.append(f"{where}: from {node.module} import {a.name}: {node.module} has no {a.name!r}")
                    scope[a.asname or a.name] = None
    elif isinstance(node, ast.ImportFrom):
        for a in node.names:
            scope[a.asname or a.name] = None


def _kdbench(obj) -> bool:
    name = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None) or ""
    return name.split(".")[0] == "kdbench"


def _resolve(node, scope: dict, where: str, out: list[str]):
    """The kdbench object an expression ``name.attr...`` denotes, or None (not kdbench, or not
    known without running the test); a missing attribute is reported."""
    if isinstance(node, ast.Name):
        obj = scope.get(node.id)
        return obj if obj is not None and _kdbench(obj) else None
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, scope, where, out)
        if base is None or not isinstance(base, (types.ModuleType, type)):
            return None
        if not hasattr(base, node.attr):
            if isinstance(base, types.ModuleType):
                try:  # a submodule not imported yet
                    return importlib.import_module(f"{base.__name__}.{node.attr}")
                except ImportError:
                    pass
            out.append(f"{where}: {_dotted(node)}: {base.__name__} has no attribute {node.attr!r}")
            return None
        value = getattr(base, node.attr)
        return value if _kdbench(value) or isinstance(value, (types.ModuleType, type)) else None
    return None


def _check_call(call: ast.Call, scope: dict, where: str, out: list[str]) -> None:
    fn = _resolve(call.func, scope, where, out)
    if fn is None or not callable(fn) or isinstance(fn, types.ModuleType):
        return
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords})
    except TypeError as e:
        out.append(f"{where}: {_dotted(call.func)}({len(call.args)} positional, "
                   f"{', '.join(k.arg for k in call.keywords) or 'no keywords'}) does not fit {fn.__qualname__}{sig}: {e}")


def problems(source: str, filename: str = "<test>") -> list[str]:
    """What the ``cuda``-marked tests of a test module's ``source`` reference that does not exist."""
    tree = ast.parse(source, filename)
    out: list[str] = []
    module_scope: dict = {}
    for node in tree.body:
        _bind(node, module_scope, filename, out)
    for test in gpu_tests(tree):
        where = f"{filename}::{test.name}"
        scope = dict(module_scope)
        nodes = list(ast.walk(test))
        for node in nodes:  # imports first: a local import binds its name for the whole body
            _bind(node, scope, where, out)
        for node in nodes:
            if isinstance(node, ast.Call):
                _check_call(node, scope, where, out)
            elif isinstance(node, ast.Attribute):
                _resolve(node, scope, where, out)
    return sorted(set(out))


def test_every_gpu_test_references_only_apis_that_exist():
    files = sorted(TESTS.glob("test_*.py"))
    checked = [(p.name, t.name) for p in files for t in gpu_tests(ast.parse(p.read_text()))]
    assert ("test_pack.py", "test_fused_pack_steps_do_not_synchronise_on_gpu") in checked  # the check sees them
    found = [msg for p in files for msg in problems(p.read_text(), p.name)]
    assert not found, "\n".join(found)


STALE = '''
import pytest, torch
from kdbench.commands import bench

@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU matter")
def test_gpu():
    from kdbench.engine.pack import {name}
    from kdbench.engine import step
    bench.{attr}(None)
    step.train_step({args})
    step.Eager.{method}
'''
GOOD = {"name": "Lockstep", "attr": "device_name", "args": ", ".join(["None"] * 8), "method": "stepper"}


@pytest.mark.parametrize("mutation, reported", [
    ({}, None),
    ({"name": "drive_packed"}, "has no 'drive_packed'"),  # a deleted function
    ({"attr": "_epoch_gen"}, "has no attribute '_epoch_gen'"),  # a deleted module attribute
    ({"method": "steps"}, "has no attribute 'steps'"),  # a renamed method
    ({"args": "None"}, "does not fit train_step"),  # a call that no longer binds
    ({"args": ", ".join(["None"] * 8) + ", bogus=1"}, "does not fit train_step"),
])
def test_the_check_reports_each_kind_of_stale_reference(mutation, reported):
    source = STALE.format(**{**GOOD, **mutation})
    found = problems(source)
    if reported is None:
        assert found == []
    else:
        assert len(found) == 1 and reported in found[0], found
    # the same test without the GPU skip is not checked: only cuda-marked tests are
    assert problems(source.replace('reason="a GPU matter"', 'reason="slow"')) == []


def test_which_tests_are_gpu_tests_follows_conftest():
    """conftest.py marks a test ``cuda`` when a skipif reason (its own, its class's or the module's
    pytestmark) names a GPU or CUDA."""
    src = '''
import pytest
pytestmark = [pytest.mark.skipif(False, reason="needs CUDA")]
def test_a(): pass
'''
    assert [t.name for t in gpu_tests(ast.parse(src))] == ["test_a"]
    src = '''
import pytest
@pytest.mark.skipif(False, reason=f"no gpu here")
class TestX:
    def test_b(self): pass
@pytest.mark.skipif(False, reason="slow")
def test_c(): pass
def helper(): pass
'''
    assert [t.name for t in gpu_tests(ast.parse(src))] == ["test_b"]
