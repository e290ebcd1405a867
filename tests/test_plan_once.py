"""Plan once, resolve once (issue 23): one merge of a suite's override layers, one builder of run
ids, a planner that writes each run's resolved spec (runs/<id>/spec.json) and jobs that read that
file alone, and the files a suite value passes on its way to its loss."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdbench.core.spec import JOB_FILE, RunSpec, read_job_record, run_id
from kdbench.methods import METHODS, merge_overrides, resolve_method
from kdbench.planning.suite import load_suite, write_specs

from conftest import write_suite

SUITES = sorted(Path(__file__).resolve().parent.parent.glob("workflow/suites/*.yaml"))


# ---- one merge -------------------------------------------------------------------------------

def test_merge_overrides_golden():
    """Registered kd (0.1·CE + 0.9·kd, T 4) under a suite's term_params, an experiment's, and a
    method override: ce/terms from the highest layer that sets them, params per term and key."""
    kd = METHODS.get("kd")
    layers = [{"params": {"kd": {"T": 2}}}, {"params": {"kd": {"ensemble": "mean"}}},
              {"ce": 0.5, "params": {"kd": {"T": 3}}}, {"terms": {"kd": 2.0}}]
    assert merge_overrides(*layers) == {"ce": 0.5, "terms": {"kd": 2.0}, "params": {"kd": {"T": 3, "ensemble": "mean"}}}
    spec = kd.with_overrides(merge_overrides(*layers))
    assert (spec.ce, spec.terms, spec.params) == (0.5, {"kd": 2.0}, {"kd": {"T": 3, "ensemble": "mean"}})
    assert merge_overrides({"params": {}}, None, {}) == {}  # a bare params adds nothing
    with pytest.raises(ValueError, match="method 'kd': unknown override keys \\['weights'\\]; valid: ce, terms, params"):
        kd.with_overrides({"weights": {}})


def test_merge_overrides_the_highest_layer_wins_for_every_key():
    """Generated layers: each parameter's value is the one of the highest layer that sets it, ce and
    terms those of the highest layer that has them, and no layer is changed."""
    rng = random.Random(0)
    for _ in range(300):
        layers = []
        for _ in range(rng.randint(0, 5)):
            layer = {}
            if rng.random() < 0.4:
                layer["ce"] = rng.choice([0.0, 0.5, 1])
            if rng.random() < 0.4:
                layer["terms"] = {t: rng.random() for t in rng.sample("abc", rng.randint(0, 3))}
            if rng.random() < 0.7:
                layer["params"] = {t: {k: rng.random() for k in rng.sample("xyz", rng.randint(0, 3))}
                                   for t in rng.sample("abc", rng.randint(0, 3))}
            layers.append(layer)
        before = json.dumps(layers)
        out = merge_overrides(*layers)
        assert json.dumps(layers) == before
        for key in ("ce", "terms"):
            setting = [la[key] for la in layers if key in la]
            assert out.get(key, "unset") == (setting[-1] if setting else "unset")
        expected = {}
        for la in layers:
            for t, p in (la.get("params") or {}).items():
                for k, v in p.items():
                    expected[(t, k)] = v
        got = {(t, k): v for t, p in out.get("params", {}).items() for k, v in p.items()}
        assert got == expected
        named = {t for la in layers for t in (la.get("params") or {})}
        assert set(out.get("params", {})) == named


def test_a_suite_value_takes_every_layer_in_order(tmp_path):
    """term_params of the suite < of the experiment < the suite's methods entry < the experiment's
    method_overrides, for the runs' hashed overrides and the method they train."""
    path = write_suite(tmp_path / "s.yaml", tmp_path / "d", term_params={"kd": {"T": 2}},
                       methods={"kd": {"ce": 0.3}}, experiments=[
        {"name": "a", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["kd"], "seeds": [0]},
        {"name": "b", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["kd"], "seeds": [0],
         "term_params": {"kd": {"T": 3}}},
        {"name": "c", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["kd"], "seeds": [0],
         "term_params": {"kd": {"T": 3}}, "method_overrides": {"kd": {"ce": 0.2, "params": {"kd": {"T": 5}}}}}],
        tables=[])
    suite = load_suite(path)
    got = {r.experiment: (r.spec.method_overrides, r.method.ce, r.method.params["kd"]["T"])
           for r in suite.runs.values() if r.kind == "distill"}
    assert got == {"a": ({"ce": 0.3, "params": {"kd": {"T": 2}}}, 0.3, 2),
                   "b": ({"ce": 0.3, "params": {"kd": {"T": 3}}}, 0.3, 3),
                   "c": ({"ce": 0.2, "params": {"kd": {"T": 5}}}, 0.2, 5)}


# ---- one place builds run ids, the plan round-trips ------------------------------------------

@pytest.mark.parametrize("suite_file", SUITES, ids=lambda p: p.stem)
def test_every_shipped_run_is_planned_to_a_spec_that_gives_it_back(suite_file, tmp_path):
    """Each run's spec.json reads back to the planner's RunSpec, its id is run_id(spec) (the one
    builder), its method is what the engine resolves, and a second plan rewrites nothing."""
    suite = load_suite(suite_file)
    suite.config["runs_dir"] = str(tmp_path)
    assert write_specs(suite) == len(suite.runs)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob(JOB_FILE)}
    assert len(stamps) == len(suite.runs)
    for rid, run in suite.runs.items():
        record, spec = read_job_record(tmp_path / rid / JOB_FILE)
        assert spec == run.spec and record["run"] == rid and record["kind"] == run.kind
        source = rid.rsplit("/", 1)[1].rsplit("-", 1)[0] if run.kind == "import" else None
        assert run_id(spec, source) == rid
        if spec.protocol == "fit" and run.kind != "import":
            m = resolve_method(spec.method, spec.method_overrides)
            assert record["method"] == {"name": m.name, "ce": m.ce, "terms": m.terms, "params": m.params}
    assert write_specs(suite) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob(JOB_FILE)} == stamps


def test_resolve_method_runs_at_most_once_per_run_when_planning(monkeypatch):
    import kdbench.methods.base as base

    calls = []
    real = base.MethodSpec.with_overrides
    monkeypatch.setattr(base.MethodSpec, "with_overrides", lambda self, o: calls.append(self.name) or real(self, o))
    for name in ("smoke", "tune_ot", "crd"):
        calls.clear()
        suite = load_suite(Path(__file__).resolve().parent.parent / f"workflow/suites/{name}.yaml")
        assert 0 < len(calls) <= len(suite.runs), name


def test_a_changed_spec_is_rewritten_and_a_hand_edit_refused(tmp_path):
    path = write_suite(tmp_path / "s.yaml", tmp_path / "d")
    suite = load_suite(path)
    write_specs(suite)
    moved = load_suite(write_suite(tmp_path / "s.yaml", tmp_path / "elsewhere"))
    assert set(moved.runs) == set(suite.runs)  # the data root is no part of a run id ...
    assert write_specs(moved) == len(moved.runs)  # ... but is part of what the job reads
    rid = next(iter(suite.runs))
    f = tmp_path / "runs" / rid / JOB_FILE
    assert read_job_record(f)[1].data_root == str(tmp_path / "elsewhere")
    record = json.loads(f.read_text())
    record["spec"]["seed"] = 7
    f.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="hashes to .* not the hash its run id .* ends with"):
        read_job_record(f)
    with pytest.raises(ValueError, match="not found: the planner writes it"):
        read_job_record(tmp_path / "nothing" / JOB_FILE)


# ---- a job reads its spec.json alone ---------------------------------------------------------

JOB_PROBE = """
import runpy, sys
import kdbench.engine.fit as fit_module
seen = {}
def fake_fit(spec, out_dir, device="auto", run_id=None, progress=True):
    seen.update(spec=spec, out_dir=str(out_dir), device=device, run_id=run_id)
    return {"run": run_id, "status": "ok"}
fit_module.fit = fake_fit
from kdbench.commands.cli import main
assert main(sys.argv[1:]) == 0
loaded = sorted(m for m in sys.modules if m.startswith("kdbench.planning.suite") or m in ("yaml", "jsonschema"))
print("RESULT", {"loaded": loaded, "out_dir": seen["out_dir"], "run": seen["run_id"], "device": seen["device"],
                 "seed": seen["spec"].seed})
"""


def test_a_job_reads_its_spec_json_and_never_the_suite(tmp_path, subprocess_env):
    """With the suite file deleted, `kdbench train-teacher --spec` runs its run (fit gets the
    planner's spec, folder and device) without importing kdbench.planning.suite, yaml or jsonschema."""
    path = write_suite(tmp_path / "s.yaml", tmp_path / "d", runs_dir="runs")
    suite = load_suite(path)
    suite.config["runs_dir"] = str(tmp_path / "runs")
    write_specs(suite)
    path.unlink()
    rid = next(r for r, run in suite.runs.items() if run.kind == "train")
    out = subprocess.run([sys.executable, "-c", JOB_PROBE, "train-teacher", "--spec", f"runs/{rid}/{JOB_FILE}"],
                         cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = eval(out.stdout.split("RESULT", 1)[1])
    assert result == {"loaded": [], "out_dir": f"runs/{rid}", "run": rid, "device": "cpu",
                      "seed": suite.runs[rid].spec.seed}


def test_job_arguments_are_refused_with_the_fix(tmp_path, capsys):
    from kdbench.commands.cli import main

    with pytest.raises(SystemExit):
        main(["distill"])
    assert "give --spec runs/<id>/spec.json, or --suite FILE with --run ID" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="spec.json not found: the planner writes it"):
        main(["distill", "--spec", str(tmp_path / "x" / JOB_FILE)])
    path = write_suite(tmp_path / "s.yaml", tmp_path / "d")
    suite = load_suite(path)
    write_specs(suite)
    teacher = next(r for r, run in suite.runs.items() if run.kind == "train")
    with pytest.raises(SystemExit, match=f"run '{teacher}' is a train run; use `kdbench train-teacher`"):
        main(["distill", "--spec", str(tmp_path / "runs" / teacher / JOB_FILE)])


# ---- the road of a suite value ---------------------------------------------------------------

SENTINEL = 2.0000123  # a KD temperature no default has


def trace_files(action) -> set[str]:
    """The kdbench files of the functions called with SENTINEL in an argument, directly or inside
    plain dicts, lists and tuples (a function handed a whole RunSpec does not count; one that
    builds, merges or reads the overrides holding the value does; closures' variables do not)."""
    import kdbench

    root = str(Path(kdbench.__file__).resolve().parent)
    found: set[str] = set()

    def holds(v, depth=0):
        if isinstance(v, float) and v == SENTINEL:
            return True
        if depth > 6:
            return False
        if isinstance(v, dict):
            return any(holds(x, depth + 1) for x in v.values())
        if isinstance(v, (list, tuple)):
            return any(holds(x, depth + 1) for x in v)
        return False

    def tracer(frame, event, arg):
        f = frame.f_code.co_filename
        if event == "call" and f.startswith(root) and f not in found:
            code = frame.f_code
            n = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 4) + bool(code.co_flags & 8)
            if any(holds(frame.f_locals.get(name)) for name in code.co_varnames[:n]):
                found.add(f)
        return None

    sys.settrace(tracer)
    try:
        action()
    finally:
        sys.settrace(None)
    return {os.path.relpath(f, os.path.dirname(root)) for f in found}


#: a suite value's road, measured by trace_files: the planner (reads, checks, merges, writes it) ...
PLANNING_ROAD = {"kdbench/planning/checks.py": "check_file validates term_params",
                 "kdbench/planning/suite.py": "flatten, _method_overrides (the one merge site), write_specs",
                 "kdbench/methods/base.py": "merge_overrides; resolve_method, once per method variant",
                 "kdbench/core/spec.py": "job_record",
                 "kdbench/core/io.py": "atomic_write_json of spec.json"}
#: ... and the job (reads spec.json, builds the loss with it; records it in metrics.json)
JOB_ROAD = {"kdbench/core/spec.py": "read_job_record (from commands/cli.py, which hands on what it returns)",
            "kdbench/engine/run.py": "the run builds its Objective",
            "kdbench/methods/base.py": "resolve_method, Objective", "kdbench/methods/kd.py": "KDLoss(T=...)",
            "kdbench/core/io.py": "metrics.json records the spec"}


def test_a_suite_value_reaches_its_loss_by_the_road_stated_here(tmp_path, monkeypatch):
    """term_params: {kd: {T: ...}} in a suite → the planner → spec.json → the job → the KD loss's
    temperature, through exactly the files stated above: 7 in all, 5 in the job (the seed budget
    is handed only the experiment's name and seeds, not the dict that holds the value). Before
    issue 23 (the same trace): 8 in all, and the job passed 8, planning/suite, checks and budget
    among them, as each job planned its whole suite again."""
    import torch

    from kdbench.commands.cli import main
    from kdbench.data.synthetic_files import ensure_synthetic
    from kdbench.engine import run as engine_run
    from kdbench.engine.checkpoint import save_model
    from kdbench.models import build_model

    torch.manual_seed(0)
    save_model(tmp_path / "t.pt", build_model("resnet8", 5), "resnet8", 5, "cifar100")
    path = write_suite(tmp_path / "s.yaml", tmp_path / "d", term_params={"kd": {"T": SENTINEL}}, recipe={"epochs": 1},
                       experiments=[{"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]],
                                     "methods": ["kd"], "seeds": [0],
                                     "teacher_checkpoints": {"resnet8": str(tmp_path / "t.pt")}}], tables=[])
    ensure_synthetic("cifar100", str(tmp_path / "d"), yaml.safe_load(path.read_text())["datasets"]["cifar100"]["synthetic"])
    temperatures = []
    real = engine_run.Objective

    def objective(*args, **kwargs):
        built = real(*args, **kwargs)
        temperatures.append(built.terms["kd"].T)
        return built

    monkeypatch.setattr(engine_run, "Objective", objective)
    suite = {}
    planning = trace_files(lambda: suite.update(s=load_suite(path)) or write_specs(suite["s"]))
    [rid] = suite["s"].runs
    job = trace_files(lambda: main(["distill", "--spec", str(tmp_path / "runs" / rid / JOB_FILE), "--quiet"]))
    assert temperatures == [SENTINEL]
    assert planning == set(PLANNING_ROAD)
    assert job == set(JOB_ROAD)
    assert len(planning | job) <= 7, sorted(planning | job)
