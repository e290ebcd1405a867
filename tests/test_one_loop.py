"""One loop for every kind of run (issue 23): ``kdbench.engine.run.loop`` is the only sequence of a
run's stages, epochs and steps; plain runs execute on ``Eager``; a linear probe is a run like any
other, inside its run folder's lock."""

import ast
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kdbench.core.spec import Execution, PROBE_RECIPE, Recipe, RunSpec
from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.engine import run_folder
from kdbench.engine.checkpoint import save_model
from kdbench.engine.fast import FAST_OPTIONS, Runtime, execution_for
from kdbench.engine.fit import fit, prepared
from kdbench.engine.linear_probe import ProbeRun
from kdbench.engine.step import Eager
from kdbench.models import build_model

PACKAGE = Path(__file__).resolve().parents[1] / "kdbench"
#: the loop's phases, in the order it calls them (kdbench/engine/run.py's loop; not ``batches``, a name the
#: loaders share)
PHASES = ("stages_left", "epochs_left", "start_epoch", "end_epoch", "end_stage", "finish")


def phase_calls() -> dict[str, list[str]]:
    """Each phase method -> the functions in kdbench that call it (``module:function``)."""
    calls: dict[str, list[str]] = {p: [] for p in PHASES}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls:
                    calls[node.func.attr].append(f"{path.relative_to(PACKAGE.parent)}:{fn.name}")
    return calls


def test_the_stage_epoch_step_sequence_exists_once():
    """No second copy of the loop: only ``loop`` calls the phases of a run (``finish`` also ends a
    run that cannot train, in ``loop`` only too)."""
    calls = phase_calls()
    for phase in PHASES:
        assert set(calls[phase]) == {"kdbench/engine/run.py:loop"}, (phase, calls[phase])


def test_the_phase_scan_sees_a_second_loop(tmp_path, monkeypatch):
    """The scan above is not vacuous: a copy of the loop anywhere in the package is found."""
    copy = tmp_path / "kdbench"
    (copy / "engine").mkdir(parents=True)
    (copy / "engine" / "run.py").write_text((PACKAGE / "engine" / "run.py").read_text())
    (copy / "engine" / "other.py").write_text("def again(run):\n    for s in run.stages_left():\n        pass\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    assert set(phase_calls()["stages_left"]) == {"kdbench/engine/run.py:loop", "kdbench/engine/other.py:again"}


def test_plain_options_run_on_eager_and_any_fast_option_on_the_runtime():
    assert type(execution_for(Execution(), "cpu")) is Eager
    fast = {"precision": "bf16", "channels_last": True, "compile": "compile", "teacher_cache": "fp16"}
    assert set(fast) == set(FAST_OPTIONS)
    for option, value in fast.items():
        ex = execution_for(Execution(**{option: value}), "cpu")
        assert isinstance(ex, Runtime) and getattr(ex.execution, option) == value, option
    assert type(execution_for(Execution(cache_dir="/tmp/x"), "cpu")) is Eager  # a cache folder without a cache


def test_a_plain_run_trains_on_eager(tiny, tmp_path):
    spec = RunSpec("cifar100", str(tiny / "data"), "resnet8", "kd", 0, "resnet8", (str(tiny / "t.pt"),),
                   recipe=Recipe.from_config({"epochs": 1, "batch_size": 16}))
    with prepared(spec, tmp_path / "run", "cpu", progress=False) as run:
        assert type(run.execution) is Eager
    with prepared(RunSpec(**{**spec.__dict__, "execution": Execution(channels_last=True)}), tmp_path / "fast", "cpu",
                  progress=False) as run:
        assert type(run.execution) is Runtime


@pytest.fixture
def probe(tmp_path):
    torch.manual_seed(0)
    save_model(tmp_path / "student.pt", build_model("resnet8", 5), "resnet8", 5, "cifar100")
    ensure_synthetic("cifar10", str(tmp_path / "c10"), {"classes": 3, "train_per_class": 8, "test_per_class": 4,
                                                        "seed": 1})
    recipe = Recipe.from_config({**PROBE_RECIPE, "epochs": 2, "milestones": [1], "batch_size": 8})
    return RunSpec("cifar10", str(tmp_path / "c10"), "resnet8", "kd", 0, recipe=recipe, protocol="linear_probe",
                   init_ckpt=str(tmp_path / "student.pt"), init_id="cifar100/x/kd/seed0")


def test_a_probe_waits_for_its_folder_like_any_run(probe, tmp_path, capsys):
    """One writer per run covers probes: a probe whose folder another writer holds waits for it, and
    a probe that another process finished meanwhile is not trained again."""
    out = tmp_path / "probe"
    with prepared(probe, out, "cpu", progress=False) as run:
        assert isinstance(run, ProbeRun) and type(run.execution) is Eager
    result = {}
    with run_folder.claim(out):  # another writer holds the folder
        t = threading.Thread(target=lambda: result.update(m=fit(probe, out, "cpu", progress=False)))
        t.start()
        time.sleep(1.0)
        assert t.is_alive() and not (out / "metrics.json").exists()  # waiting, nothing written
    t.join(60)
    assert result["m"]["status"] == "ok" and len(result["m"]["curve"]) == 2
    assert "is being written by another process; waiting" in capsys.readouterr().err
    model_time = (out / "model.pt").stat().st_mtime_ns
    again = fit(probe, out, "cpu", progress=False)
    assert again["curve"] == result["m"]["curve"] and (out / "model.pt").stat().st_mtime_ns == model_time
    assert "is already finished" in capsys.readouterr().err


def test_a_probe_of_a_failed_model_is_a_failed_run(probe, tmp_path):
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"status": "failed", "failure": "non-finite loss", "run": "r1"}))
    failed = fit(RunSpec(**{**probe.__dict__, "init_ckpt": str(folder / "model.pt")}), tmp_path / "p", "cpu",
                 progress=False)
    assert failed["status"] == "failed" and failed["failure"] == "probed model r1 failed: non-finite loss"
