"""Kill anywhere, resume to the same result, bit for bit (CPU).

Each case trains a run in a forked child that SIGKILLs itself at one point — the teacher just
loaded, a step in the middle of an epoch (inside the initialisation stage for AB/FT/FSP), right
after a checkpoint, while a checkpoint, model.pt or metrics.json is being written (the temporary
file complete, the rename not done), right after model.pt is moved — then trains it again in this
process, which resumes from whatever the kill left. Every per-epoch value of the resumed
metrics.json and every tensor of its model.pt must equal an uninterrupted run's. The methods are
those that carry state across steps and epochs: CRD (memory banks, negatives), KDA (previous-epoch
centroids), DKD (warm-up), AB/FT/FSP (initialisation stages), and packs of runs (plain and fused).
"""

import multiprocessing
import os
import signal

import pytest
import torch

from kdbench.engine import optim
from kdbench.engine import run as run_module
from kdbench.engine.pack import fit_packed
from kdbench.core.spec import Recipe, RunSpec
from kdbench.engine.fit import fit

RECIPE = Recipe.from_config({"epochs": 3, "batch_size": 16})
METHODS = {
    "crd": {"params": {"crd": {"nce_k": 64}}},
    "kda_before": {"params": {"kda": {"warmup_epochs": 1}}},
    "dkd": {"params": {"dkd": {"warmup": 2}}},
    "ab": {"params": {"ab": {"init_epochs": 2}}},
    "ft": {"params": {"ft": {"init_epochs": 2}}},
    "fsp": {"params": {"fsp": {"init_epochs": 2}}},
}
# point -> (what to patch, which call kills); "before" kills as the n-th write of a file is about
# to be renamed into place, "after" right after the rename
POINTS = {
    "teacher_loaded": ("teacher", 1),
    "mid_epoch": ("step", 5),
    "after_checkpoint": ("after:checkpoint.pt", 1),
    "writing_checkpoint": ("before:checkpoint.pt", 2),
    "writing_model": ("before:model.pt", 1),
    "after_model": ("after:model.pt", 1),
    "writing_metrics": ("before:metrics.json", 1),
}
TIMES = {"wall_time_s", "seconds_per_epoch", "epoch_seconds", "provenance", "run", "seconds"}


def spec(tiny, method, seed=0):
    return RunSpec("cifar100", str(tiny / "data"), "resnet8", method, seed, "resnet8", (str(tiny / "t.pt"),),
                   method_overrides=METHODS.get(method, {}), recipe=RECIPE)


def _kill_at(point):
    what, nth = POINTS[point]
    seen = [0]

    def hit():
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    if what == "teacher":
        load = run_module.load_teacher
        run_module.load_teacher = lambda *a, **k: (load(*a, **k), hit())[0]
    elif what == "step":
        step = optim.SGD.step
        optim.SGD.step = lambda self, *a, **k: (hit(), step(self, *a, **k))[1]
    else:
        when, name = what.split(":")
        replace = os.replace

        def patched(src, dst):
            if os.path.basename(dst) != name:
                return replace(src, dst)
            if when == "before":
                hit()
            replace(src, dst)
            if when == "after":
                hit()

        os.replace = patched


def _child(point, train):
    torch.set_num_threads(1)
    _kill_at(point)
    train()
    os._exit(0)  # not killed: the point was never reached


def killed_then_resumed(point, train):
    child = multiprocessing.get_context("fork").Process(target=_child, args=(point, train))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, f"the run was not killed at {point} (exit code {child.exitcode})"
    return train()


def comparable(metrics):
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in TIMES}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(metrics)


def assert_same_run(a_dir, b_dir, a_metrics, b_metrics):
    assert comparable(a_metrics) == comparable(b_metrics)
    a = torch.load(a_dir / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(b_dir / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """Uninterrupted runs, one per method, trained once for the module."""
    root, done = tmp_path_factory.mktemp("straight"), {}

    def get(method):
        if method not in done:
            done[method] = fit(spec(tiny, method), root / method, device="cpu", progress=False)
        return root / method, done[method]
    return get


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("method", METHODS)
def test_killed_run_resumes_bit_for_bit(tiny, tmp_path, straight, method, point):
    out = tmp_path / "run"
    resumed = killed_then_resumed(point, lambda: fit(spec(tiny, method), out, device="cpu", progress=False))
    assert_same_run(out, *straight(method)[:1], resumed, straight(method)[1])


@pytest.mark.parametrize("point", ["mid_epoch", "writing_checkpoint", "writing_metrics"])
@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_killed_pack_resumes_bit_for_bit(tiny, tmp_path, point, fuse):
    specs = [spec(tiny, "kd", 0), spec(tiny, "kd", 1), spec(tiny, "crd", 0)]
    dirs = [tmp_path / f"run{k}" for k in range(len(specs))]
    resumed = killed_then_resumed(point, lambda: fit_packed(specs, dirs, "cpu", fuse=fuse))
    ref_dirs = [tmp_path / f"ref{k}" for k in range(len(specs))]
    reference = fit_packed(specs, ref_dirs, "cpu", fuse=fuse)
    for k in range(len(specs)):
        assert_same_run(dirs[k], ref_dirs[k], resumed[k], reference[k])


def test_killed_ddp_run_resumes_bit_for_bit(tmp_path, subprocess_env):
    """Two gloo processes (torchrun through kdbench's launcher) killed together right after a
    checkpoint, restarted, end with the metrics and weights of an uninterrupted DDP run."""
    import json
    import subprocess
    import sys
    import time

    import yaml

    from kdbench.data.synthetic_files import ensure_synthetic
    from kdbench.planning.suite import load_suite

    synthetic = {"classes": 4, "train_per_class": 9, "test_per_class": 5, "seed": 0}
    ensure_synthetic("cifar100", str(tmp_path / "data"), synthetic)

    def suite(runs):
        cfg = {"name": "ddp", "device": "cpu", "threads": 1, "runs_dir": str(tmp_path / runs),
               "datasets": {"cifar100": {"root": str(tmp_path / "data"), "synthetic": synthetic}},
               "recipe": {"epochs": 12, "batch_size": 8, "test_batch_size": 7},
               "experiments": [{"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]],
                                "methods": ["student"], "seeds": [0]}]}
        (tmp_path / f"{runs}.yaml").write_text(yaml.safe_dump(cfg))
        return load_suite(tmp_path / f"{runs}.yaml")

    def command(s):
        (run_id,) = s.runs
        return run_id, [sys.executable, "-m", "kdbench.planning.launch", "--gpus", "0", "--nproc", "2", "--",
                        "train-teacher", "--suite", str(s.path), "--run", run_id, "--quiet"]

    killed = suite("killed")
    run_id, cmd = command(killed)
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt, deadline = tmp_path / "killed" / run_id / "checkpoint.pt", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["state"]["epoch"] >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / run_id / "metrics.json").exists(), "the run finished before it was killed"
    for s in (killed, suite("straight")):
        done = subprocess.run(command(s)[1], env=subprocess_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / run_id / "metrics.json").read_text()) for d in ("killed", "straight"))
    assert_same_run(tmp_path / "killed" / run_id, tmp_path / "straight" / run_id, a, b)
