"""``kdbench plan`` (kdbench/planning/cost.py, kdbench/commands/plan.py): runs and training steps
recounted independently of the planner (from the resolved runs, the official dataset sizes and
the methods' initialisation stages written out here), golden counts worked by hand, the real
loaders' batch counts, per-GPU hours that count DDP processes, and measured vs modelled costs."""

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from conftest import REPO, child_env
from kdbench.commands.plan import plan, suite_path
from kdbench.core.spec import PROBE_RECIPE
from kdbench.methods import resolve_method
from kdbench.planning import cost
from kdbench.planning.suite import load_suite

#: the official training-set sizes (the datasets' own documentation), and synthetic sets' sizes
TRAIN = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257, "stl10": 5000, "tinyimagenet": 100000,
         "tinyimagenet64": 100000, "imagenet": 1281167}
#: terms with an initialisation stage and its published length (RepDistiller: 30 epochs); FitNet's
#: hint stage is ``hint_epochs`` (default 0)
INIT = {"ab": ("init_epochs", 30), "ft": ("init_epochs", 30), "fsp": ("init_epochs", 30), "fitnet": ("hint_epochs", 0)}


@pytest.fixture(scope="module")
def smoke():
    return load_suite(REPO / "workflow/suites/smoke.yaml")


@pytest.fixture(scope="module")
def paper():
    return load_suite(REPO / "workflow/suites/paper.yaml")


def flat_flops(arch, classes, size):
    """A stand-in for the FLOP counter: 1 GFLOP per image for every model (no torch work)."""
    return 1e9


def recount(suite, run, ddp=4):
    """(processes, training steps) of ``run``, written out from the suite's file and the sizes above."""
    s = run.spec
    syn = (suite.config["datasets"][s.dataset] or {}).get("synthetic")
    n = syn["classes"] * syn["train_per_class"] if syn else TRAIN[s.dataset]
    if s.validation:
        n -= s.validation["size"]
    procs = ddp if s.dataset == "imagenet" else 1
    if run.kind == "import":
        return 1, 0
    batch = s.recipe.batch_size
    per_epoch = n // batch + (n % batch >= procs)  # a last global batch smaller than the processes is dropped
    if run.kind == "probe":
        assert s.recipe.epochs == PROBE_RECIPE["epochs"]
        return procs, s.recipe.epochs * per_epoch
    method = resolve_method(s.method, s.method_overrides)
    init = sum(method.params.get(t, {}).get(*INIT[t]) for t in method.terms if t in INIT)
    return procs, (init + s.recipe.epochs) * per_epoch


def test_steps_per_epoch_is_the_loaders_length():
    """Against the real loaders (one process and DDP shards), at random sizes."""
    from kdbench.data.loader import TensorLoader
    from kdbench.data.sharded import ShardedTensorLoader

    rng = random.Random(0)
    for _ in range(40):
        n, batch, procs = rng.randint(1, 300), rng.randint(1, 70), rng.choice([1, 2, 3, 4, 8])
        if batch < procs:
            continue
        x, y = np.zeros((n, 2, 2, 3), np.uint8), np.arange(n) % 3
        if procs == 1:
            assert cost.steps_per_epoch(n, batch) == len(TensorLoader(x, y, (0,) * 3, (1,) * 3, batch, True)), (n, batch)
        for rank in range(procs):
            loader = ShardedTensorLoader(x, y, (0,) * 3, (1,) * 3, batch, True, rank=rank, world_size=procs)
            assert cost.steps_per_epoch(n, batch, procs) == len(loader), (n, batch, procs, rank)


def test_smoke_golden_counts(smoke):
    """By hand: 600 training images (20 classes × 30) at batch 64 = 10 steps per epoch (9 full + 24).
    ``main``: the 30-epoch resnet20 teacher (300) + 7 students and 7 KD distillations of 30 epochs
    (14 × 300) = 15 runs, 4,500 steps, none shared (``methods`` has a resnet14 teacher).
    ``methods``: the 5-epoch resnet14 teacher (50), a 3-epoch student (30), 40 distillations of 3
    epochs (1,200) of which AB/FT/FSP and their +KD add a 1-epoch init stage (6 × 10) = 42 runs,
    1,340 steps. ``fig4_e2`` adds teacher seed 1 (50), student seed 1 (30), kd and fkd × 2 seeds
    (4 × 30): 63 runs, 4,500 + 1,340 + 200 = 6,040 steps in all."""
    p = plan(smoke, "h100", 8)
    main, methods, total = p["tables"]["main"], p["tables"]["methods"], p["total"]
    assert (main["runs"], main["by_kind"]["train"], main["by_kind"]["distill"], main["steps"]) == (15, 8, 7, 4500)
    assert main["shared"] == 0
    assert (methods["runs"], methods["by_kind"]["train"], methods["steps"]) == (42, 2, 1340)
    assert (total["runs"], total["by_kind"]["train"], total["by_kind"]["distill"], total["steps"]) == (63, 12, 51, 6040)
    assert "(in no table)" not in p["tables"]


def test_crd_table1_golden_counts(paper):
    """By hand from crd.yaml: 6 pairs × 15 methods and wrn_40_2 → wrn_40_1 × 14 (no FSP), 5 seeds;
    released teachers: 5 imports (wrn_40_2, resnet56, resnet110, resnet32x4, vgg13); plain students:
    6 architectures × 5 seeds = 30; distillations: (6 × 14 + 13) × 5 = 485; 520 runs. Steps: 782
    per epoch (50,000 / 64), 240 epochs = 187,680 per run, + 30 init epochs (23,460) for AB, FT and
    FSP: (6 × 3 + 2) × 5 = 100 runs: 515 × 187,680 + 100 × 23,460 = 99,001,200."""
    t = plan(paper, "h100", 8, tables=["crd_table1"])["tables"]["crd_table1"]
    assert t["by_kind"] == {"train": 30, "distill": 485, "probe": 0, "import": 5}
    assert t["steps"] == 99_001_200


@pytest.mark.parametrize("name", ["smoke", "paper"])
def test_plan_matches_an_independent_recount(name, smoke, paper):
    """Every run's steps and processes, every table's and the total's, recounted from the suite."""
    suite = {"smoke": smoke, "paper": paper}[name]
    p = plan(suite, "h100", 8)
    counted = {rid: recount(suite, run) for rid, run in suite.runs.items()}
    for rid, run in suite.runs.items():
        rp = cost.run_plan(suite, run)
        assert (rp.nproc, rp.steps) == counted[rid], rid
    total = p["total"]
    assert total["runs"] == len(suite.runs)
    assert total["steps"] == sum(steps for _, steps in counted.values())
    for kind in ("train", "distill", "probe", "import"):
        assert total["by_kind"][kind] == sum(r.kind == kind for r in suite.runs.values())
    tables = {t["name"]: t for t in suite.config["tables"]}
    for tname, row in p["tables"].items():
        ids = {r for e in tables[tname]["experiments"] for r in suite.experiment_runs[e]}
        ids |= {n for r in ids for n in suite.runs[r].needs}  # a probe's model, a student's teacher
        assert row["runs"] == len(ids), tname
        assert row["steps"] == sum(counted[r][1] for r in ids), tname


def test_paper_imagenet_runs_count_each_process(paper):
    """ImageNet's runs are 4-process DDP: 100 epochs × 5,005 global batches of 256 (1,281,167
    images: the last batch of 143 is kept), and 4 GPU-hours per wall hour."""
    runs = [r for r in paper.runs.values() if r.spec.dataset == "imagenet" and r.kind != "import"]
    assert len(runs) == 27
    for run in runs:
        c = cost.run_cost(paper, run, cost.run_plan(paper, run), cost.GPUS["h100"], flops=flat_flops)
        assert (c.plan.nproc, c.plan.steps) == (4, 500_500)
        assert c.gpu_hours == pytest.approx(4 * c.wall_s / 3600)
    t = plan(paper, "h100", 8, tables=["ot_imagenet"])["tables"]["ot_imagenet"]
    assert t["max_processes"] == 4


@pytest.mark.parametrize("procs", [1, 2, 4, 8])
def test_ddp_gpu_hours_by_hand(paper, procs):
    """An ImageNet KD run at 1 GFLOP per image forward: per process and step b = 256 / P images,
    3·b (student) + b (teacher) GFLOP at the H100's sustained rate, at least the 4 ms launch floor
    and b / (400 images/s per core × 8 cores per process) of JPEG decoding; a test pass is each
    rank's ceil(50,000 / P) images in batches of 256 (forward only, floor 1.5 ms). Wall = steps ×
    step + 100 test passes; GPU-hours = P × wall."""
    run = next(r for r in paper.runs.values() if r.spec.dataset == "imagenet" and r.spec.method == "kd")
    c = cost.run_cost(paper, run, cost.run_plan(paper, run, ddp_procs=procs), cost.GPUS["h100"], flops=flat_flops)
    sustained, decode = 0.30 * 494.7e12, 400 * 8
    b = 256 / procs
    step = max(4 * b * 1e9 / sustained, 4e-3, b / decode)
    per_rank = math.ceil(50000 / procs)
    full, rest = divmod(per_rank, 256)
    test = full * max(256e9 / sustained, 1.5e-3, 256 / decode) + (max(rest * 1e9 / sustained, 1.5e-3, rest / decode)
                                                                 if rest else 0)
    steps = 100 * (1281167 // 256 + (1281167 % 256 >= procs))
    assert c.plan.nproc == procs
    assert c.wall_s == pytest.approx(steps * step + 100 * test, rel=1e-12)
    assert c.gpu_hours == pytest.approx(procs * c.wall_s / 3600, rel=1e-12)


def test_model_cost_of_a_cifar_distillation_by_hand(smoke):
    """One smoke KD run (10 steps per epoch, 30 epochs, 10,000 test images in batches of 256, tested
    after epochs 10, 20 and 30: test_every 10): each step max(FLOPs / sustained, 4 ms), at 1 GFLOP
    per image; each test pass 39 full batches and one of 16, each max(FLOPs / sustained, 1.5 ms)."""
    run = next(r for r in smoke.runs.values() if r.experiment == "main" and r.spec.method == "kd")
    for gpu, sustained in (("h100", 0.30 * 494.7e12), ("v100", 0.60 * 15.7e12)):
        c = cost.run_cost(smoke, run, cost.run_plan(smoke, run), cost.GPUS[gpu], flops=flat_flops)
        step = max(4 * 64e9 / sustained, 4e-3)
        test = 39 * max(256e9 / sustained, 1.5e-3) + max(16e9 / sustained, 1.5e-3)
        assert c.wall_s == pytest.approx(30 * 10 * step + 3 * test, rel=1e-12), gpu
        assert c.source == "model" and c.measured_steps == 0


def test_wall_time_is_the_packing_lower_bound(smoke):
    """Wall = max(GPU-hours / N, the longest teacher → student chain); a run on more GPUs than
    given is refused, naming the fix."""
    costs = {rid: cost.run_cost(smoke, run, cost.run_plan(smoke, run), cost.GPUS["h100"], flops=flat_flops)
             for rid, run in smoke.runs.items()}
    needs = {rid: run.needs for rid, run in smoke.runs.items()}
    s = cost.summarise(costs, list(smoke.runs), needs)
    teacher = next(r for r in smoke.experiment_runs["main"] if smoke.runs[r].kind == "train"
                   and any(r in run.needs for run in smoke.runs.values()))
    longest_student = max(costs[r].wall_s for r, run in smoke.runs.items() if teacher in run.needs)
    assert s.critical_hours == pytest.approx(max((costs[teacher].wall_s + longest_student) / 3600,
                                                 max(c.wall_s for c in costs.values()) / 3600))
    for gpus in (1, 2, 8, 64, 10_000):
        assert s.wall_hours(gpus) == pytest.approx(max(s.gpu_hours / gpus, s.critical_hours))
    with pytest.raises(ValueError, match="--gpus 4"):
        cost.wall_hours(10.0, 1.0, 4, 2)


def _record(tmp_path, gpu, device_name, sps, pair=("resnet20", "resnet8"), method="kd", dry=False):
    result = {"device": "cuda", "device_name": device_name, "pair": list(pair), "method": method, "batch": 64,
              "engine": {"plain": {"sps": sps}, "fast": {"sps": 10 * (sps if not isinstance(sps, dict) else 1)}}}
    report = {"dry": dry, "steps": {"environment": {"device_name": device_name},
                                    "bench": {"kd": {"returncode": 0, "result": result}, "ok": True}}}
    (tmp_path / f"{gpu}.json").write_text(json.dumps(report))
    return tmp_path


@pytest.mark.parametrize("sps", [250.0, {"min": 200.0, "median": 250.0, "max": 260.0}])
def test_measured_steps_where_a_record_matches(smoke, tmp_path, sps):
    """A record of KD resnet20 → resnet8 at batch 64 costs exactly those runs' main-stage steps (at
    1 / 250 s); every other run, and every test pass, stays the model's."""
    records = _record(tmp_path, "h100", "NVIDIA H100 80GB HBM3", sps)
    measured = cost.device_records("h100", records)
    assert [(m.pair, m.method, m.seconds_per_step) for m in measured] == [(("resnet20", "resnet8"), "kd", 1 / 250)]
    kd = [r for r in smoke.runs.values() if r.spec.method == "kd" and r.spec.teacher == "resnet20"
          and len(r.spec.teacher_ckpts) == 1]
    assert len(kd) == 7  # main's 7 seeds (methods' and fig4_e2's kd distil from resnet14)
    assert measured[0].applies(kd[0], 1, 32) and not measured[0].applies(kd[0], 1, 64)  # 64-px images
    assert not measured[0].applies(kd[0], 2, 32)  # DDP
    for run in smoke.runs.values():
        rp = cost.run_plan(smoke, run)
        model = cost.run_cost(smoke, run, rp, cost.GPUS["h100"], flops=flat_flops)
        got = cost.run_cost(smoke, run, rp, cost.GPUS["h100"], measured, flops=flat_flops)
        if run in kd:
            test_s = model.wall_s - rp.steps * max(4 * 64e9 / cost.GPUS["h100"].sustained_flops, 4e-3)
            assert got.wall_s == pytest.approx(rp.steps / 250 + test_s, rel=1e-12)
            assert got.measured_steps == rp.steps and got.source.startswith("measured")
        else:
            assert (got.wall_s, got.measured_steps, got.source) == (model.wall_s, 0, "model")
    p = plan(smoke, "h100", 8, records_dir=str(records))
    assert p["total"]["measured_steps"] == sum(cost.run_plan(smoke, r).steps for r in kd)
    assert p["records"] == [str(records / "h100.json")]


def test_bad_records_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dry run"):
        cost.device_records("h100", _record(tmp_path, "h100", "cpu", 5.0, dry=True))
    with pytest.raises(ValueError, match="not a a100"):
        cost.device_records("a100", _record(tmp_path, "a100", "NVIDIA H100 80GB HBM3", 5.0))
    (tmp_path / "v100.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        cost.device_records("v100", tmp_path)
    assert cost.device_records("h100", tmp_path / "nowhere") == []


def test_a_hint_stage_is_planned(smoke):
    """FitNet's ``hint_epochs`` is an initialisation stage, as the engine runs it."""
    run = next(r for r in smoke.runs.values() if r.spec.method == "fitnet")
    overrides = {**run.spec.method_overrides, "params": {"fitnet": {"hint_epochs": 2}}}
    hinted = replace(run, spec=replace(run.spec, method_overrides=overrides))
    assert cost.run_plan(smoke, hinted).steps == cost.run_plan(smoke, run).steps + 2 * 10
    assert cost.run_plan(smoke, hinted).steps == recount(smoke, hinted)[1]


def test_forward_flops_counts_and_caches(tmp_path, monkeypatch):
    """resnet8x4 at 32 px (100 classes): 0.354 GFLOP (2 per multiply-add); the second call reads the cache."""
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path))
    cost.forward_flops.cache_clear()
    assert cost.forward_flops("resnet8x4", 100, 32) == pytest.approx(0.354142208e9, rel=1e-6)
    cache = json.loads((tmp_path / "flops.json").read_text())
    key = next(iter(cache))
    cache[key] = 123.0  # a hand-made entry is read back, not recounted
    (tmp_path / "flops.json").write_text(json.dumps(cache))
    cost.forward_flops.cache_clear()
    assert cost.forward_flops("resnet8x4", 100, 32) == 123.0
    cost.forward_flops.cache_clear()


def test_gpu_choices_are_the_models_kinds():
    from kdbench.commands.plan import GPU_KINDS
    assert GPU_KINDS == tuple(cost.GPUS)


def test_suite_names_resolve_as_snakemake_does(tmp_path):
    assert suite_path("paper").resolve() == (REPO / "workflow/suites/paper.yaml").resolve()
    own = tmp_path / "mine.yaml"
    own.write_text("name: x\n")
    assert suite_path(str(own)) == own
    with pytest.raises(SystemExit, match="Suite names: .*paper.*smoke"):
        suite_path("papr")


def test_command_prints_the_plan_and_help_imports_no_torch(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdbench.commands.cli", "plan", "--suite", "smoke", "--gpu", "a100",
                        "--gpus", "2", "--json", str(tmp_path / "p.json")], cwd=tmp_path, env=child_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    total = next(line for line in r.stdout.splitlines() if line.startswith("total"))
    assert total.split()[4:10] == ["63", "12", "51", "0", "0", "42"] and "6,040" in total
    assert "A100" in r.stdout and "every cost is the model's" in r.stdout
    assert json.loads((tmp_path / "p.json").read_text())["total"]["steps"] == 6040
    code = ("import sys\nfrom kdbench.commands.cli import main\ntry:\n    main(['plan', '--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    h = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True)
    assert h.stdout.strip().endswith("False") and "--gpu" in h.stdout, h.stdout + h.stderr
    bad = subprocess.run([sys.executable, "-m", "kdbench.commands.cli", "plan", "--suite", "smoke", "--tables", "nope"],
                         cwd=REPO, env=child_env(), capture_output=True, text=True)
    assert bad.returncode != 0 and "its tables: main, methods" in bad.stderr


def test_a_bench_json_file_is_a_record_too(tmp_path):
    """``kdbench bench --json`` writes {"methods": {method: result}, "grid": ...}: read like gpu_check's."""
    result = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "pair": ["resnet20", "resnet8"],
              "method": "kd", "batch": 64, "engine": {"plain": {"sps": {"min": 90.0, "median": 100.0, "max": 110.0}}}}
    (tmp_path / "h100.json").write_text(json.dumps({"methods": {"kd": result}, "grid": {}}))
    [m] = cost.device_records("h100", tmp_path)
    assert (m.pair, m.method, m.seconds_per_step) == (("resnet20", "resnet8"), "kd", 1 / 100)
