"""Figures (PNG) and the kernel-gap records they read, from run records written in a tmp dir."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.image import imread

from kdbench.data import load_dataset
from kdbench.data.cifar import write_cifar
from kdbench.data.synthetic import make_synthetic
from kdbench.engine.checkpoint import save_model
from kdbench.core.spec import RunSpec
from kdbench.models import build_model
from kdbench.report import figures
from kdbench.report import paper_tables as pt
from kdbench.commands.diagnostics import diagnose
from kdbench.planning.suite import load_suite

KD = {0: 71.0, 1: 72.0, 2: 71.5}
FKD = {0: 72.0, 1: 73.5, 2: 72.8}
STUDENT = {0: 70.0, 1: 70.8, 2: 70.2}
GAP = {"student": 0.8, "rkd": 0.6, "kd": 0.4, "kda_before": 0.2, "kda_after": 0.25}  # + 0.01·seed, pooled; x1.1 logits


def suite_file(tmp_path: Path) -> Path:
    exp = {"dataset": "cifar100", "pairs": [["vgg8", "vgg8"]], "methods": ["student", "kd", "fkd"], "seeds": [0, 1, 2]}
    cfg = {"name": "fig", "device": "cpu", "runs_dir": str(tmp_path / "runs"),
           "datasets": {"cifar100": {"root": str(tmp_path / "data")}},
           "experiments": [{**exp, "name": "e1", "teacher_seeds": [100]}, {**exp, "name": "e2", "teacher_seeds": [100, 101]},
                           {"name": "kda", "dataset": "cifar100", "pairs": [["ResNet34", "ResNet18"]],
                            "methods": ["student", "rkd", "kd", "kda_before", "kda_after"], "seeds": [0, 1]}],
           "tables": [
               {"name": "fig4", "experiments": ["e1", "e2"], "reference": "kd",
                "published": {"paper": "he2022_fkd", "metric": "top1_acc_pct_read_from_figure"},
                "rows": {"KD": "kd", "FKD": "fkd", "Teacher ensemble (averaged probabilities)": "teacher_ensemble",
                         "Student (no distillation)": {"column": "student", "published": {
                             "table": "Figure 4 (undistilled student line)", "teacher": "-"}}},
                "groups": [{"label": f"E={e}", "experiments": [f"e{e}"], "x": e, "published": {
                    "table": f"Figure 4 (ensemble size E={e})", "teacher": f"vgg8 x{e} (ensemble)"}} for e in (1, 2)],
                "figure": {"kind": "lines", "xlabel": "E", "ylabel": "accuracy", "log2_x": True}},
               {"name": "fig3", "experiments": ["kda"], "published": {"paper": "qian2020_kda_v1"},
                "rows": {"Baseline (no distillation)": "student", "RKD": "rkd", "KD": "kd", "KDA": "kda_before"},
                "groups": [{"label": "before FC", "metric": "kernel_gap_pooled", "published": {
                               "table": "Figure 3 (layer before FC)", "teacher": "ResNet34 (assumed)", "student": "ResNet18 (assumed)"}},
                           {"label": "after FC", "metric": "kernel_gap_logits", "rows": {"KDA": "kda_after"}, "published": {
                               "table": "Figure 3 (layer after FC)", "teacher": "ResNet34 (assumed)", "student": "ResNet18 (assumed)"}}],
                "figure": {"kind": "bars", "ylabel": "fraction"}}]}
    path = tmp_path / "fig.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_json(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj))


@pytest.fixture
def fig_suite(tmp_path):
    suite = load_suite(suite_file(tmp_path))
    acc = {"kd": KD, "fkd": FKD, "student": STUDENT}
    for c in suite.cells:
        if c.experiment in ("e1", "e2"):
            v = acc.get(c.column, {}).get(c.seed, 75.0)
        else:
            v = 60.0
        write_json(f"{suite.run_dir(c.run)}/metrics.json", {"status": "ok", "acc_last": v, "acc_best": v})
    for path, (run, teachers) in pt.diagnostic_targets(suite).items():  # kernel-gap records, by hand
        cell = next(c for c in suite.cells if c.run == run)
        g = GAP.get(cell.column, 0.0) + 0.01 * cell.seed
        write_json(path, {"status": "ok", "kernel_gap": {"pooled": g, "logits": 1.1 * g},
                          "teacher": {"members": len(teachers), "top1": 74.0 + len(teachers), "top5": 99.0}})
    return suite


def test_diagnostic_targets_are_the_cells_the_figures_read(fig_suite):
    targets = pt.diagnostic_targets(fig_suite)
    ensembles = [t for r, t in targets.values() if fig_suite.runs[r].spec.student == "vgg8"]
    assert sorted(map(len, ensembles)) == [1, 2]  # one teacher-ensemble record per group
    kda = {fig_suite.runs[r].spec.method for r, _ in targets.values() if fig_suite.runs[r].spec.student == "ResNet18"}
    assert kda == {"student", "rkd", "kd", "kda_before", "kda_after"} and len(targets) == 2 + 5 * 2


def test_figure_tables_read_run_and_kernel_gap_records(fig_suite):
    specs = {s.name: s for s in pt.table_specs(fig_suite)}
    fig4 = pt.compute(specs["fig4"], fig_suite)
    assert math.isclose(fig4.cell("FKD", "E=2").mean, np.mean(list(FKD.values())))
    assert fig4.cell("Teacher ensemble (averaged probabilities)", "E=2").values == {0: 76.0}  # 74 + 2 members
    assert fig4.cell("Student (no distillation)", "E=1").published == 70.55
    fig3 = pt.compute(specs["fig3"], fig_suite)
    after = fig3.cell("KDA", "after FC")
    assert after.column == "kda_after" and math.isclose(after.mean, 1.1 * (0.25 + 0.005)) and after.published == 0.20
    assert math.isclose(fig3.cell("RKD", "before FC").mean, 0.605) and fig3.cell("RKD", "before FC").published == 0.61


def test_figures_are_written_as_png(fig_suite, tmp_path):
    paths = figures.write_figures(fig_suite, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["fig3.png", "fig3_forest.png", "fig4.png", "fig4_forest.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(p)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.05  # a drawn, non-blank image
    assert figures.main(["--suite", str(fig_suite.path), "--out", str(tmp_path / "cli"), "--table", "fig3"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["fig3.png", "fig3_forest.png"]


def test_fig4_draws_dodged_error_bars_and_clips_no_interval(fig_suite):
    """FKD Fig. 4: error bars (no overlapping bands), each row's points moved sideways so no two
    bars share an x, and an axis that holds every interval whole (a 3-seed CI can pass 100%)."""
    from matplotlib.collections import PolyCollection
    wide = {0: 60.0, 1: 99.9, 2: 80.0}  # 95% CI ≈ 79.97 ± 49.5: beyond 100
    for c in fig_suite.cells:
        if c.experiment == "e2" and c.column == "fkd":
            write_json(f"{fig_suite.run_dir(c.run)}/metrics.json", {"status": "ok", "acc_last": wide[c.seed]})
    res = pt.compute(next(s for s in pt.table_specs(fig_suite) if s.name == "fig4"), fig_suite)
    fig = figures.figure(res)
    ax = fig.axes[0]
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # no fill_between bands
    lo, hi = ax.get_ylim()
    cells = [c for c in res.cells if c.n >= 2]
    assert lo <= min(c.lo for c in cells) and hi >= max(c.hi for c in cells) > 100
    xs = [tuple(line.get_xdata()) for line in ax.get_lines() if len(line.get_xdata()) == 2 and line.get_linestyle() == "-"]
    assert len(xs) >= 3 and len(set(xs)) == len(xs)  # every row at its own x positions


def test_missing_kernel_gap_record_counts_as_missing(fig_suite):
    spec = next(s for s in pt.table_specs(fig_suite) if s.name == "fig3")
    victim = next(p for p, (r, _) in pt.diagnostic_targets(fig_suite).items() if fig_suite.runs[r].spec.method == "rkd")
    Path(victim).unlink()
    cell = pt.compute(spec, fig_suite).cell("RKD", "before FC")
    assert (cell.n, cell.n_missing) == (1, 1)


# ---------------------------------------------------------------- kernel-gap records from real models

def save_run(folder: Path, arch: str, seed: int, data_root: Path):
    torch.manual_seed(seed)
    model = build_model(arch, 4)
    save_model(folder / "model.pt", model, arch, 4, "cifar100")
    spec = RunSpec("cifar100", str(data_root), arch, "student", seed)
    write_json(folder / "metrics.json", {"status": "ok", "spec": spec.to_dict()})
    return model.eval()


def test_kernel_gap_record_equals_numpy_kernels(tmp_path):
    train, test = make_synthetic(classes=4, train_per_class=2, test_per_class=10, seed=1)
    write_cifar(tmp_path / "data", "cifar100", train, test)
    student = save_run(tmp_path / "s", "resnet8", 0, tmp_path / "data")
    teachers = [save_run(tmp_path / f"t{i}", "resnet14", 10 + i, tmp_path / "data") for i in range(2)]
    _, loader = load_dataset("cifar100", str(tmp_path / "data")).loaders(64, 64, "cpu")
    x, y, _ = next(loader.batches())
    with torch.no_grad():
        s, ts = student(x), [t(x) for t in teachers]

    def frac(fs, fts):  # ‖K_S − mean_e K_Te‖_F / ‖mean_e K_Te‖_F with K = F Fᵀ, in float64 numpy
        ks = fs.double().numpy() @ fs.double().numpy().T
        kt = np.mean([f.double().numpy() @ f.double().numpy().T for f in fts], axis=0)
        return np.linalg.norm(ks - kt) / np.linalg.norm(kt)

    one = diagnose(tmp_path / "s", [str(tmp_path / "t0")], "cpu")
    assert one["status"] == "ok" and one["n_samples"] == 40
    assert math.isclose(one["kernel_gap"]["pooled"], frac(s.pooled, [ts[0].pooled]), rel_tol=1e-6)
    assert math.isclose(one["kernel_gap"]["logits"], frac(s.logits, [ts[0].logits]), rel_tol=1e-6)
    assert math.isclose(one["student"]["top1"], 100 * (s.logits.argmax(1) == y).double().mean().item())
    both = diagnose(tmp_path / "s", [str(tmp_path / "t0"), str(tmp_path / "t1") + "/model.pt"], "cpu")
    assert math.isclose(both["kernel_gap"]["pooled"], frac(s.pooled, [t.pooled for t in ts]), rel_tol=1e-6)
    probs = torch.stack([t.logits.softmax(1) for t in ts]).mean(0)
    assert math.isclose(both["teacher"]["top1"], 100 * (probs.argmax(1) == y).double().mean().item())
    write_json(tmp_path / "s/metrics.json", {"status": "failed", "failure": "non-finite loss"})
    assert diagnose(tmp_path / "s", [str(tmp_path / "t0")], "cpu")["status"] == "skipped"


def test_paper_forest_rows_are_the_table_comparisons_with_published_deltas(fig_suite):
    res = pt.compute(next(s for s in pt.table_specs(fig_suite) if s.name == "fig4"), fig_suite)
    rows = {(r.label, r.group): r for r in figures.paper_forest_rows(res)}
    fkd = rows[("FKD − KD [exploratory]", "E=1")]
    d = np.array([FKD[s] - KD[s] for s in range(3)])
    assert fkd.n == 3 and math.isclose(fkd.diff, d.mean()) and math.isclose(fkd.sd, d.std(ddof=1))
    pub = {c.row: c.published for c in res.cells if c.group == "E=1"}
    assert len(fkd.published) == 1 and math.isclose(fkd.published[0], pub["FKD"] - pub["KD"])
    comp = next(c for c in res.comparisons if (c.a, c.group) == ("FKD", "E=1"))
    assert fkd.p_adj == comp.p_adj and fkd.correction == comp.correction
    assert all("Teacher ensemble" not in label for label, _ in rows)  # an unpaired column is not compared
