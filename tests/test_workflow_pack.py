"""Packing in the workflow: Suite.packs forms the packs (deterministic, packable, only
distillations, run ids unchanged); the Snakefile trains each pack in one `kdbench pack` job
instead of one `fit` job per run, on CPU end to end and in the SLURM profile's dry run; a run
that errors in a pack leaves the others trained."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kdbench.planning.launch import job_resources
from kdbench.engine.pack import check_packable
from kdbench.planning.suite import SuiteError, load_suite

from conftest import REPO, write_suite

MAIN = {"name": "main", "dataset": "cifar100", "pairs": [["resnet14", "resnet8"], ["resnet14", "wrn_16_1"]],
        "methods": ["student", "kd", "fitnet", "crd"], "seeds": [0, 1, 2]}
OTHERS = [  # each differs from MAIN in one thing check_packable compares
    {"name": "teacher", "dataset": "cifar100", "pairs": [["resnet20", "resnet8"]], "methods": ["kd"], "seeds": [0, 1]},
    {"name": "bf16", "dataset": "cifar100", "pairs": [["resnet14", "resnet8"]], "methods": ["kd"], "seeds": [0, 1],
     "execution": {"precision": "bf16"}},
    {"name": "batch", "dataset": "cifar100", "pairs": [["resnet14", "resnet8"]], "methods": ["kd"], "seeds": [0, 1],
     "recipe": {"epochs": 2, "batch_size": 32}},
    {"name": "ensemble", "dataset": "cifar100", "pairs": [["resnet14", "resnet8"]], "methods": ["kd"], "seeds": [0, 1],
     "teacher_seeds": [0, 1]},
    {"name": "probe", "dataset": "cifar100", "pairs": [["resnet32", "resnet8"]], "methods": ["kd"], "seeds": [0],
     "linear_probe": {"datasets": ["cifar10"]}},  # its one KD run is a group of one
    {"name": "imnet", "dataset": "imagenet", "pairs": [["imagenet_resnet34", "imagenet_resnet18"]], "methods": ["kd"],
     "seeds": [0, 1]},
]


def grid_suite(tmp_path, experiments, name="grid.yaml", **overrides):
    path = write_suite(tmp_path / name, tmp_path / "data", experiments=experiments, tables=[], **overrides)
    cfg = yaml.safe_load(path.read_text())
    cfg["datasets"].update(cifar10={"root": str(tmp_path / "c10")}, imagenet={"root": str(tmp_path / "imnet")})
    path.write_text(yaml.safe_dump(cfg))
    return load_suite(path)


def test_packs_group_order_and_chunk_distillations(tmp_path):
    suite = grid_suite(tmp_path, [MAIN, *OTHERS])
    packs = suite.packs(4)
    packed = [r for runs in packs.values() for r in runs]
    assert len(packed) == len(set(packed))  # a run is in one pack at most
    for pack_id, runs in packs.items():
        specs = [suite.runs[r].spec for r in runs]
        check_packable(specs)  # raises if these runs could not share a process
        assert 2 <= len(runs) <= 4
        assert all(suite.runs[r].kind == "distill" and s.dataset == "cifar100" for r, s in zip(runs, specs))
        keys = [(s.student, s.method, s.seed) for s in specs]
        assert keys == sorted(keys)  # same-student runs sit together
        first = specs[0]
        assert pack_id.startswith(f"cifar100.{first.teacher}--{first.student}")
        assert re.fullmatch(r"[\w.+-]+\.[0-9a-f]{8}", pack_id)
    # MAIN's 2 pairs x 3 teacher methods x 3 seeds share the teacher: ceil(18/4) = 5 packs of 3-4
    main = sorted(len(v) for v in packs.values() if set(v) <= set(suite.experiment_runs["main"]))
    assert main == [3, 3, 4, 4, 4]
    # each other experiment differs in one packable key: its runs are packed apart from MAIN's
    for exp in ("teacher", "bf16", "batch", "ensemble"):
        runs = [r for r in suite.experiment_runs[exp] if suite.runs[r].kind == "distill"]
        assert any(set(runs) == set(v) for v in packs.values()), exp
    # teachers, plain students, linear probes and DDP (ImageNet) runs stay one job each
    unpacked = {r.id for r in suite.runs.values() if r.id not in packed}
    kinds = {suite.runs[r].kind for r in unpacked}
    assert kinds == {"train", "probe", "distill"}
    assert {r for r in unpacked if suite.runs[r].kind == "distill"} == {
        r for r in suite.experiment_runs["imnet"] if suite.runs[r].kind == "distill"} | {
        r for r in suite.experiment_runs["probe"] if suite.runs[r].kind == "distill"}
    assert suite.packs(1) == {} and all(len(v) == 18 for v in suite.packs(100).values() if len(v) > 2)


def test_packs_are_stable_and_leave_run_ids_alone(tmp_path):
    suite = grid_suite(tmp_path, [MAIN, *OTHERS])
    # packing alone leaves ids alone; fusion is in the ids (tests/test_fusion_identity.py)
    packed_suite = grid_suite(tmp_path, list(reversed([MAIN, *OTHERS])), "packed.yaml", pack={"size": 4})
    assert packed_suite.packs(4) == suite.packs(4)  # same runs, same ids, whatever the suite's order
    assert {r: x.spec for r, x in packed_suite.runs.items()} == {r: x.spec for r, x in suite.runs.items()}
    one_more = grid_suite(tmp_path, [{**MAIN, "seeds": [0, 1, 2, 3]}], "more.yaml")
    assert not set(one_more.packs(4)) & set(suite.packs(4))  # other members, other ids

    assert suite.pack_options({}) == {"size": 1, "fuse": False}
    assert packed_suite.pack_options({}) == {"size": 4, "fuse": False}
    assert packed_suite.pack_options({"pack_size": 12, "pack_fuse": "false"}) == {"size": 12, "fuse": False}
    with pytest.raises(SuiteError, match="pack_size is a whole number >= 1"):
        suite.pack_options({"pack_size": 0})
    with pytest.raises(SuiteError, match="allowed keys here: size, fuse"):
        grid_suite(tmp_path, [MAIN], "bad.yaml", pack={"sizes": 4})


def test_pack_resources_are_one_runs_gpu_with_scaled_memory_and_time(tmp_path):
    suite = grid_suite(tmp_path, [MAIN, *OTHERS], device="auto")
    runs = [suite.runs[r] for r in next(iter(suite.packs(4).values()))]
    one, pack = job_resources(runs[0], suite.config), job_resources(runs, suite.config)
    assert (pack["gpu"], pack["nproc"], pack["threads"], pack["cpus_per_task"]) == (1, 1, one["threads"], one["threads"])
    assert pack["mem_mb"] == one["mem_mb"] + 500 * (len(runs) - 1)
    assert pack["runtime"] == 15 + len(runs) * (one["runtime"] - 15)
    paper = load_suite(REPO / "workflow/suites/paper.yaml")
    times = [job_resources([paper.runs[r] for r in v], paper.config)["runtime"] for v in paper.packs(12).values()]
    assert max(times) == 24 * 60  # capped: a pack killed at its limit is resubmitted and resumes
    imnet = [r for r in suite.runs.values() if r.spec.dataset == "imagenet" and r.kind == "distill"]
    with pytest.raises(ValueError, match="need DDP"):
        job_resources(imnet, suite.config)


def snakemake(workdir: Path, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """snakemake on the repository's Snakefile; the workflow profile only where ``args`` name one
    (``profiles/default`` is found by itself otherwise: its retries and keep-going)."""
    profile = () if "--workflow-profile" in args else ("--workflow-profile", "none")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *profile, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def jobs(output: str) -> dict[str, dict]:
    """rule -> {"outputs": [...], "resources": {...}} for every job of a dry run (-n)."""
    found = {}
    for block in re.split(r"\n(?=(?:local)?rule \S+:\n)", output)[1:]:
        rule = re.match(r"(?:local)?rule (\S+):", block).group(1)
        outputs = re.search(r"output: (.*)", block)
        res = re.search(r"resources: (.*)", block)
        found.setdefault(rule, []).append({
            "outputs": outputs.group(1).split(", ") if outputs else [],
            "resources": dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}})
    return found


def test_dry_run_shows_pack_jobs_instead_of_fit_jobs(tmp_path, subprocess_env):
    suite_file = write_suite(tmp_path / "tiny.yaml", tmp_path / "data")
    suite = load_suite(suite_file)
    done = snakemake(tmp_path, "-n", "-p", "--config", f"suite_file={suite_file}", "pack_size=2", env=subprocess_env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    listed = jobs(log)
    packs = {r: j for r, j in listed.items() if r.startswith("pack_")}
    (pack_id, runs), = suite.packs(2).items()  # the two KD runs
    assert list(packs) == [f"pack_{pack_id}"] and len(packs[f"pack_{pack_id}"]) == 1
    assert sorted(packs[f"pack_{pack_id}"][0]["outputs"]) == sorted(f"{tmp_path}/runs/{r}/metrics.json" for r in runs)
    fits = [o for job in listed["fit"] for o in job["outputs"]]
    teachers = [r.id for r in suite.runs.values() if r.kind == "train"]
    assert sorted(fits) == sorted(f"{tmp_path}/runs/{r}/metrics.json" for r in teachers)
    specs = " ".join(f"--spec {tmp_path}/runs/{r}/spec.json" for r in runs)  # the planner's (a job reads no suite)
    command = f"kdbench pack {specs} --log {tmp_path}/runs/packs/{pack_id}.log"  # the rules never `> {log}`
    assert command in log
    assert "--fuse" not in log and " distill --" not in log and "pack --suite" not in log
    fused_file = write_suite(tmp_path / "fused.yaml", tmp_path / "data", pack={"size": 2, "fuse": True})
    fused = snakemake(tmp_path, "-n", "-p", "--config", f"suite_file={fused_file}", env=subprocess_env)
    assert fused.returncode == 0 and f"pack --fuse --spec {tmp_path}/runs/" in fused.stdout + fused.stderr


def test_slurm_profile_dry_runs_the_paper_suite_packed(tmp_path, subprocess_env):
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.fail("the SLURM profile needs the executor plugin: pip install snakemake-executor-plugin-slurm")
    done = snakemake(tmp_path, "-n", "--workflow-profile", str(REPO / "workflow/profiles/slurm"),
                     "--config", "suite=paper", "pack_size=12", env=subprocess_env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    suite = load_suite(REPO / "workflow/suites/paper.yaml")
    listed = jobs(log)
    made = {}
    for rule, js in listed.items():
        if rule in ("fit", "fetch_teacher") or rule.startswith("pack_"):  # fetch_teacher: released teachers
            for job in js:
                made.update({o.removeprefix("runs/").removesuffix("/metrics.json"): (rule, job["resources"])
                             for o in job["outputs"]})
    assert set(made) == set(suite.runs)  # every run once, by a pack, fit or fetch_teacher
    packs = {r: js[0]["resources"] for r, js in listed.items() if r.startswith("pack_")}
    packed = {r for runs in suite.packs(12).values() for r in runs}
    assert len(packs) == len(suite.packs(12)) > 100 and len(packed) > 1500
    for res in packs.values():
        assert (res["gpu"], res["cpus_per_task"], res["nodes"]) == ("1", "1", "1")
        assert 15 <= int(res["runtime"]) <= 24 * 60 and 6000 <= int(res["mem_mb"]) <= 16000
        assert "slurm_partition" not in res and "slurm_account" not in res  # the site profile's
    for run_id, (rule, res) in made.items():
        assert (rule == "fetch_teacher") == (suite.runs[run_id].kind == "import")
        assert (rule.startswith("pack_")) == (run_id in packed)
        if run_id.startswith("imagenet/") and rule == "fit":  # DDP runs are never packed
            assert run_id not in packed and res["gpu"] == "4"


def test_packed_pipeline_runs_and_switching_packing_retrains_nothing(tmp_path, subprocess_env):
    """Teacher and plain students by rule fit, the KD/FitNet runs and one that diverges (lr 1e12,
    status failed) in packs; then the same DAG unpacked has nothing to do."""
    diverge = {"name": "diverge", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["kd"],
               "seeds": [0], "recipe": {"epochs": 2, "lr": 1e12}, "teacher_recipe": {"epochs": 2}}
    main = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]],
            "methods": ["student", "kd", "fitnet"], "seeds": [0, 1]}
    suite_file = write_suite(tmp_path / "tiny.yaml", tmp_path / "data", experiments=[main, diverge],
                             tables=[{"name": n, "experiments": [n]} for n in ("main", "diverge")])
    suite = load_suite(suite_file)
    assert [len(v) for v in suite.packs(3).values()] == [2, 3]
    done = snakemake(tmp_path, "--cores", "2", "-p", "--config", f"suite_file={suite_file}", "pack_size=3",
                     env=subprocess_env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert log.count("kdbench pack --spec") == 2 and " distill --" not in log
    for run_id, run in suite.runs.items():
        m = json.loads((tmp_path / "runs" / run_id / "metrics.json").read_text())
        diverged = run_id in suite.experiment_runs["diverge"] and run.kind == "distill"
        assert m["status"] == ("failed" if diverged else "ok")
    assert len(list((tmp_path / "runs/packs").glob("*.log"))) == 2
    runs = pd.read_csv(tmp_path / "results/tiny/runs.csv")
    assert (runs.status == "failed").sum() == 1 and "failed" in (tmp_path / "results/tiny/diverge.md").read_text()

    # same outputs, same folders: packing off (or on again) leaves nothing to do
    for extra in ([], ["pack_size=3"]):
        dry = snakemake(tmp_path, "-n", "--rerun-triggers", "mtime", "input", "--config", f"suite_file={suite_file}",
                        *extra, env=subprocess_env)
        assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-2000:]


def test_a_run_that_errors_leaves_the_rest_of_its_pack_trained(tmp_path, tiny, subprocess_env):
    """One run's checkpoint is corrupt: the other trains, `kdbench pack` fails, Snakemake removes
    the pack's metrics.json but the trained run's checkpoint stays, and the next snakemake (after
    the fix) restores its metrics.json without training it again."""
    exp = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["kd"], "seeds": [0, 1],
           "teacher_checkpoints": {"resnet8": str(tiny / "t.pt")}}
    suite_file = write_suite(tmp_path / "s.yaml", tmp_path / "data", experiments=[exp])
    cfg = yaml.safe_load(suite_file.read_text())
    cfg["datasets"]["cifar100"] = {"root": str(tiny / "data")}
    suite_file.write_text(yaml.safe_dump(cfg))
    good, bad = sorted(load_suite(suite_file).runs)
    (tmp_path / "runs" / bad).mkdir(parents=True)
    (tmp_path / "runs" / bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    args = ("--cores", "1", "--config", f"suite_file={suite_file}", "pack_size=2")

    failed = snakemake(tmp_path, *args, env=subprocess_env)
    assert failed.returncode != 0
    assert "Removing output files of failed job pack_" in failed.stdout + failed.stderr
    trained = tmp_path / "runs" / good / "checkpoint.pt"
    assert trained.is_file() and (tmp_path / "runs" / good / "model.pt").is_file()
    assert not (tmp_path / "runs" / good / "metrics.json").exists()
    stamp = trained.stat().st_mtime_ns

    (tmp_path / "runs" / bad / "checkpoint.pt").unlink()
    again = snakemake(tmp_path, *args, env=subprocess_env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert trained.stat().st_mtime_ns == stamp  # complete: not one epoch retrained
    for r in (good, bad):
        assert json.loads((tmp_path / "runs" / r / "metrics.json").read_text())["status"] == "ok"
