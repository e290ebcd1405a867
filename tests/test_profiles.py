"""Snakemake profiles: the paper suite dry-runs through the SLURM executor plugin without any
data and every job requests the right resources; the ImageNet pipeline runs data-parallel
(torchrun, two gloo processes) from rule ``fit`` through the local profile; the launcher never
gives one GPU to two jobs."""

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdbench.planning.launch import claim_gpus, launch_command

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "workflow/profiles/slurm"
LOCAL = REPO / "workflow/profiles/local"
DEFAULT = REPO / "workflow/profiles/default"


def snakemake(workdir: Path, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """snakemake on the repository's Snakefile; the workflow profile only where ``args`` name one
    (``profiles/default`` is found by itself otherwise: its retries and keep-going)."""
    profile = () if "--workflow-profile" in args else ("--workflow-profile", "none")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *profile, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def fit_jobs(output: str) -> dict[str, dict]:
    """run id -> resources, from a dry run's job listing."""
    jobs = {}
    for block in output.split("rule fit:")[1:]:
        run = re.search(r"wildcards: run=(\S+)", block).group(1)
        res = re.search(r"resources: (.*)", block).group(1)
        jobs[run] = dict(kv.split("=", 1) for kv in res.split(", "))
    return jobs


@pytest.fixture(scope="module")
def paper_dry_run(tmp_path_factory):
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.fail("the SLURM profile needs the executor plugin: pip install snakemake-executor-plugin-slurm")
    work = tmp_path_factory.mktemp("slurm")  # no data/ here: the dry run must not read datasets
    done = snakemake(work, "-n", "--workflow-profile", str(SLURM), "--config", "suite=paper")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_slurm_profile_dry_runs_the_paper_suite_without_data(paper_dry_run):
    from kdbench.planning.suite import load_suite
    suite = load_suite(REPO / "workflow/suites/paper.yaml")
    jobs = fit_jobs(paper_dry_run)
    imports = {r for r, run in suite.runs.items() if run.kind == "import"}  # released teachers: rule fetch_teacher
    assert set(jobs) == set(suite.runs) - imports and paper_dry_run.count("rule fetch_teacher:") == len(imports) == 7
    datasets = {r.spec.dataset for r in suite.runs.values()}
    assert {"cifar100", "cifar10", "svhn", "stl10", "tinyimagenet", "imagenet"} <= datasets
    for run_id, res in jobs.items():
        assert "slurm_partition" not in res and "slurm_account" not in res  # left to the site's profile
        mem, minutes = int(res["mem_mb"]), int(res["runtime"])
        assert res["nodes"] == "1" and minutes <= 24 * 60  # the default max_runtime
        if run_id.startswith("imagenet/"):  # torchvision ResNets, 100 epochs of 1.28M images, DDP
            assert (res["gpu"], res["cpus_per_task"]) == ("4", "32")
            assert minutes == 24 * 60 and mem >= 32000  # estimated above the cap: two submissions
        else:
            assert (res["gpu"], res["cpus_per_task"]) == ("1", "1")
            assert 15 <= minutes < 24 * 60 and 4000 <= mem <= 16000
    probe = next(r for r in jobs if "/probe/" in r and r.startswith("stl10/"))
    train = next(r for r in jobs if r.startswith("cifar100/scratch/"))
    assert int(jobs[probe]["runtime"]) < int(jobs[train]["runtime"])  # 40 epochs on 5k images vs 240 on 50k
    assert "KDBENCH_REQUIRE_GPU=1 " + sys.executable + " -m kdbench.planning.launch --gpus 4 --nproc 4 -- distill" in paper_dry_run


def test_slurm_plugin_turns_the_requests_into_sbatch_flags(paper_dry_run):
    """What sbatch receives for an ImageNet job, rendered by the installed plugin itself."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from kdbench.planning.launch import job_resources
    from kdbench.planning.suite import load_suite

    suite = load_suite(REPO / "workflow/suites/paper.yaml")
    run_id = next(r for r in suite.runs if r.startswith("imagenet/") and "/kd/" in r)
    res = {k: (int(v) if v.isdigit() else v) for k, v in fit_jobs(paper_dry_run)[run_id].items()}

    class Resources(dict):
        __getattr__ = dict.__getitem__

    job = SimpleNamespace(resources=Resources(res), threads=job_resources(suite.runs[run_id], suite.config)["threads"])
    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "fit", "account": " -A proj",
              "partition": " -p gpu", "workdir": "/w"}
    call = get_submit_command(job, params) + set_gres_string(job)  # as the plugin's run_job builds it
    for flag in ("--gpus=4", "--cpus-per-task=32", "--mem 60000", "-t 1440", "--nodes=1", "-A proj", "-p gpu"):
        assert flag in call, call


def test_imagenet_trains_with_torchrun_from_the_fit_rule(tmp_path, subprocess_env):
    """rule fit starts two gloo processes per ImageNet run (synthetic JPEGs in the real layout)."""
    done = snakemake(tmp_path, "--workflow-profile", str(LOCAL), "--cores", "2", "--config",
                     "suite=imagenet_smoke", "ddp_procs=2", env=subprocess_env, timeout=400)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert log.count("kdbench.planning.launch --gpus 0 --nproc 2 --") == 2  # teacher and KD student
    runs = sorted((tmp_path / "runs/imagenet").rglob("metrics.json"))
    assert len(runs) == 2
    for m in map(lambda p: json.loads(p.read_text()), runs):
        assert m["status"] == "ok" and m["provenance"]["world_size"] == 2
        assert m["num_classes"] == 2 and len(m["curve"]) == 1
    assert (tmp_path / "results/imagenet_smoke/imagenet.md").is_file()


def test_launcher_gives_each_job_its_own_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_GPU_LOCKS", str(tmp_path))
    assert claim_gpus(1, 3) == [0]  # each claim opens its own lock file descriptions
    assert claim_gpus(2, 3) == [1, 2]
    with pytest.raises(TimeoutError):
        claim_gpus(1, 3, poll_s=0.01, timeout_s=0.05)
    with pytest.raises(SystemExit, match="needs 4 GPUs"):
        claim_gpus(4, 3)
    assert launch_command(1, ["distill"])[1:] == ["-m", "kdbench.commands.cli", "distill"]
    assert "--nproc_per_node=4" in launch_command(4, ["distill", "--run", "r"])


def test_runtime_above_the_cap_is_requested_as_the_cap_with_more_submissions():
    from kdbench.planning.launch import job_resources
    from kdbench.planning.suite import load_suite

    suite = load_suite(REPO / "workflow/suites/paper.yaml")
    run = next(r for r in suite.runs.values() if r.spec.dataset == "imagenet" and r.kind == "train")
    assert run.spec.recipe.epochs == 100
    # 1.5 × (100 + 30) epochs × 1,281,167 images × 1.7 ms / 4 GPUs / 60, + 15 min
    assert job_resources(run, suite.config)["estimate"] == int(1.5 * 130 * 1281167 * 1.7e-3 / 4 / 60) + 15 == 1784
    assert {k: job_resources(run, suite.config)[k] for k in ("runtime", "segments")} == {"runtime": 1440, "segments": 2}
    four_hours = job_resources(run, suite.config, {"max_runtime": 240})
    assert (four_hours["runtime"], four_hours["segments"]) == (240, 8)  # ceil(1784 / 240)
    with pytest.raises(ValueError, match="max_runtime=1440"):
        job_resources(run, suite.config, {"max_runtime": "24h"})


@pytest.mark.parametrize("config", [[], ["suite=paper", "pack_size=12"]])
def test_lint_reports_only_the_findings_the_snakefile_justifies(tmp_path, config):
    done = snakemake(tmp_path, "--lint", *(["--config", *config] if config else []))
    findings = set(re.findall(r"^    \* (.+?):?$", done.stdout + done.stderr, re.M))
    justified = {"Specify a conda environment or container for each rule.",
                 "Mixed rules and functions in same snakefile."}
    assert findings and findings <= justified, findings - justified  # e.g. no "No log directive defined"
    assert all(f.rstrip(".").split(" for each")[0].split(" in same")[0] in (REPO / "Snakefile").read_text()
               for f in findings)  # each is explained at the top of the Snakefile


def planned_jobs(output: str) -> dict[str, int]:
    """rule -> job count, from a dry run's "Job stats" table."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    rows = (line.split() for line in table.splitlines()[3:])
    return {r[0]: int(r[1]) for r in rows if len(r) == 2 and r[0] != "total"}


def test_default_profile_has_the_local_settings():
    import yaml
    default, local = (yaml.safe_load((p / "config.yaml").read_text()) for p in (DEFAULT, LOCAL))
    assert default == local and default["retries"] == 1 and default["cores"] == "all"


def test_readme_command_plans_the_same_jobs_with_and_without_the_default_profile(tmp_path):
    """`snakemake --cores 2` (the README's run of the smoke suite) as a dry run, without any
    workflow profile, with the default one named, and as typed in the repository (no -s, no
    --workflow-profile: Snakemake finds profiles/default, the committed link to workflow/profiles,
    by itself): the same jobs, rule by rule."""
    assert (REPO / "profiles").is_symlink() and (REPO / "profiles/default").resolve() == DEFAULT.resolve()
    runs = {}
    for profile in ("none", str(DEFAULT)):
        done = snakemake(tmp_path, "-n", "--cores", "2", "--workflow-profile", profile)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-3000:]
        assert ("Using workflow specific profile" in log) == (profile != "none")
        runs[profile] = planned_jobs(log)
    plain = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--directory", str(tmp_path)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    log = plain.stdout + plain.stderr
    assert plain.returncode == 0, log[-3000:]
    assert "Using workflow specific profile profiles/default for setting default command line arguments" in log
    from kdbench.planning.suite import load_suite
    smoke = load_suite(REPO / "workflow/suites/smoke.yaml")
    assert runs["none"] == runs[str(DEFAULT)] == planned_jobs(log)
    assert runs["none"]["fit"] == len(smoke.runs)  # one job per run: nothing is left out of the plan
