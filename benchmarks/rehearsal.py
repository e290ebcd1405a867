"""The dress rehearsal of a suite on a fake SLURM cluster (issue 27): every kind of job it has,
each run cut to a few steps (kdbench/planning/rehearsal.py), submitted through the real SLURM
executor plugin to the recording fake commands of tests/fake_slurm.py, whose jobs really run.

    python benchmarks/rehearsal.py                      # the paper suite -> results/rehearsal/
    python benchmarks/rehearsal.py --suite dkd --jobs 2 --pack-size 32

It writes ``<workdir>/rehearsal.yaml`` (``include:`` the suite, ``rehearsal: {...}``, ``device:
cpu``), installs the fake cluster in ``<workdir>`` (a site profile with a partition and account,
the fake commands first on PATH, ``FAKE_SLURM_RUN=1``), runs ``snakemake`` there with
``workflow/profiles/slurm`` (``--config pack_size=N ddp_procs=2``: packed distillations, ImageNet
as 2-process DDP) and prints what it measured: jobs submitted, wall time, and each submitted job's
wall (from the fake cluster's job state files, polled every 0.25 s) minus the training time its
run records (``wall_time_s`` of its metrics.json; a pack's runs train in lockstep, so the longest
of theirs): the per-job overhead (process starts, Snakemake
inside the job, imports, data loading). ``--kill-checkpoint GLOB`` has the fake cluster kill the
first job still running once GLOB exists, as at a time limit (Snakemake resubmits it; it resumes).
``--json`` writes the measurement. Run ids never meet a real suite's: rehearsal runs hash
``rehearsal: true``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import fake_slurm  # noqa: E402  (tests/fake_slurm.py: the fake cluster)

SLURM_PROFILE = REPO / "workflow/profiles/slurm"
TERMINAL = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED")


def write_rehearsal_suite(workdir: Path, suite: str, options: dict | None = None) -> Path:
    """``<workdir>/rehearsal.yaml``: the rehearsal of ``suite`` (a name or a file), on the CPU."""
    from kdbench.planning.suite_files import suite_file

    path = workdir / "rehearsal.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": "rehearsal", "description": f"dress rehearsal of {suite} (kdbench/planning/rehearsal.py)",
        "device": "cpu", "threads": 1, "runs_dir": "runs", "include": [str(suite_file(suite).resolve())],
        "rehearsal": dict(options or {})}, sort_keys=False))
    return path


def fake_cluster(workdir: Path, kill_checkpoint: str | None = None) -> tuple[dict, Path, Path]:
    """(environment, site profile, fake-cluster state folder) of a fake SLURM cluster in ``workdir``
    whose jobs run (``FAKE_SLURM_RUN=1``); ``kill_checkpoint``: kill the first job running once
    this glob exists (as at its time limit: 0.01 s per requested minute)."""
    fake_slurm.install(workdir / "bin")
    state, site = workdir / "slurm", workdir / "site"
    state.mkdir(parents=True, exist_ok=True)
    site.mkdir(exist_ok=True)
    (site / "config.yaml").write_text(yaml.safe_dump({"default-resources": {"slurm_partition": "gpu",
                                                                           "slurm_account": "myproj"}}))
    env = {**os.environ, "PATH": f"{workdir / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(state),
           "FAKE_SLURM_RUN": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if kill_checkpoint:
        env.update(FAKE_SLURM_SECONDS_PER_MINUTE="0.01", FAKE_SLURM_CHECKPOINT=kill_checkpoint)
    return env, site, state


class JobClock:
    """When each fake job was first seen (submitted: it starts at once) and when it ended, from the
    fake cluster's job state files, polled every ``every`` seconds in a thread."""

    def __init__(self, state: Path, every: float = 0.25):
        self.state, self.every, self.start, self.end = state, every, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._look()

    def _look(self) -> None:
        jobs = self.state / "jobs"
        now = time.time()
        for p in jobs.iterdir() if jobs.exists() else ():
            if p.name.startswith("."):
                continue
            self.start.setdefault(p.name, now)
            try:
                if p.read_text() in TERMINAL:
                    self.end.setdefault(p.name, now)
            except FileNotFoundError:
                pass

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._look()
            self._stop.wait(self.every)


def submissions(state: Path) -> list[dict]:
    """Every sbatch call: its job id and the plugin's ``--comment`` (``rule_<rule>[_wildcards_...]``)."""
    path = state / "sbatch.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        out.append({"job": rec["job"], "comment": fake_slurm._option(rec["argv"], "--comment") or "",
                    "argv": rec["argv"]})
    return out


def job_runs(suite, pack_size: int) -> dict[str, list[str]]:
    """sbatch comment -> the run ids that job trains (rule fit: one; rule pack_<id>: its pack)."""
    out = {f"rule_fit_wildcards_{r.replace('/', '_')}": [r] for r in suite.runs}
    out.update({f"rule_pack_{pid}": runs for pid, runs in suite.packs(pack_size).items()})
    return out


def measure(suite, workdir: Path, state: Path, clock: JobClock, pack_size: int) -> dict:
    """Jobs submitted and each one's wall, training time (its runs' ``wall_time_s``) and overhead."""
    from kdbench.core.io import read_json

    runs_of = job_runs(suite, pack_size)
    jobs = []
    for s in submissions(state):
        wall = clock.end.get(s["job"], float("nan")) - clock.start.get(s["job"], float("nan"))
        runs = runs_of.get(s["comment"], [])
        walls = [(read_json(workdir / suite.run_dir(r) / "metrics.json") or {}).get("wall_time_s", 0.0) for r in runs]
        train = max(walls, default=0.0)  # a pack's runs train in lockstep: each one's wall is the pack's
        jobs.append({"job": s["job"], "comment": s["comment"], "runs": len(runs), "wall_s": round(wall, 2),
                     "train_s": round(train, 2), "overhead_s": round(wall - train, 2)})
    once = {}  # a resubmitted job: its last submission (the one that trained to the end)
    for j in jobs:
        once[j["comment"]] = j
    training = [j for j in once.values() if j["runs"] and j["wall_s"] == j["wall_s"]]
    overheads = sorted(j["overhead_s"] for j in training)
    return {"sbatch_jobs": len(jobs), "distinct_jobs": len(once), "resubmitted": len(jobs) - len(once),
            "training_jobs": len(training), "runs": len(suite.runs),
            "overhead_median_s": statistics.median(overheads) if overheads else None,
            "overhead_min_s": overheads[0] if overheads else None,
            "overhead_max_s": overheads[-1] if overheads else None,
            "train_s_total": round(sum(j["train_s"] for j in training), 1), "jobs": jobs}


def rehearse(suite: str = "paper", workdir: Path = REPO / "runs/rehearsal-cluster",
             results: Path = REPO / "results/rehearsal", jobs: int = 2, pack_size: int = 32, ddp_procs: int = 2,
             options: dict | None = None, kill_checkpoint: str | None = None, extra: list[str] = (),
             timeout: float | None = None) -> dict:
    """Run the rehearsal of ``suite`` on a fake SLURM cluster in ``workdir``; the measurement."""
    from kdbench.planning.suite import load_suite

    workdir, results = Path(workdir).resolve(), Path(results).resolve()
    suite_path = write_rehearsal_suite(workdir, suite, options)
    planned = load_suite(suite_path)
    env, site, state = fake_cluster(workdir, kill_checkpoint)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--profile", str(site), "--workflow-profile", str(SLURM_PROFILE), "--jobs", str(jobs),
           "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
           "--latency-wait", "5", "--config", f"suite_file={suite_path}", f"pack_size={pack_size}",
           f"ddp_procs={ddp_procs}", f"results_dir={results}", *extra]
    log = workdir / "snakemake.log"
    t0 = time.time()
    with JobClock(state) as clock, open(log, "w") as out:
        done = subprocess.run(cmd, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.time() - t0
    report = {"suite": suite, "rc": done.returncode, "wall_s": round(wall, 1), "jobs_at_once": jobs,
              "pack_size": pack_size, "log": str(log), "results": str(results),
              **measure(planned, workdir, state, clock, pack_size)}
    events = state / "events.jsonl"
    report["killed"] = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="paper", help="the suite to rehearse: a name or a file (default paper)")
    p.add_argument("--workdir", default=str(REPO / "runs/rehearsal-cluster"),
                   help="where the fake cluster, the data and the runs go (default runs/rehearsal-cluster)")
    p.add_argument("--results", default=str(REPO / "results/rehearsal"), help="tables and figures (default results/rehearsal)")
    p.add_argument("--jobs", type=int, default=2, help="jobs running at once (default 2: one per core here)")
    p.add_argument("--pack-size", type=int, default=32, help="distillations per job (--config pack_size; default 32)")
    p.add_argument("--ddp-procs", type=int, default=2, help="DDP processes per ImageNet run (default 2)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a rehearsal: option (kdbench/planning/rehearsal.py DEFAULTS), e.g. epochs=1")
    p.add_argument("--kill-checkpoint", help="kill the first job still running once this glob exists (resume check)")
    p.add_argument("--json", help="write the measurement here")
    args, extra = p.parse_known_args(argv)
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
    report = rehearse(args.suite, Path(args.workdir), Path(args.results), args.jobs, args.pack_size, args.ddp_procs,
                      options, args.kill_checkpoint, extra)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"rehearsal of {args.suite}: rc {report['rc']}, {report['runs']} runs, {report['sbatch_jobs']} sbatch jobs "
          f"({report['resubmitted']} resubmitted), {report['wall_s'] / 60:.1f} min wall, {args.jobs} jobs at once, "
          f"pack size {args.pack_size}")
    if report["overhead_median_s"] is not None:
        print(f"per-job overhead (job wall - its runs' training time), {report['training_jobs']} training jobs: "
              f"median {report['overhead_median_s']:.1f} s [{report['overhead_min_s']:.1f}-{report['overhead_max_s']:.1f}]; "
              f"training {report['train_s_total']:.0f} s in all")
    print(f"tables and figures: {report['results']}; log: {report['log']}")
    return 0 if report["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
