"""Run unmodified RepDistiller on a suite's synthetic files and record the reference numbers.

    python benchmarks/repdistiller_reference.py --repdistiller /tmp/repdistiller \\
        [--suite workflow/suites/smoke.yaml] [--experiment main] [--workdir /tmp/repdistiller-runs] [--jobs 2] [--runs 10]

writes ``kdbench/reference/repdistiller_<suite>.csv`` (one row per run: method, run index, last-
and best-epoch top-1) and ``repdistiller_<suite>.json`` (provenance: RepDistiller's commit, the
SHA-256 of every data file, the synthetic parameters, recipe, command lines, CPU, torch version).
The suite's ``main`` table prints kdbench-vs-RepDistiller verdicts against them
(:mod:`kdbench.report.reference`); docs/default_reference.md says how the reference was made.

RepDistiller's files are never edited or copied: each run is a fresh process that imports the
checkout and runs ``train_teacher.py`` / ``train_student.py`` as ``__main__`` with these run-time
adaptations, all outside its code:

* its CIFAR-100 loader reads ``./data/cifar-100-python`` (``get_data_folder`` on an unknown host):
  the run folder's ``data`` links to kdbench's synthetic files, and torchvision's MD5 checks of the
  official archive (``CIFAR100._check_integrity`` and ``check_integrity`` of the meta file) pass;
* kdbench writes the pickles' keys as bytes (``b"data"``: what the official files give under
  ``encoding="bytes"``, kdbench's reader); torchvision reads them under ``encoding="latin1"`` and
  expects str keys: its ``pickle.load`` gets the keys decoded;
* ``n_cls = 100`` is fixed in both scripts, kdbench's head has one output per class in the files:
  the model constructors are given the files' class count instead;
* ``tensorboard_logger`` (not installed here, logging only) is a no-op module;
* RepDistiller has no seed option: the harness seeds ``random``, NumPy and torch with the run index
  before the script starts, so its runs are repeated runs (n runs with their sd), not paired with
  kdbench's seeds (different initialisations and data orders);
* torch ≥ 2.6 loads ``weights_only`` by default, and the teacher checkpoint (written by the same
  harness run) holds a NumPy scalar: ``torch.load`` gets ``weights_only=False``;
* one CPU thread and ``--num_workers 0``;
* the suite's ``test_every`` (kdbench evaluates after every n-th epoch and the last): its
  ``helper.loops.validate`` runs on those epochs only (and on the teacher, first, in
  ``train_student.py``), and returns -1 on the others — the script uses the value only for its
  best-checkpoint and log, never for training, so the runs train as before and ``acc_last`` is the
  last epoch's; ``acc_best`` is the best tested epoch, as kdbench's.

**One teacher for both.** RepDistiller's distilled students learn from *kdbench's* teacher: the
harness trains the suite's teacher run with kdbench itself (``kdbench train-teacher --spec``, the
pipeline's job, in ``<workdir>/runs``) and hands its weights to ``train_student.py --path_t`` as a
RepDistiller checkpoint (``{"model": state_dict}`` in ``<arch>_kdbench/``, the folder name its
``get_teacher_name`` parses). A KD row then compares the two implementations' *distillation* from
the same model; with a teacher of each, a KD Δ would also hold the two teachers' difference (one
run each, about a seed spread apart). RepDistiller's own teacher is still trained (``--teacher
own`` distils from it instead), for the teacher row. ``train_student.py`` validates the teacher it
loaded before training: that accuracy must equal kdbench's own evaluation of the same file (±0.05)
or the harness stops (the weights or the evaluation would differ); both are recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdbench.data.synthetic_files import ensure_synthetic  # noqa: E402
from kdbench.planning.suite import load_suite, write_specs  # noqa: E402

#: kdbench method -> RepDistiller train_student.py arguments (its scripts/run_cifar_distill.sh).
DISTILL_ARGS = {"kd": ["--distill", "kd", "-r", "0.1", "-a", "0.9", "-b", "0"],
                "at": ["--distill", "attention", "-r", "1", "-a", "0", "-b", "1000"]}
ACC = re.compile(r"^ \* Acc@1 ([0-9.]+) Acc@5 ([0-9.]+)")
EPOCH = re.compile(r"^Epoch: \[(\d+)\]", re.M)

# Run inside the child process: adapt the environment (never RepDistiller's files), then run the script.
BOOT = r"""
import os, random, runpy, sys, types
checkout, script, seed, classes, tested = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tested = {int(e) for e in tested.split(",")}  # the epochs kdbench tests after (Recipe.tests_after)
sys.argv = [script] + sys.argv[6:]
sys.path.insert(0, checkout)
import numpy as np, torch, torchvision.datasets as tvd, torchvision.datasets.cifar as tvc
torch.set_num_threads(1)
random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
class _Logger:
    def __init__(self, *a, **k): pass
    def log_value(self, *a, **k): pass
sys.modules["tensorboard_logger"] = types.SimpleNamespace(Logger=_Logger)
tvd.CIFAR100._check_integrity = lambda self: True
_load = torch.load
torch.load = lambda *a, **k: _load(*a, **{"weights_only": False, **k})
tvc.check_integrity = lambda *a, **k: True
class _StrKeys:  # kdbench's pickles have bytes keys (the official ones read so under encoding="bytes")
    def load(self, f, **kw):
        d = __import__("pickle").load(f, **kw)
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
tvc.pickle = _StrKeys()
import models
for name, build in list(models.model_dict.items()):
    models.model_dict[name] = (lambda b: lambda num_classes=100, **kw: b(num_classes=classes, **kw))(build)
import helper.loops as loops
_validate, calls = loops.validate, [0]
first = 1 if script == "train_student.py" else 0  # train_student.py validates its teacher first
def validate(*a, **k):  # kdbench's test_every: the same test passes; training never reads them
    epoch = calls[0] + 1 - first
    calls[0] += 1
    if epoch < 1 or epoch in tested:
        return _validate(*a, **k)
    return -1.0, -1.0, float("inf")
loops.validate = validate
runpy.run_path(os.path.join(checkout, script), run_name="__main__")
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_checksums(root: str | Path) -> dict[str, str]:
    """{file: sha256} of the CIFAR-100 files under ``root`` (what both implementations read)."""
    base = Path(root) / "cifar-100-python"
    return {f"cifar-100-python/{n}": sha256(base / n) for n in ("train", "test", "meta")}


def recipe_args(recipe, arch: str) -> list[str]:
    """RepDistiller's options for kdbench's ``recipe`` (its lr for ``arch``: both use 0.01 for the same
    small archs); the last four are execution only (workers, checkpoint frequency)."""
    return ["--epochs", str(recipe.epochs), "--learning_rate", str(recipe.base_lr(arch)),
            "--lr_decay_epochs", ",".join(str(m) for m in recipe.milestones), "--lr_decay_rate", str(recipe.lr_decay),
            "--weight_decay", str(recipe.weight_decay), "--momentum", str(recipe.momentum),
            "--batch_size", str(recipe.batch_size), "--num_workers", "0", "--save_freq", str(recipe.epochs)]


def test_accuracies(log: str) -> list[float]:
    """Top-1 of every validation in a RepDistiller log, in order. Its training loop and ``validate``
    both end with `` * Acc@1 ..``; a validation's follows its ``Test: [0/..]`` line (printed for
    batch 0 whatever the print frequency), a training epoch's its ``Epoch: [..]`` lines."""
    accs, in_test = [], False
    for line in log.splitlines():
        if line.startswith("Test: ["):
            in_test = True
        elif line.startswith("Epoch: ["):
            in_test = False
        elif (m := ACC.match(line)) and in_test:
            accs.append(float(m.group(1)))
            in_test = False
    return accs


def run_script(checkout: Path, folder: Path, script: str, seed: int, classes: int, data_root: Path,
               args: list[str], recipe) -> dict:
    """One RepDistiller run in ``folder`` (its ./data links to ``data_root``): accuracy after each epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "data"
    if not link.exists():
        link.symlink_to(Path(data_root).resolve())
    tested = ",".join(str(e) for e in range(1, recipe.epochs + 1) if recipe.tests_after(e))
    cmd = [sys.executable, "-c", BOOT, str(checkout), script, str(seed), str(classes), tested, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.time()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    (folder / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{script} {' '.join(args)} failed (rc {proc.returncode}); see {folder / 'log.txt'}:\n"
                           + proc.stderr[-2000:])
    accs = test_accuracies(proc.stdout)
    trained = max((int(m.group(1)) for m in EPOCH.finditer(proc.stdout)), default=0)
    return {"accs": accs, "epochs": trained, "wall_s": round(time.time() - start, 1),
            "command": " ".join([script, *args]) + f"  (seed {seed})"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repdistiller", required=True, type=Path, help="a checkout of HobbitLong/RepDistiller")
    ap.add_argument("--commit", help="its commit (default: git rev-parse HEAD in the checkout)")
    ap.add_argument("--suite", default=str(ROOT / "workflow/suites/smoke.yaml"))
    ap.add_argument("--experiment", default="main")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/repdistiller-runs"))
    ap.add_argument("--out", type=Path, help="CSV to write (default kdbench/reference/repdistiller_<suite>.csv)")
    ap.add_argument("--teacher", choices=("kdbench", "own"), default="kdbench",
                    help="the teacher RepDistiller's students distil from: kdbench's (default: the same model on both "
                         "sides) or the one RepDistiller trains")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each a process on one thread)")
    ap.add_argument("--runs", type=int, help="runs per method (default: the experiment's seed count); more runs "
                                             "narrow the reference's side of every Δ")
    a = ap.parse_args(argv)
    checkout = a.repdistiller.resolve()
    for script in ("train_teacher.py", "train_student.py"):
        if not (checkout / script).is_file():
            raise SystemExit(f"{checkout} is no RepDistiller checkout: {script} missing")
    commit = a.commit or subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                        text=True).stdout.strip()
    if not commit:
        raise SystemExit(f"{checkout}: not a git checkout; give its commit with --commit")

    suite = load_suite(a.suite)
    cells = [c for c in suite.cells if c.experiment == a.experiment]
    if not cells:
        raise SystemExit(f"experiment {a.experiment!r} not in {a.suite}; valid: {', '.join(suite.experiment_runs)}")
    ds = cells[0].dataset
    params = suite.config["datasets"][ds]["synthetic"]
    a.workdir.mkdir(parents=True, exist_ok=True)
    data_root = (a.workdir / suite.config["datasets"][ds]["root"]).resolve()  # holds cifar-100-python/
    ensure_synthetic(ds, str(data_root), params)
    classes = params.get("classes", 10)
    student_cells = [c for c in cells if c.column != "teacher"]
    methods = list(dict.fromkeys(c.column for c in student_cells))
    unknown = [m for m in methods if m != "student" and m not in DISTILL_ARGS]
    if unknown:
        raise SystemExit(f"no RepDistiller arguments for {unknown}; known: student, {', '.join(DISTILL_ARGS)}")
    spec_of = {c.run: suite.runs[c.run].spec for c in cells}
    teacher_cell = next(c for c in cells if c.column == "teacher")
    t_spec = spec_of[teacher_cell.run]
    s_spec = spec_of[student_cells[0].run]
    seeds = sorted({c.seed for c in student_cells})
    if a.runs is not None:  # repeated runs, seeded 0..runs-1: not paired with kdbench's seeds anyway
        if a.runs < len(seeds):
            raise SystemExit(f"--runs {a.runs}: fewer than the experiment's {len(seeds)} seeds")
        seeds = list(range(a.runs))

    def teacher_run():
        return run_script(checkout, a.workdir / "teacher", "train_teacher.py", teacher_cell.seed, classes, data_root,
                          ["--model", teacher_cell.teacher, "--trial", str(teacher_cell.seed),
                           *recipe_args(t_spec.recipe, teacher_cell.teacher)], t_spec.recipe)

    def student_run(method, seed, t_ckpt, shared):
        folder = a.workdir / f"{method}-{seed}"
        base = recipe_args(s_spec.recipe, teacher_cell.student)
        if method == "student":
            return run_script(checkout, folder, "train_teacher.py", seed, classes, data_root,
                              ["--model", teacher_cell.student, "--trial", str(seed), *base], s_spec.recipe)
        r = run_script(checkout, folder, "train_student.py", seed, classes, data_root,
                       ["--path_t", str(t_ckpt), "--model_s", teacher_cell.student, *DISTILL_ARGS[method],
                        "--trial", str(seed), *base], s_spec.recipe)
        r["teacher_acc"], r["accs"] = r["accs"][0], r["accs"][1:]  # the first validation is the teacher's
        if shared and abs(r["teacher_acc"] - shared["acc"]) > 0.05:
            raise SystemExit(f"RepDistiller evaluates kdbench's teacher at {r['teacher_acc']}, kdbench at {shared['acc']}: "
                             f"the weights or the evaluation differ ({folder / 'log.txt'})")
        return r

    # Every run is its own process on one thread: --jobs of them at once. The plain students need no
    # teacher; the distilled ones wait for the teacher they distil from.
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        own = pool.submit(teacher_run)
        shared_f = pool.submit(kdbench_teacher, suite, teacher_cell, a.workdir) if a.teacher == "kdbench" else None
        runs = {(m, s): pool.submit(student_run, m, s, None, None) for m in methods if m == "student" for s in seeds}
        shared = shared_f.result() if shared_f else None
        if shared:
            t_ckpt = shared["checkpoint"]
        else:  # RepDistiller's own teacher, once trained
            own.result()
            t_ckpt = next((a.workdir / "teacher" / "save" / "models").glob(f"{teacher_cell.teacher}_*")) \
                / f"ckpt_epoch_{t_spec.recipe.epochs}.pth"
        runs.update({(m, s): pool.submit(student_run, m, s, t_ckpt, shared) for m in methods if m != "student"
                     for s in seeds})
        t = own.result()
        rows, commands = [_row(a.experiment, teacher_cell, "teacher", teacher_cell.seed, t)], [t["command"]]
        for method in methods:
            for seed in seeds:
                r = runs[method, seed].result()
                if shared and "teacher_acc" in r:
                    shared.setdefault("repdistiller_acc", r["teacher_acc"])
                rows.append(_row(a.experiment, teacher_cell, method, seed, r))
                commands.append(r["command"])
                print(method, seed, rows[-1]["acc_last"], flush=True)

    out = a.out or ROOT / "kdbench" / "reference" / f"repdistiller_{suite.name}.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    provenance = {
        "what": f"unmodified RepDistiller on the {suite.name} suite's synthetic files, experiment {a.experiment}",
        "repdistiller": {"repository": "https://github.com/HobbitLong/RepDistiller", "commit": commit},
        "suite": Path(a.suite).name, "experiment": a.experiment, "dataset": ds, "synthetic": params,
        "data_sha256": data_checksums(data_root),
        "recipe": {"student": recipe_args(s_spec.recipe, teacher_cell.student)[:-4],
                   "teacher": recipe_args(t_spec.recipe, teacher_cell.teacher)[:-4]},
        "teacher": ({"source": "kdbench", "run": shared["run"], "model_sha256": shared["sha256"],
                     "kdbench_acc": shared["acc"], "repdistiller_acc": shared.get("repdistiller_acc"),
                     "note": "RepDistiller's students distil from kdbench's teacher (the same weights); the teacher "
                             "row is RepDistiller's own teacher"}
                    if shared else {"source": "repdistiller", "note": "RepDistiller's students distil from its own teacher"}),
        "runs": "seeds set by the harness (random, numpy, torch.manual_seed) before the script: repeated runs, "
                "not paired with kdbench's seeds",
        "commands": commands, "harness": "benchmarks/repdistiller_reference.py",
        "cpu": _cpu(), "python": platform.python_version(), "torch": _torch_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")


def kdbench_teacher(suite, cell, workdir: Path) -> dict:
    """Train the suite's teacher run with kdbench (its pipeline job, in ``workdir``) and write its
    weights as a RepDistiller checkpoint; returns the checkpoint, kdbench's accuracy and provenance."""
    import torch

    here = os.getcwd()
    os.chdir(workdir)  # the suite's runs_dir and data roots are relative: the job's working directory
    try:
        write_specs(suite, [cell.run])
        spec = Path(suite.run_dir(cell.run)) / "spec.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-m", "kdbench.commands.cli", "train-teacher", "--spec", str(spec)],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"kdbench's teacher run {cell.run} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        model = Path(suite.run_dir(cell.run)).resolve() / "model.pt"
        metrics = json.loads((model.parent / "metrics.json").read_text())
    finally:
        os.chdir(here)
    state = torch.load(model, map_location="cpu", weights_only=True)["state_dict"]
    out = workdir.resolve() / "kdbench_teacher" / f"{cell.teacher}_kdbench" / "ckpt.pth"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, out)
    return {"checkpoint": out, "run": cell.run, "sha256": sha256(model), "acc": float(metrics["acc_last"])}


def _row(experiment: str, cell, method: str, seed: int, r: dict) -> dict:
    if not r["accs"]:
        raise RuntimeError(f"{method} run {seed}: no test accuracy in RepDistiller's output ({r['command']})")
    return {"experiment": experiment, "teacher": cell.teacher, "student": cell.student, "method": method,
            "run": seed, "acc_last": r["accs"][-1], "acc_best": max(r["accs"]), "epochs": r["epochs"],
            "tested_epochs": len(r["accs"]),
            "wall_s": r["wall_s"]}


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _torch_version() -> str:
    import torch
    return torch.__version__


if __name__ == "__main__":
    main()
