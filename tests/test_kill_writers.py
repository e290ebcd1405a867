"""kill -9 at every write of export, fetch-teachers, import-teacher and looks (as test_kill_matrix
does for training): the previous good file stays, and the next start leaves no temporary file.

Each case runs the command once to have a good file, then again in a forked child that SIGKILLs
itself as one of the files is about to be renamed into place (the temporary complete), then
starts the command again in this process.
"""

import json
import multiprocessing
import os
import re
import signal

import pytest
import torch

from conftest import write_suite
from kdbench.commands import looks
from kdbench.commands.teachers import fetch_teachers_main, import_teacher_main
from kdbench.commands.export import export_run
from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.engine.checkpoint import save_model
from kdbench.models import build_model
from kdbench.planning.suite import load_suite
from kdbench.teachers import imported, released
from test_import_teacher import repdistiller_ckpt
from test_looks import budget_suite, write_results
from test_released_teachers import SYNTH, accuracy, suite_file

TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}$")


def temporaries(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.is_file() and TEMPORARY.match(p.name))


def _child(name, work):
    real = os.replace

    def killing(src, dst):
        if os.path.basename(dst) == name:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.replace = killing
    torch.set_num_threads(1)
    work()
    os._exit(0)


def killed_writing(name, work):
    child = multiprocessing.get_context("fork").Process(target=_child, args=(name, work))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, f"not killed while writing {name} (exit code {child.exitcode})"


def snapshot(files):
    return {f: f.read_bytes() if f.exists() else None for f in files}


def check(tmp_path, files, name, work, again):
    """``work`` killed while writing ``name``: that file as it was (the files a command wrote
    before it are whole: they were renamed into place), one temporary; ``again`` (the next start)
    succeeds and leaves no temporary."""
    target = next(f for f in files if f.name == name)
    before = snapshot([target])
    killed_writing(name, work)
    assert snapshot([target]) == before, f"a kill while writing {name} changed the previous file"
    assert len(temporaries(tmp_path)) == 1, temporaries(tmp_path)
    again()
    assert temporaries(tmp_path) == []


@pytest.fixture
def finished_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    save_model(run_dir / "model.pt", build_model("resnet8", 5), "resnet8", 5, "cifar100")
    (run_dir / "metrics.json").write_text(json.dumps({"status": "ok", "epochs_done": 240, "acc_last": 73.5}))
    return run_dir


def test_export(tmp_path, finished_run):
    out = tmp_path / "out" / "ckpt_epoch_240.pth"
    export_run(finished_run, out)
    (finished_run / "metrics.json").write_text(json.dumps({"status": "ok", "epochs_done": 240, "acc_last": 80.0}))
    check(tmp_path, [out], out.name, lambda: export_run(finished_run, out), lambda: export_run(finished_run, out))
    assert torch.load(out, weights_only=True)["accuracy"] == 80.0


def test_import_teacher(tmp_path):
    torch.manual_seed(0)
    a = repdistiller_ckpt(tmp_path / "a/resnet8_vanilla/ckpt_epoch_240.pth", build_model("resnet8", 100))
    b = repdistiller_ckpt(tmp_path / "b/resnet8_vanilla/ckpt_epoch_240.pth", build_model("resnet8", 100))
    out = tmp_path / "teachers" / "t.pt"
    assert import_teacher_main([str(a), str(out)]) == 0
    check(tmp_path, [out], "t.pt", lambda: import_teacher_main([str(b), str(out)]),
          lambda: import_teacher_main([str(b), str(out)]))


@pytest.fixture
def release(tmp_path, monkeypatch):
    rt = released._repdistiller("resnet8")
    monkeypatch.setitem(released.RELEASED, ("cifar100", "resnet8"), rt)
    ensure_synthetic("cifar100", str(tmp_path / "data"), SYNTH)
    torch.manual_seed(7)
    model = build_model("resnet8", 5)
    raw = repdistiller_ckpt(tmp_path / "upstream/resnet8_vanilla/ckpt_epoch_240.pth", model)
    monkeypatch.setitem(imported.PUBLISHED_TOP1, ("cifar100", "resnet8"), accuracy(model, tmp_path / "data"))

    def fake_download(url, dest, timeout=60):  # the network, through the real atomic writer
        with open(raw, "rb") as src:
            released._write_whole(dest, src)
    monkeypatch.setattr(released, "download", fake_download)
    path = suite_file(tmp_path)
    teachers = tmp_path / "teachers"
    return lambda: fetch_teachers_main(["--suite", str(path), "--dir", str(teachers), "--device", "cpu"])


@pytest.mark.parametrize("name", ["ckpt_epoch_240.pth", "model.pt", "metrics.json"])
def test_fetch_teachers(tmp_path, release, name):
    if name != "ckpt_epoch_240.pth":
        assert release() == 0  # the raw file is then already there: the import run's files are rewritten
    suite = load_suite(tmp_path / "s.yaml")
    run_dir = next(suite.run_dir(r) for r, run in suite.runs.items() if run.kind == "import")
    files = [tmp_path / "teachers/repdistiller/resnet8_vanilla/ckpt_epoch_240.pth",
             tmp_path / run_dir / "model.pt", tmp_path / run_dir / "metrics.json"]
    check(tmp_path, files, name, release, lambda: release() == 0 or pytest.fail("fetch-teachers failed"))
    assert all(f.is_file() for f in files)


@pytest.mark.parametrize("name", ["budget.json", "budget.md"])
def test_looks(tmp_path, name):
    path = budget_suite(tmp_path)
    write_results(load_suite(path))
    looks.next_look(load_suite(path))  # look 1: the good state
    write_results(load_suite(path))  # the added seeds' runs
    state = tmp_path / "runs/looks/budget.json"
    files = [state, state.with_suffix(".md")]

    def again():
        assert looks.main(["--suite", str(path), "--next"]) == 0
    check(tmp_path, files, name, lambda: looks.next_look(load_suite(path)), again)
    assert looks.read_state(load_suite(path).config)["main"]["done"]
