"""The dress rehearsal (kdbench/planning/rehearsal.py, benchmarks/rehearsal.py).

The plan tests derive the expected cells from the real suite (every distinct experiment ×
dataset × pair × method × protocol) and check that its rehearsal keeps each one, once, cut to a
few steps on synthetic data, under run ids of its own. The cluster test runs a slice (FKD Table 1:
cross-dataset teachers, STL-10's unlabelled stream, CIFAR-10 / STL-10 / Tiny-ImageNet files)
end to end on the fake SLURM cluster: every cell trains, checkpoints, lands in its table cell;
one run killed after its first checkpoint (its process, as a lost node) is retried by rule fit and
resumes; the tables say REHEARSAL.
"""

import csv
import importlib.util
import json
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from kdbench.core.spec import RunSpec, run_id
from kdbench.planning.checks import SuiteError
from kdbench.planning.rehearsal import MARK, NOTE
from kdbench.planning.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "workflow/suites"


def rehearsal_file(tmp_path, suite: str, **options) -> Path:
    path = tmp_path / f"rehearsal_{suite}.yaml"
    path.write_text(yaml.safe_dump({"name": "rehearsal", "device": "cpu", "include": [str(SUITES / f"{suite}.yaml")],
                                    "rehearsal": options}))
    return path


def protocol(suite, run) -> tuple:
    """What a cell's run does beyond its names: its kind (a released teacher is trained in a
    rehearsal), cross-dataset teacher, unlabelled stream, teacher count (an ensemble) and the
    probed model's architecture."""
    s = run.spec
    if run.kind == "import":
        return "train", s.teacher_dataset, False, 0, s.student, "fit"
    return run.kind, s.teacher_dataset, s.unlabeled is not None, len(s.teacher_ckpts), s.student, s.protocol


def cells(suite) -> dict[tuple, dict]:
    """(experiment, dataset, teacher, student, column) -> {protocols, seeds} of the suite."""
    out = {}
    for c in suite.cells:
        entry = out.setdefault((c.experiment, c.dataset, c.teacher, c.student, c.column), {"protocols": set(), "seeds": set()})
        entry["protocols"].add(protocol(suite, suite.runs[c.run]))
        entry["seeds"].add(c.seed)
    return out


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rehearsal")
    return load_suite(SUITES / "paper.yaml"), load_suite(rehearsal_file(tmp, "paper"))


def test_every_cell_of_the_paper_suite_is_kept_once_with_its_protocol(paper):
    real, rehearsal = paper
    want, got = cells(real), cells(rehearsal)
    assert set(got) == set(want) and len(want) == 467  # every dataset x pair x method (and probe, ensemble)
    teacher_seeds = {}
    for key, cell in want.items():
        assert got[key]["protocols"] == cell["protocols"], key
        if key[-1] == "teacher":  # an ensemble's members all stay; a released teacher is seed 0 either way
            teacher_seeds[key] = cell["seeds"]
            assert got[key]["seeds"] == cell["seeds"], key
        else:
            assert got[key]["seeds"] == {min(cell["seeds"])}, key
    assert max(len(s) for s in teacher_seeds.values()) == 8  # FKD Fig. 4's E = 8
    kinds = {r.kind for r in rehearsal.runs.values()}
    assert kinds == {"train", "distill", "probe"}  # no download: released teachers are trained
    assert any(r.spec.unlabeled for r in rehearsal.runs.values())
    assert {r.spec.dataset for r in rehearsal.runs.values()} == {r.spec.dataset for r in real.runs.values()}


def test_rehearsal_runs_have_their_own_ids_synthetic_data_and_a_few_steps(paper):
    real, rehearsal = paper
    assert not set(real.runs) & set(rehearsal.runs)
    assert all(r.spec.rehearsal for r in rehearsal.runs.values()) and not any(r.spec.rehearsal for r in real.runs.values())
    # a teacher 32 epochs (64 updates of its BN statistics: a deep net distils from it in eval mode),
    # every other run 2
    teachers = {t for r in rehearsal.runs.values() if r.kind == "distill" for t in r.needs}
    assert len(teachers) == 19
    for r in rehearsal.runs.values():
        assert run_id(r.spec) == r.id  # the flag is hashed
        epochs = 32 if r.id in teachers else 2
        assert r.spec.recipe.epochs == epochs and r.spec.recipe.batch_size == 8, r.id
        assert all(m < epochs for m in r.spec.recipe.milestones) and r.spec.recipe.warmup_epochs <= 1, r.id
        assert r.spec.data_root == f"data/rehearsal/{r.spec.dataset}"
    datasets = rehearsal.config["datasets"]
    assert all(d["synthetic"] == {"classes": 4, "train_per_class": 4, "test_per_class": 2, "seed": 0}
               for d in datasets.values())
    # 16 training images at batch 8: 2 steps an epoch, 4 per run; stages and warm-ups cut to 1 epoch,
    # CRD's negatives to the 3 x 4 other-class images, STL-10's unlabelled batch to 8
    params = {r.method.name: r.method.params for r in rehearsal.runs.values() if r.method}
    assert params["ab"]["ab"]["init_epochs"] == params["ft"]["ft"]["init_epochs"] == 1
    assert params["fsp"]["fsp"]["init_epochs"] == params["dkd"]["dkd"]["warmup"] == 1
    assert params["kda_before"]["kda"]["warmup_epochs"] == params["kda_after"]["kda_logits"]["warmup_epochs"] == 1
    assert params["crd"]["crd"]["nce_k"] == 12
    assert {r.spec.unlabeled["batch_size"] for r in rehearsal.runs.values() if r.spec.unlabeled} == {8}
    kda = next(r for r in rehearsal.runs.values() if r.spec.recipe.schedule == "cosine" and r.id not in teachers)
    assert kda.spec.recipe.warmup_epochs == 1 and kda.spec.recipe.milestones == (1,)
    # every learning rate a tenth of its real run's (a deep teacher's 4 steps at the paper's lr
    # diverge: resnet110's eval features reach ~1e7, and CC, FT, FSP, VID on them are NaN)
    def rates(suite):
        out = {}
        for r in suite.runs.values():
            s = r.spec
            out.setdefault((r.kind, s.dataset, s.teacher, s.student, s.method), set()).add((s.recipe.lr, s.recipe.small_lr))
        return out
    real_rates, rates_here = rates(real), rates(rehearsal)
    trained_here = {k for k in rates_here if k not in real_rates}  # the released (imported) teachers, trained here
    assert trained_here == {("train", *k[1:]) for k in real_rates if k[0] == "import"}
    for key, got in rates_here.items():
        if key in trained_here:
            continue
        assert {(round(lr, 9), round(small, 9)) for lr, small in got} <= \
            {(round(lr / 10, 9), round(small / 10, 9)) for lr, small in real_rates[key]}, key
    assert {lr for v in rates_here.values() for lr, _ in v} >= {0.005, 0.01}  # CIFAR 0.05, ImageNet 0.1


def test_real_run_ids_do_not_change():
    """The flag enters the hash only when set: a spec without it hashes as before (the committed
    results/example names the default suite's runs)."""
    spec = RunSpec("cifar100", "data/x", "resnet8", seed=3)
    assert spec.config_hash() != replace(spec, rehearsal=True).config_hash()
    example = {row["run"] for row in csv.DictReader(open(REPO / "results/example/runs.csv"))}
    assert example <= set(load_suite(SUITES / "smoke.yaml").runs)


def test_every_table_and_figure_says_rehearsal(paper):
    _, rehearsal = paper
    tables = rehearsal.config["tables"]
    assert len(tables) == 14 and all(t["caption"].startswith(NOTE) for t in tables)
    assert all(t["figure"]["title"].startswith(MARK) for t in tables if t.get("figure"))


def test_a_slice_keeps_its_tables_experiments_and_bad_options_name_the_valid_ones(tmp_path):
    sliced = load_suite(rehearsal_file(tmp_path, "fkd", tables=["fkd_table1"]))
    assert {t["name"] for t in sliced.config["tables"]} == {"fkd_table1"}
    assert set(sliced.experiment_runs) == {"fkd_table1_cifar10", "fkd_table1_stl10", "fkd_table1_tinyimagenet"}
    assert set(sliced.config["datasets"]) == {"cifar100", "cifar10", "stl10", "tinyimagenet"}
    with pytest.raises(SuiteError, match="fkd_tabel1 is no table of this suite; valid: fkd_table2, fkd_fig4"):
        load_suite(rehearsal_file(tmp_path, "fkd", tables=["fkd_tabel1"]))
    with pytest.raises(SuiteError, match="rehearsal: .*allowed keys here: epochs, teacher_epochs, batch_size"):
        load_suite(rehearsal_file(tmp_path, "fkd", epoch=1))


def _bench():
    spec = importlib.util.spec_from_file_location("rehearsal_bench", REPO / "benchmarks/rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kill_after_first_checkpoint(run_dir: Path, stop: threading.Event, killed: list) -> None:
    """SIGKILL the process training ``run_dir`` once its first checkpoint.pt exists (a node lost
    mid-run): found by its spec path in /proc, a process this test started."""
    spec = f"{run_dir.name}/spec.json"
    while not stop.is_set() and not killed:
        if (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.json").exists():
            for proc in Path("/proc").iterdir():
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if "kdbench" in cmd and spec in cmd and "snakemake" not in cmd:
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(cmd)
        time.sleep(0.02)


def test_a_slice_runs_end_to_end_on_the_fake_cluster_into_its_rehearsal_tables(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    bench = _bench()
    work = tmp_path / "work"
    options = {"tables": ["fkd_table1"]}
    suite = load_suite(bench.write_rehearsal_suite(work, str(SUITES / "fkd.yaml"), options))
    real = load_suite(SUITES / "fkd.yaml")
    teacher = next(r for r in suite.runs.values() if r.kind == "train" and r.spec.student == "vgg13")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_after_first_checkpoint, args=(work / "runs" / teacher.id, stop, killed))
    killer.start()
    try:
        report = bench.rehearse(str(SUITES / "fkd.yaml"), work, tmp_path / "results", jobs=2, pack_size=32,
                                options=options, timeout=900)
    finally:
        stop.set()
        killer.join()
    log = Path(report["log"]).read_text()
    assert report["rc"] == 0, log[-4000:]
    assert killed, "the teacher was never caught between its first checkpoint and its end"
    # rule fit's retry (in its job, or a new submission) resumed it from its checkpoint: its log,
    # rewritten by the retry, starts after epoch 1 and ends at the teacher's last epoch (32)
    teacher_log = (work / "runs" / teacher.id / "log.txt").read_text()
    E = teacher.spec.recipe.epochs
    logged = [int(n) for n in re.findall(rf"main (\d+)/{E} ", teacher_log)]
    assert E == 32 and logged and min(logged) >= 2 and max(logged) == E, teacher_log
    # every cell, derived from the real suite's table: constructed, stepped, checkpointed, in its table cell
    want = {k for k in cells(real) if k[0] in suite.experiment_runs}
    assert set(cells(suite)) == want and len(want) == 15  # 3 target sets x (teacher, student, RKD, SP, FKD)
    for run in suite.runs.values():
        folder = work / "runs" / run.id
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["epochs_done"] == run.spec.recipe.epochs, run.id
        assert (folder / "checkpoint.pt").exists() and (folder / "model.pt").exists(), run.id
    table = {(r["group"], r["row"]): r for r in csv.DictReader(open(tmp_path / "results/paper/fkd_table1_cells.csv"))}
    labels = {"student": "Student", "rkd": "RKD", "sp": "SP", "fkd": "FKD"}
    groups = {"fkd_table1_cifar10": "CIFAR-10", "fkd_table1_stl10": "STL-10", "fkd_table1_tinyimagenet": "Tiny-ImageNet"}
    for exp, _, _, _, column in want - {k for k in want if k[-1] == "teacher"}:
        assert int(float(table[(groups[exp], labels[column])]["n"])) == 1, (exp, column)
    page = (tmp_path / "results/paper/fkd_table1.md").read_text()
    assert page.startswith(f"**{NOTE}**")
    assert (tmp_path / "results/fkd_table1.md").read_text().startswith(f"**{NOTE}**")
    assert report["overhead_median_s"] > 0 and report["training_jobs"] == report["distinct_jobs"]
