"""A run folder has one writer, and a restarted run removes what a killed writer left behind."""

import json
import subprocess
import sys
import time

import pytest

from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.engine import run_folder
from kdbench.engine.fit import fit
from kdbench.planning.suite import load_suite

from conftest import second_writer_order, write_suite
from test_engine import strip_times

# Runs `kdbench train-teacher` and SIGKILLs it as the n-th atomic write of `name` is about to be
# renamed into place: the temporary file is complete on disk, the rename never happens.
KILL_AT_WRITE = """
import os, signal, sys
real, name, nth, seen = os.replace, sys.argv[1], int(sys.argv[2]), [0]
def replace(src, dst):
    if os.path.basename(dst) == name:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
from kdbench.commands.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture
def one_run(tmp_path):
    suite_file = write_suite(tmp_path / "s.yaml", tmp_path / "data", recipe={"epochs": 3},
                             experiments=[{"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]],
                                           "methods": ["student"], "seeds": [0]}])
    suite = load_suite(suite_file)
    ensure_synthetic("cifar100", str(tmp_path / "data"), suite.config["datasets"]["cifar100"]["synthetic"])
    (run_id,) = suite.runs
    return suite, suite_file, run_id


@pytest.mark.parametrize("name,nth", [("checkpoint.pt", 2), ("model.pt", 1), ("metrics.json", 1)])
def test_run_killed_during_a_write_restarts_clean_and_identical(one_run, tmp_path, subprocess_env, name, nth):
    suite, suite_file, run_id = one_run
    run_dir = tmp_path / "runs" / run_id
    args = ["train-teacher", "--suite", str(suite_file), "--run", run_id, "--quiet"]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_WRITE, name, str(nth), *args], env=subprocess_env,
                            capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    left = run_folder.stale_temporaries(run_dir)
    assert [p.name.rsplit(".", 1)[0] for p in left] == [f".{name}"], "the kill left no temporary file behind"
    sibling = tmp_path / "runs" / "other-run"  # another run's folder: never touched
    sibling.mkdir()
    (sibling / left[0].name).write_bytes(b"another run's temporary file")
    restarted = subprocess.run([sys.executable, "-m", "kdbench.commands.cli", *args], env=subprocess_env, capture_output=True,
                               text=True)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "removed 1 temporary file" in restarted.stderr
    assert run_folder.stale_temporaries(run_dir) == []
    assert (sibling / left[0].name).exists()
    resumed = json.loads((run_dir / "metrics.json").read_text())
    straight = fit(suite.runs[run_id].spec, tmp_path / "straight", device="cpu", progress=False)
    assert strip_times(resumed) == strip_times(straight)


def test_only_kdbench_temporaries_are_stale(tmp_path):
    names = [".checkpoint.pt.ab12_xyz", ".metrics.json.k3j4h5g6", ".model.pt.00000000", ".diagnostics-kgap.json.abcdefgh",
             "checkpoint.pt", ".checkpoint.pt", ".notes.txt.abcdefgh", ".metrics.json.toolong123", "log.txt"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert [p.name for p in run_folder.stale_temporaries(tmp_path)] == sorted(names[:4])


def test_a_second_writer_waits_for_the_first(tmp_path):
    assert second_writer_order(tmp_path) == ["first done", "second"]


def test_two_processes_starting_one_run_train_it_once(one_run, tmp_path, subprocess_env):
    """Two `kdbench` processes on the same run (two snakemake invocations whose suites share it, or
    --nolock): the second waits for the run folder, finds the run finished and writes nothing."""
    suite_file = write_suite(tmp_path / "long.yaml", tmp_path / "data", recipe={"epochs": 20},
                             experiments=[{"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]],
                                           "methods": ["student"], "seeds": [0]}])
    suite = load_suite(suite_file)
    (run_id,) = suite.runs
    args = [sys.executable, "-m", "kdbench.commands.cli", "train-teacher", "--suite", str(suite_file), "--run", run_id, "--quiet"]
    first = subprocess.Popen(args, env=subprocess_env, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(args, env=subprocess_env, stderr=subprocess.PIPE, text=True)
    err1, err2 = first.communicate(timeout=300)[1], second.communicate(timeout=300)[1]
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    metrics = tmp_path / "runs" / run_id / "metrics.json"
    assert ("already finished" in err1) != ("already finished" in err2), (err1, err2)
    assert "is being written by another process" in err1 + err2
    written = json.loads(metrics.read_text())
    assert strip_times(written) == strip_times(fit(suite.runs[run_id].spec, tmp_path / "straight", device="cpu",
                                                   progress=False))
