"""Two real `snakemake` invocations whose suites share runs (same absolute runs_dir, same run ids):
from two working directories, from one with --nolock, and from one without it (Snakemake's lock
refuses the second). Each shared run is trained by one process, and every run equals the same run
made by one uninterrupted pipeline.

Who trained a run is counted with an audit hook (``sitecustomize`` on PYTHONPATH) that records
every ``.checkpoint.pt.*`` temporary file a process creates: one per epoch trained. The run's
log.txt cannot count it: the second invocation's Snakemake deletes a job's log before it starts
the job (README, "Not protected")."""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, child_env, write_suite
from test_pipeline import RESULTS_COLUMNS

EPOCHS = 3
SUITES = {"a": ["student", "kd"], "b": ["student", "at"]}  # share the teacher (= student seed 0) and student seed 1
# what differs between two processes making the same run: times, the host's provenance, and the
# paths in the spec (the data root and the teacher's model.pt; neither enters the run id)
NOT_COMPARED = {"wall_time_s", "seconds_per_epoch", "epoch_seconds", "provenance"}
PATHS_IN_SPEC = {"data_root", "teacher_ckpts"}

CHECKPOINT_WRITES = """
import os, sys
_record = os.environ.get("KDBENCH_TEST_CHECKPOINT_WRITES")
def _hook(event, args):
    if event == "open" and isinstance(args[0], str) and "/.checkpoint.pt." in args[0]:
        with open(_record, "a") as f:
            f.write(f"{os.getpid()} {os.path.dirname(args[0])}\\n")
    if event == "open" and isinstance(args[0], str) and "/cifar-100-python/" in args[0] and "w" in str(args[1]):
        with open(_record + ".data", "a") as f:
            f.write(f"{os.getpid()} {args[0]}\\n")
if _record:
    sys.addaudithook(_hook)
"""


def suite_file(folder: Path, name: str, runs_dir: Path, data: Path | None = None) -> Path:
    exp = [{"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": SUITES[name],
            "seeds": [0, 1]}]
    folder.mkdir(parents=True, exist_ok=True)
    return write_suite(folder / f"{name}.yaml", data or folder / f"data_{name}", name=name, runs_dir=str(runs_dir),
                       recipe={"epochs": EPOCHS}, experiments=exp)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    (folder / "sitecustomize.py").write_text(CHECKPOINT_WRITES)
    return folder


def start(workdir: Path, suite: Path, probe: Path, record: Path, *extra) -> subprocess.Popen:
    env = child_env()
    env.update(KDBENCH_TEST_CHECKPOINT_WRITES=str(record), PYTHONPATH=f"{probe}{os.pathsep}{env['PYTHONPATH']}")
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none", "-d", str(workdir),
                             "--cores", "2", "--config", f"suite_file={suite}", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out = proc.communicate(timeout=600)[0]
    return proc.returncode, out


def writers(record: Path, runs_dir: Path) -> dict[str, Counter]:
    """run id -> {process id: checkpoints it wrote}."""
    found: dict[str, Counter] = {}
    for line in record.read_text().splitlines():
        pid, folder = line.split(" ", 1)
        found.setdefault(str(Path(folder).relative_to(runs_dir)), Counter())[pid] += 1
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, probe):
    """Suite a, then suite b, each by one uninterrupted pipeline (the reference)."""
    base = tmp_path_factory.mktemp("straight")
    record = base / "writes.txt"
    for name in SUITES:
        rc, out = finish(start(base / name, suite_file(base / name, name, base / "runs"), probe, record))
        assert rc == 0, out[-3000:]
    return base


def assert_same_runs(got: Path, want: Path):
    """Every metrics.json (but its times and paths) and every model.pt is the reference's."""
    metrics = sorted(p.relative_to(want) for p in want.glob("cifar100/**/metrics.json"))
    assert sorted(p.relative_to(got) for p in got.glob("cifar100/**/metrics.json")) == metrics
    for rel in metrics:
        a, b = (json.loads((root / rel).read_text()) for root in (got, want))
        for m in (a, b):
            for k in NOT_COMPARED:
                m.pop(k)
            for k in PATHS_IN_SPEC:
                m["spec"].pop(k)
        assert a == b, rel
        assert (got / rel.parent / "model.pt").read_bytes() == (want / rel.parent / "model.pt").read_bytes(), rel


def assert_same_tables(got: Path, want: Path, name: str):
    runs, ref = (pd.read_csv(d / f"results/{name}/runs.csv") for d in (got, want))
    assert set(runs.status) == {"ok"}
    pd.testing.assert_frame_equal(runs[RESULTS_COLUMNS], ref[RESULTS_COLUMNS])
    assert (got / f"results/{name}/main.md").read_text() == (want / f"results/{name}/main.md").read_text()


def assert_trained_once(got: Path, ref: Path):
    """Each run's checkpoints were written by one process, as many as in the reference."""
    trained, reference = writers(got / "writes.txt", got / "runs"), writers(ref / "writes.txt", ref / "runs")
    assert set(trained) == set(reference) and len(reference) == 6
    for run, by_pid in trained.items():
        assert len(by_pid) == 1 and sum(by_pid.values()) == sum(reference[run].values()) == EPOCHS, (run, by_pid)


def test_two_working_directories_share_a_teacher(tmp_path, probe, uninterrupted):
    """Case 1: crd and ot style, two directories, one absolute runs_dir, started together. The
    second Snakemake does not know the first makes the teacher; its job waits for the run folder and
    finds the run finished (or, when its Snakemake removed the finished metrics.json before the job,
    rewrites it from the complete checkpoint without training)."""
    procs = {n: start(tmp_path / n, suite_file(tmp_path / n, n, tmp_path / "runs"), probe, tmp_path / "writes.txt")
             for n in SUITES}
    for name, proc in procs.items():
        rc, out = finish(proc)
        assert rc == 0, out[-3000:]
    assert_trained_once(tmp_path, uninterrupted)
    assert_same_runs(tmp_path / "runs", uninterrupted / "runs")
    for name in SUITES:
        assert_same_tables(tmp_path / name, uninterrupted / name, name)


def test_one_working_directory_with_nolock(tmp_path, probe, uninterrupted):
    """Case 2: both suites from one directory with --nolock, sharing their synthetic data root too
    (the second's data job, if Snakemake runs it, restores the marker and rewrites no data file);
    the results of each suite land in results/<suite>."""
    procs = {n: start(tmp_path, suite_file(tmp_path, n, tmp_path / "runs", tmp_path / "data"), probe,
                      tmp_path / "writes.txt", "--nolock") for n in SUITES}
    for name, proc in procs.items():
        rc, out = finish(proc)
        assert rc == 0, out[-3000:]
    data_writes = Counter((tmp_path / "writes.txt.data").read_text().splitlines())
    assert len(data_writes) == 3 and set(data_writes.values()) == {1}, data_writes  # train, test, meta: once
    assert_trained_once(tmp_path, uninterrupted)
    assert_same_runs(tmp_path / "runs", uninterrupted / "runs")
    for name in SUITES:
        assert_same_tables(tmp_path, uninterrupted / name, name)


def test_one_working_directory_without_nolock_refuses_the_second(tmp_path, probe, uninterrupted):
    """Case 3: Snakemake's lock refuses the second invocation while the first runs, saying why;
    the first is unharmed, and the second, started again after it, trains only its own runs."""
    record = tmp_path / "writes.txt"
    first = start(tmp_path, suite_file(tmp_path, "a", tmp_path / "runs"), probe, record)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / ".snakemake/locks").glob("*")):
        time.sleep(0.05)
    rc, out = finish(start(tmp_path, suite_file(tmp_path, "b", tmp_path / "runs"), probe, record))
    assert first.poll() is None, "the first invocation ended before the second started"
    assert rc != 0 and "LockException" in out and "Directory cannot be locked" in out, out[-3000:]
    rc, out = finish(first)
    assert rc == 0, out[-3000:]
    assert_same_tables(tmp_path, uninterrupted / "a", "a")
    rc, out = finish(start(tmp_path, tmp_path / "b.yaml", probe, record))
    assert rc == 0, out[-3000:]
    # b's own data job makes its Snakemake rerun the two shared runs: it removes their metrics.json
    # and log.txt, and each job writes them again from the complete checkpoint, saying so
    for log in (tmp_path / "runs/cifar100/scratch/resnet8").glob("*/log.txt"):
        text = log.read_text()
        assert "is complete in" in text and "without training" in text and " main 1/" not in text, text
    assert_trained_once(tmp_path, uninterrupted)
    assert_same_runs(tmp_path / "runs", uninterrupted / "runs")
    assert_same_tables(tmp_path, uninterrupted / "b", "b")
