"""The prepared GPU check (issues 16, 28): every CUDA path of kdbench in one ~8-minute run.

    benchmarks/gpu_check.sh [--dry]          # writes $OUT/gpu_check.json and $OUT/gpu_check.log

Steps, in order, each in its own process with its own time limit (a crash or hang in one is
recorded, and the next still runs):

1. ``environment``: device name, driver (nvidia-smi), torch / CUDA / cuDNN versions, which
   optional pieces this torch has (the private fused SGD kernel; kdbench falls back to
   ``_foreach`` ops without it and records ``used.sgd_kernel``), missing Python packages.
2. ``cuda_tests``: the tests marked ``cuda`` (tests/conftest.py: those skipped without a GPU),
   with a per-test time limit (pytest-timeout where installed).
3. ``fast_path``: a short KD resnet32x4→resnet8x4 run on synthetic CIFAR-format data, plain fp32
   (seeds 0 and 1: the seed noise) vs the fast configuration (bf16, channels_last, CUDA graph,
   fp32 teacher cache, seed 0), and fp32 with the CUDA graph alone vs plain (the same maths: the
   curves and weights must agree to float32 rounding).
4. ``bench``: ``kdbench bench``, one process per job: KD with every config and the 12-run grid
   (packed, fused and unfused, vs the same runs one after another by kdbench and by the reference
   loop), then CRD (nce_k 16384) and FitNet; whole runs and steps, median [min–max] over repeats.
   Then the record ``results/gpu/<gpu kind>.json`` (this report: what ``kdbench plan`` reads,
   :func:`kdbench.planning.cost.read_bench_record`) and ``.md`` (a summary) are written.
5. ``projection``: ``kdbench plan --gpu <kind> --records results/gpu`` of the paper suite's CRD
   Tables 1+2 and of the whole ``paper`` suite (per-GPU hours, each run once), from the record
   just written (the engine's measured plain steps where they apply, the planner's model elsewhere).

``--dry`` (or ``KDBENCH_GPU_CHECK_DRY=1``): the same steps on the CPU at tiny sizes (resnet8
models, a few steps), so that the script is exercised by the tests (tests/test_gpu_check.py); its
record goes to ``<out>/results/gpu/cpu.json`` (marked dry: the planner refuses it) and its
projection is the planner's model alone.

The device image (Python 3.12, torch 2.11) has no jsonschema, which kdbench.planning.suite imports: the
engine, ``kdbench bench`` and most tests run without it, but test modules that load suites
(test_pack.py's GPU tests among them) are not collected. gpu_check.sh installs any wheels found in
``.whl/`` first (the device README says how to download them: jsonschema, jsonschema-specifications,
referencing, rpds-py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: (step, time limit in seconds on the GPU, in dry mode): 8 minutes in all on the GPU. The dry run
#: takes ~30 s on 2 idle cores; its limits only guard against a hang on a loaded CI machine.
STEPS = (("environment", 30, 120), ("cuda_tests", 100, 240), ("fast_path", 60, 240), ("bench", 260, 400),
         ("projection", 30, 120))
#: the bench step's jobs' own limits (GPU), within the step's: KD with the 12-run grid, CRD, FitNet
BENCH_LIMITS = {"kd": 170, "crd": 50, "fitnet": 40}

#: the projection: the paper suite's CRD Tables 1+2, then the whole suite
PLAN_SUITE, CRD_TABLES = "paper", "crd_table1,crd_table2"


def sizes(dry: bool) -> dict:
    if dry:
        return {"device": "cpu", "pair": ["resnet8", "resnet8"], "classes": 5, "train_per_class": 16,
                "test_per_class": 4, "epochs": 1, "fast_precision": "fp32"}
    return {"device": "cuda", "pair": ["resnet32x4", "resnet8x4"], "classes": 100, "train_per_class": 64,
            "test_per_class": 20, "epochs": 3, "fast_precision": "bf16"}


# ---------------------------------------------------------------- the steps (each in a child process)

def environment(dry: bool) -> dict:
    import torch
    from kdbench.engine.optim import fused_sgd_kernel

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cuda_available": torch.cuda.is_available(), "fused_sgd_kernel": fused_sgd_kernel(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "missing_packages": [m for m in ("yaml", "jsonschema", "tqdm", "scipy", "numpy", "PIL", "snakemake",
                                            "pytest_timeout") if importlib.util.find_spec(m) is None]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"not available ({type(e).__name__})"
    return out


def cuda_tests(dry: bool) -> dict:
    # test modules that cannot be imported there (a missing package) must not stop the others
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rA",
           "--continue-on-collection-errors"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append("--timeout=60")
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_child_env())
    lines = r.stdout.strip().splitlines()
    outcomes = {}
    for line in lines:  # -rA's short summary: "PASSED tests/...::name", "SKIPPED [1] tests/...: reason"
        word = line.split(" ", 1)[0]
        if word in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"):
            outcomes.setdefault(word.lower(), []).append(line.split(" ", 1)[1][:300])
    print(r.stdout[-20000:], r.stderr[-5000:])
    # a module that could not be imported (e.g. jsonschema missing: carry its wheels in .whl/) hides
    # its GPU tests: listed, and the step fails
    not_collected = [e for e in outcomes.get("error", []) if "::" not in e]
    return {"returncode": r.returncode, "summary": lines[-1] if lines else "", "outcomes": outcomes,
            "not_collected": not_collected,
            "ok": not outcomes.get("failed") and not outcomes.get("error") and r.returncode in (0, 5)}


def fast_path(dry: bool) -> dict:
    import torch
    from kdbench.data.synthetic_files import ensure_synthetic
    from kdbench.engine.checkpoint import save_model
    from kdbench.core.spec import Execution, Recipe, RunSpec
    from kdbench.engine.fit import fit
    from kdbench.models import build_model

    z = sizes(dry)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    data = work / "data"
    ensure_synthetic("cifar100", str(data), {"classes": z["classes"], "train_per_class": z["train_per_class"],
                                             "test_per_class": z["test_per_class"], "seed": 0, "noise": 0.3})
    teacher, student = z["pair"]
    torch.manual_seed(0)
    save_model(work / "t.pt", build_model(teacher, z["classes"]), teacher, z["classes"], "cifar100")
    recipe = Recipe.from_config({"epochs": z["epochs"]})
    # CUDA graphs need CUDA, and bf16 convolutions are slow on a CPU: the dry run takes the eager fp32 step
    graph = "none" if dry else "graph"
    configs = {"plain": (0, Execution()), "plain_seed1": (1, Execution()),
               "fast": (0, Execution(precision=z["fast_precision"], channels_last=True, compile=graph,
                                     teacher_cache="fp32")),
               "graph_fp32": (0, Execution(compile=graph))}
    runs, out = {}, {"sizes": {k: z[k] for k in ("pair", "classes", "train_per_class", "epochs")}}
    for name, (seed, ex) in configs.items():
        spec = RunSpec("cifar100", str(data), student, "kd", seed, teacher, (str(work / "t.pt"),), recipe=recipe,
                       execution=ex)
        t0 = time.time()
        m = fit(spec, work / name, z["device"], progress=False)
        runs[name] = m
        out[name] = {"status": m["status"], "acc_last": m["acc_last"], "loss": [r["loss"] for r in m["curve"]],
                     "seconds_per_epoch": m.get("seconds_per_epoch"), "wall_s": time.time() - t0,
                     "used": m.get("used"), "changed_at_run_time": m.get("changed_at_run_time")}
    noise = abs(runs["plain"]["acc_last"] - runs["plain_seed1"]["acc_last"])
    out["seed_noise_acc"] = noise
    out["fast_vs_plain_acc"] = abs(runs["fast"]["acc_last"] - runs["plain"]["acc_last"])
    out["fast_vs_plain_loss_rel"] = _max_rel(out["fast"]["loss"], out["plain"]["loss"])
    out["graph_vs_eager_loss_rel"] = _max_rel(out["graph_fp32"]["loss"], out["plain"]["loss"])
    out["graph_vs_eager_weights_rel"] = _weights_rel(work / "graph_fp32", work / "plain")
    # within seed noise (two seeds give one difference: 2× it, at least one test image); bf16 losses
    # within 5%; the CUDA graph runs the eager step's maths in fp32: float32 rounding through the epochs
    one_image = 100.0 / (z["classes"] * z["test_per_class"])
    out["checks"] = {"fast_acc_within_seed_noise": out["fast_vs_plain_acc"] <= max(2 * noise, one_image),
                     "fast_loss_close": out["fast_vs_plain_loss_rel"] <= 5e-2,
                     "graph_equals_eager": out["graph_vs_eager_loss_rel"] <= 1e-3}
    out["ok"] = all(out["checks"].values())
    return out


def bench(dry: bool) -> dict:
    z = sizes(dry)
    if dry:  # each path once, at the smallest sizes
        common = ["--steps", "1", "--warmup", "1", "--epochs", "1", "--repeat", "1", "--workers", "0",
                  "--nce-k", "100", "--grid-pair", ",".join(z["pair"])]
        jobs = {"kd": ["--methods", "kd", "--configs", "plain,fast", "--pack", "2"],
                "crd": ["--methods", "crd", "--configs", "plain", "--pack", "0"],
                "fitnet": ["--methods", "fitnet", "--configs", "plain", "--pack", "0"]}
    else:  # KD: every config and the 12-run grid, fused and unfused; CRD (nce_k 16384), FitNet: plain and fast
        common = ["--steps", "30", "--warmup", "10", "--epochs", "1", "--repeat", "2"]
        jobs = {"kd": ["--methods", "kd", "--pack", "12"],
                "crd": ["--methods", "crd", "--configs", "plain,fast", "--pack", "0", "--steps", "50"],
                "fitnet": ["--methods", "fitnet", "--configs", "plain,fast", "--pack", "0", "--steps", "50"]}
    out = {}
    for name, extra in jobs.items():
        path = Path(tempfile.mkdtemp()) / f"{name}.json"
        cmd = [sys.executable, "-m", "kdbench.commands.bench", "--device", z["device"], "--pair", ",".join(z["pair"]),
               "--json", str(path), *common, *extra]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_child_env(),
                               timeout=240 if dry else BENCH_LIMITS[name])
            code, stdout, stderr = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            code, stdout, stderr = "timed out", _text(e.stdout), _text(e.stderr)
        print(" ".join(cmd), "\n", stdout[-8000:], stderr[-4000:], flush=True)
        res = json.loads(path.read_text()) if path.exists() else None
        # one result per method (what kdbench.planning.cost.read_bench_record reads), the grid apart
        out[name] = {"returncode": code, "wall_s": time.time() - t0, "printed": stdout[-6000:],
                     "result": res["methods"][name] if res else None, "error": stderr[-2000:] if code else None}
        if res and "grid" in res:
            out["grid"] = {"returncode": code, "result": res["grid"]}
    out["ok"] = all(v["returncode"] == 0 for v in out.values())
    return out


def gpu_kind(device_name: str) -> str:
    """The planner's GPU kind of a device name (``NVIDIA H100 80GB HBM3`` → ``h100``), else the
    name as a file name."""
    from kdbench.planning.cost import GPUS
    low = device_name.lower()
    return next((k for k in GPUS if k in low), "".join(c if c.isalnum() else "_" for c in low).strip("_") or "unknown")


def record_paths(report: dict, out: Path) -> tuple[Path, str]:
    """Where the record goes (``results/gpu`` of the checkout; dry: under ``out``) and its GPU kind."""
    if report["dry"]:
        return out / "results" / "gpu", "cpu"
    return REPO / "results" / "gpu", gpu_kind((report["steps"].get("environment") or {}).get("device_name") or "")


def write_record(report: dict, folder: Path, kind: str) -> None:
    """``<folder>/<kind>.json`` (the report) and ``.md`` (its summary)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}.json").write_text(json.dumps(report, indent=1, default=str))
    env = report["steps"].get("environment") or {}
    lines = [f"# GPU check: {env.get('device_name') or 'no GPU'}" + (" (DRY: CPU, toy sizes)" if report["dry"] else ""),
             "", f"started {report['started']}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"nvidia-smi: {env.get('nvidia_smi')}", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {s.get('status')} | {s.get('seconds', '')} |" for n, s in report["steps"].items()]
    for name, job in ((report["steps"].get("bench") or {}).items()):
        if isinstance(job, dict) and job.get("printed"):
            lines += ["", f"## bench {name}", "", "```", job["printed"].strip(), "```"]
    proj = report["steps"].get("projection") or {}
    for name in ("crd_tables", "paper"):
        if proj.get(name):
            t = proj[name]["total"]
            lines += ["", f"## projection: {name} on {proj['gpu']}", "",
                      f"{t['runs']} runs, {t['steps']:,} steps, {t['gpu_hours']:,.1f} GPU-hours per GPU "
                      f"({t['measured_steps']:,} steps from measured step costs), wall {t['wall_hours']:,.1f} h at "
                      f"{t['wall_gpus']} GPUs"]
    (folder / f"{kind}.md").write_text("\n".join(lines) + "\n")


def projection(dry: bool, records: str, kind: str) -> dict:
    """``kdbench plan`` of CRD Tables 1+2 and of the whole paper suite on ``kind`` from ``records``."""
    gpu = kind if not dry else "h100"  # dry: the record is refused, and h100.json is not there: the model alone
    out = {"gpu": gpu, "records": records}
    for name, extra in (("crd_tables", ["--tables", CRD_TABLES]), ("paper", [])):
        path = Path(tempfile.mkdtemp()) / f"{name}.json"
        cmd = [sys.executable, "-m", "kdbench.commands.plan", "--suite", PLAN_SUITE, "--gpu", gpu, "--records",
               records, "--json", str(path), *extra]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_child_env())
        print(" ".join(cmd), "\n", r.stdout, r.stderr[-3000:], flush=True)
        out[name] = json.loads(path.read_text()) if r.returncode == 0 and path.exists() else None
        out[f"{name}_printed"] = r.stdout
        if r.returncode:
            out[f"{name}_error"] = r.stderr[-2000:]
    out["ok"] = out["crd_tables"] is not None and out["paper"] is not None
    return out


STEP_FUNCS = {"environment": environment, "cuda_tests": cuda_tests, "fast_path": fast_path, "bench": bench,
              "projection": projection}


# ---------------------------------------------------------------- helpers

def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1"}


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def _weights_rel(a: Path, b: Path) -> float | None:
    import torch
    try:
        sa, sb = (torch.load(p / "model.pt", weights_only=True)["state_dict"] for p in (a, b))
    except FileNotFoundError:
        return None
    fl = [k for k in sb if sb[k].is_floating_point()]
    num = sum(((sa[k].double() - sb[k].double()) ** 2).sum().item() for k in fl)
    return (num / sum((sb[k].double() ** 2).sum().item() for k in fl)) ** 0.5


def run_step(name: str, dry: bool, limit: float, log, extra: tuple = ()) -> dict:
    """One step in a child process with a time limit; its output goes to the log."""
    part = Path(tempfile.mkdtemp()) / f"{name}.json"
    cmd = ([sys.executable, str(Path(__file__).resolve()), "--step", name, "--part", str(part), *extra]
           + (["--dry"] if dry else []))
    t0 = time.time()
    log.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
    log.flush()
    try:
        r = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=limit, env=_child_env())
        status = "ok" if r.returncode == 0 else f"exit {r.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit:.0f} s"
    res = json.loads(part.read_text()) if part.exists() else {}
    if status == "ok" and res.get("ok") is False:
        status = "checks failed"
    return {"status": status, "seconds": round(time.time() - t0, 1), **res}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", default=os.environ.get("KDBENCH_GPU_CHECK_DRY") == "1",
                   help="tiny sizes on the CPU (also KDBENCH_GPU_CHECK_DRY=1)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.json and gpu_check.log "
                   "(default $OUT, else .)")
    p.add_argument("--step", choices=[s for s, *_ in STEPS], help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--records", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.step:  # a child: one step, its result to --part
        sys.path.insert(0, str(REPO))
        try:
            res = STEP_FUNCS[a.step](a.dry, *((a.records, a.kind) if a.step == "projection" else ()))
        except Exception:
            res = {"ok": False, "error": traceback.format_exc()[-4000:]}
            traceback.print_exc()
        Path(a.part).write_text(json.dumps(res, indent=1, default=str))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"dry": a.dry, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}
    with open(out / "gpu_check.log", "w") as log:
        for name, gpu_s, dry_s in STEPS:
            extra = ()
            if name == "projection":  # the planner reads the record the bench step's figures are in
                folder, kind = record_paths(report, out)
                write_record(report, folder, kind)
                extra = ("--records", str(folder), "--kind", kind)
            report["steps"][name] = run_step(name, a.dry, dry_s if a.dry else gpu_s, log, extra)
            print(f"{name:12s} {report['steps'][name]['status']}", flush=True)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))  # after every step
    report["ok"] = all(s["status"] == "ok" for s in report["steps"].values())
    folder, kind = record_paths(report, out)
    report["record"] = str(folder / f"{kind}.json")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    write_record(report, folder, kind)
    print(f"gpu_check: record {folder / kind}.json|md")
    print(f"gpu_check: {'all steps ok' if report['ok'] else 'SOME STEPS FAILED'}; {out / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
