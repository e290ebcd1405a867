"""Packing (kdbench/engine/pack.py): K runs trained together equal the same runs one by one."""

import contextlib
import json
from pathlib import Path

import pytest
import torch

from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.engine.checkpoint import save_model
from kdbench.commands.cli import pack_main as main
from kdbench.engine.pack import PackError, check_packable, fit_packed
from kdbench.core.spec import Execution, Recipe, RunSpec
from kdbench.engine.fit import fit
from kdbench.models import build_model
from kdbench.planning.suite import load_suite

from conftest import FLOAT32_PASS_RTOL, assert_states_close, relative_difference, write_suite

RECIPE = Recipe.from_config({"epochs": 2, "batch_size": 16})


def spec(tiny, method, seed, recipe=RECIPE, **overrides):
    return RunSpec("cifar100", str(tiny / "data"), "resnet8", method, seed, "resnet8",
                   (str(tiny / "t.pt"),) if method != "student" else (), method_overrides=overrides, recipe=recipe)


def strip(metrics):
    """What must agree: everything but wall times and provenance."""
    drop = {"wall_time_s", "seconds_per_epoch", "epoch_seconds", "provenance", "run"}
    return {k: v for k, v in metrics.items() if k not in drop}


def assert_same(a, b, rel):
    assert a.keys() == b.keys()
    for k in a:
        if k in ("curve", "init_curve"):
            assert len(a[k]) == len(b[k])
            for ra, rb in zip(a[k], b[k]):
                for key in ra:
                    if isinstance(ra[key], float):
                        assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-9), (k, key)
                    else:
                        assert rb[key] == ra[key], (k, key)
        elif isinstance(a[k], float):
            assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-9), k
        else:
            assert b[k] == a[k], k


def test_packed_runs_equal_runs_one_by_one(tiny, tmp_path):
    """KD, CRD (feature bank + negatives) and FitNet (teacher stage features), different seeds;
    an AB run with its initialisation stage; a plain student with no teacher at all."""
    specs = [spec(tiny, "kd", 0), spec(tiny, "crd", 1, params={"crd": {"nce_k": 16}}), spec(tiny, "fitnet", 2),
             spec(tiny, "ab", 0, params={"ab": {"init_epochs": 1}}), spec(tiny, "student", 3)]
    alone = [fit(s, tmp_path / f"alone{k}", "cpu", progress=False) for k, s in enumerate(specs)]
    packed = fit_packed(specs, [tmp_path / f"pack{k}" for k in range(len(specs))], "cpu")
    for k, (a, b) in enumerate(zip(alone, packed)):
        # observed bit for bit on CPU; the teacher's convolutions at batch 16·K may round differently
        assert_same(strip(a), strip(b), rel=1e-5)
        on_disk = json.loads((tmp_path / f"pack{k}" / "metrics.json").read_text())
        assert on_disk["status"] == "ok" and on_disk["hash"] == specs[k].config_hash()
        m_a = torch.load(tmp_path / f"alone{k}" / "model.pt", weights_only=True)["state_dict"]
        m_b = torch.load(tmp_path / f"pack{k}" / "model.pt", weights_only=True)["state_dict"]
        for name in m_a:
            torch.testing.assert_close(m_b[name], m_a[name], rtol=1e-5, atol=1e-6)
    assert packed[3]["init_curve"] and not packed[0]["init_curve"]
    # a packed run's checkpoint is fit's: fit finds the run complete and reports the same result
    again = fit(specs[1], tmp_path / "pack1", "cpu", progress=False)
    assert again["acc_last"] == packed[1]["acc_last"] and again["curve"] == packed[1]["curve"]


def test_runs_of_different_lengths_and_the_teacher_cache(tiny, tmp_path):
    long = Recipe.from_config({"epochs": 3, "batch_size": 16})
    specs = [RunSpec("cifar100", str(tiny / "data"), "resnet8", m, s, "resnet8", (str(tiny / "t.pt"),), recipe=r,
                     execution=Execution(teacher_cache="fp32")) for m, s, r in (("kd", 0, RECIPE), ("dkd", 1, long))]
    alone = [fit(s, tmp_path / f"alone{k}", "cpu", progress=False) for k, s in enumerate(specs)]
    packed = fit_packed(specs, [tmp_path / f"pack{k}" for k in range(2)], "cpu")
    assert [len(m["curve"]) for m in packed] == [2, 3]
    for a, b in zip(alone, packed):
        assert_same(strip(a), strip(b), rel=1e-5)


def test_a_failing_run_does_not_stop_the_others(tiny, tmp_path):
    diverges = spec(tiny, "kd", 1, recipe=Recipe.from_config({"epochs": 2, "batch_size": 16, "lr": 1e12}))
    fine = spec(tiny, "kd", 0)
    result = fit_packed([diverges, fine], [tmp_path / "a", tmp_path / "b"], "cpu")
    assert result[0]["status"] == "failed" and "non-finite" in result[0]["failure"]
    assert result[1]["status"] == "ok" and (tmp_path / "b" / "model.pt").exists()
    broken = RunSpec("cifar100", str(tiny / "data"), "resnet8", "kd", 0, "resnet8", (str(tiny / "t.pt"),),
                     method_overrides={"params": {"kd": {"temperature": 4}}}, recipe=RECIPE)
    with pytest.raises(PackError, match="1 of 2 packed runs failed.*temperature"):
        fit_packed([broken, fine], [tmp_path / "c", tmp_path / "d"], "cpu", run_ids=["broken", "fine"])
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["status"] == "ok"


def test_unpackable_runs_are_refused_with_the_reason(tiny, tmp_path):
    torch.manual_seed(1)
    save_model(tmp_path / "t2.pt", build_model("resnet8", 5), "resnet8", 5, "cifar100")
    other_teacher = RunSpec("cifar100", str(tiny / "data"), "resnet8", "kd", 0, "resnet8", (str(tmp_path / "t2.pt"),),
                            recipe=RECIPE)
    with pytest.raises(ValueError, match="must share their teacher"):
        check_packable([spec(tiny, "kd", 0), other_teacher])
    with pytest.raises(ValueError, match="different execution"):
        check_packable([spec(tiny, "kd", 0), RunSpec("cifar100", str(tiny / "data"), "resnet8", "kd", 0, "resnet8",
                                                     (str(tiny / "t.pt"),), recipe=RECIPE,
                                                     execution=Execution(precision="bf16"))])
    with pytest.raises(ValueError, match="batch sizes"):
        check_packable([spec(tiny, "kd", 0), spec(tiny, "kd", 1, recipe=Recipe.from_config({"batch_size": 8}))])
    with pytest.raises(ValueError, match="nothing to pack"):
        check_packable([])
    held_out = RunSpec("cifar100", str(tiny / "data"), "resnet8", "kd", 0, "resnet8", (str(tiny / "t.pt"),),
                       recipe=RECIPE, validation={"size": 10, "seed": 0})
    with pytest.raises(ValueError, match="validation holdout"):
        check_packable([spec(tiny, "kd", 0), held_out])


def test_pack_command_trains_suite_runs(tmp_path):
    suite_file = write_suite(tmp_path / "s.yaml", tmp_path / "data", pack={"size": 2, "fuse": True})  # --fuse: fused ids
    ensure_synthetic("cifar100", str(tmp_path / "data"), {"classes": 5, "train_per_class": 20, "test_per_class": 10, "seed": 0})
    suite = load_suite(suite_file)
    teachers = [r for r in suite.runs.values() if r.kind == "train"]
    for r in teachers:
        if "resnet8/seed0" in r.id:
            fit(r.spec, suite.run_dir(r.id), "cpu", progress=False)
    distill = [r.id for r in suite.runs.values() if r.kind == "distill" and "/kd/" in r.id]
    assert len(distill) == 2
    assert main(["--suite", str(suite_file), "--fuse", *sum((["--run", r] for r in distill), [])]) == 0
    for r in distill:
        assert json.loads((Path(suite.run_dir(r)) / "metrics.json").read_text())["status"] == "ok"
    with pytest.raises(SystemExit, match="not in suite"):
        main(["--suite", str(suite_file), "--run", "nope"])


def test_fused_packed_runs_equal_runs_one_by_one(tiny, tmp_path):
    """Students of one architecture fused into one model (grouped convolutions, one BN over K·C
    channels): two KD runs of different lengths (when one leaves, the rest are fused anew), a
    plain student with no teacher, and an AB run whose initialisation stage runs beside the
    others' main stage. Each run equals its run alone up to float32 rounding, which the tiny
    batches amplify through the training steps by an amount no rounding bound gives: so each run
    is bounded by itself alone at 2 CPU threads, the same maths rounded otherwise (``drift``:
    measured 7e-7 to 5e-3 of the weights' norm, AB the most; packed vs alone 3e-8 to 9e-6)."""
    long = Recipe.from_config({"epochs": 3, "batch_size": 16})
    specs = [spec(tiny, "kd", 0), spec(tiny, "kd", 1, recipe=long), spec(tiny, "student", 3),
             spec(tiny, "ab", 0, params={"ab": {"init_epochs": 1}})]
    alone = [fit(s, tmp_path / f"alone{k}", "cpu", progress=False) for k, s in enumerate(specs)]
    with threads(2):
        alone2 = [fit(s, tmp_path / f"alone2_{k}", "cpu", progress=False) for k, s in enumerate(specs)]
    packed = fit_packed(specs, [tmp_path / f"pack{k}" for k in range(len(specs))], "cpu", fuse=True)
    assert [len(m["curve"]) for m in packed] == [2, 3, 2, 2] and len(packed[3]["init_curve"]) == 1
    for k, (a, a2, b) in enumerate(zip(alone, alone2, packed)):
        assert_within_drift(strip(b), strip(a), strip(a2))
        m_a, m_a2, m_b = (torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"]
                          for d in (f"alone{k}", f"alone2_{k}", f"pack{k}"))
        drift = relative_difference(m_a2, m_a)
        assert_states_close(m_b, m_a, rtol=FLOAT32_PASS_RTOL + 4 * drift)
        for name in m_a:
            assert m_b[name].untyped_storage().nbytes() == m_a[name].untyped_storage().nbytes()  # not the fused storage
        ck = torch.load(tmp_path / f"pack{k}" / "checkpoint.pt", weights_only=False)["student"]
        assert sum(t.untyped_storage().nbytes() for t in ck.values()) == sum(t.untyped_storage().nbytes() for t in m_a.values())


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_within_drift(got, want, want_other_threads, rel: float = 1e-4):
    """Every number of ``got`` (a metrics dict; curves included) within 4× the drift of ``want`` to
    the same run at another thread count, plus ``rel`` of it (the one-run float32 spread)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            assert_within_drift(got[k], want[k], want_other_threads[k], rel)
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w, w2 in zip(got, want, want_other_threads):
            assert_within_drift(g, w, w2, rel)
    elif isinstance(want, float):
        assert abs(got - want) <= 4 * abs(want_other_threads - want) + rel * abs(want) + 1e-9, (got, want, want_other_threads)
    else:
        assert got == want


#: 3 steps of the float64 students (observed bit for bit on CPU, where float64 grouped and plain
#: convolutions run the same per-group products; elsewhere 3 steps × ~10 layers × unit roundoff
#: 1.1e-16, with a wide margin) and of the float32 terms they feed (which may then round by an ulp,
#: 1.2e-7, a few times over: 1e-5); integer tensors exactly
STEP_TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-7}}


@pytest.mark.parametrize("method,overrides", [("crd", {"params": {"crd": {"nce_k": 16}}}), ("fitnet", {}), ("dkd", {}),
                                              ("ab", {}), ("student", {})])
def test_fused_steps_equal_separate_steps(method, overrides):
    """Three steps of two runs fused (their own objectives, optimizers, data) vs each alone: the
    same maths for every kind of term (logits, stage features + adapter, CRD's memory and negatives
    from the run's generator, AB's initialisation loss, CE only). The students and teacher
    run in float64 (STEP_TOL); the terms in float32, as they cast their inputs. With float32
    students the steps amplify a chance ReLU-kink flip (FLOAT32_PASS_RTOL in conftest): FitNet's
    conv1 fell outside rtol 1e-4 under every ATEN_CPU_CAPABILITY on AMD EPYC."""
    from kdbench.engine.fusion import fuse
    from kdbench.engine.step import Member, fused_train_step, step_names, train_step
    from kdbench.engine.optim import SGD
    from kdbench.methods import METHODS, Batch, MethodContext, build_objective
    from kdbench.models import feature_shapes

    torch.manual_seed(0)
    teacher = build_model("resnet8", 5).double().eval()
    labels = torch.randint(0, 5, (64,))
    x, y, idx = torch.randn(2, 16, 3, 32, 32, dtype=torch.float64), labels[:32].view(2, 16), torch.arange(32).view(2, 16)
    with torch.no_grad():
        ts = [teacher(x[k]) if method != "student" else None for k in range(2)]

    def run(seed):
        torch.manual_seed(seed)
        student = build_model("resnet8", 5)
        ctx = MethodContext(feature_shapes(student), feature_shapes(teacher), 5, labels, "resnet8", "resnet8")
        objective = build_objective(METHODS.get(method).with_overrides(overrides), ctx)  # float32: terms cast to it
        student = student.double()
        init = objective.init_terms()[0] if method == "ab" else None  # AB: its initialisation stage
        params = list(init.init_parameters(student)) if init else list(student.parameters()) + list(objective.parameters())
        names = step_names(objective, init)
        return Member(student, objective, SGD(params, 0.05, 0.9, 5e-4), init, names,
                      torch.zeros(len(names) + 1, dtype=torch.float64))

    alone, fused = [run(k) for k in range(2)], [run(k) for k in range(2)]
    model = fuse([f.student for f in fused])
    model.bind([f.student for f in fused])
    gens = [[torch.Generator().manual_seed(k) for k in range(2)] for _ in range(2)]  # each run's, alone and fused
    for _ in range(3):
        for k, a in enumerate(alone):
            train_step(a.student, a.objective, a.optimizer, Batch(x[k], y[k], idx[k], 1, gens[0][k]), ts[k], a.init_term,
                       a.names, a.sums)
        fused_train_step(model, fused, [Batch(x[k], y[k], idx[k], 1, gens[1][k]) for k in range(2)], ts)
    for a, f in zip(alone, fused):
        for module in ("student", "objective"):
            for (name, ta), tb in zip(getattr(a, module).state_dict().items(), getattr(f, module).state_dict().values()):
                torch.testing.assert_close(tb, ta, **STEP_TOL.get(ta.dtype, {}), msg=f"{module}.{name}")
        torch.testing.assert_close(f.sums, a.sums, rtol=1e-5, atol=1e-6)
        assert a.sums[0] > 0


def test_fused_pack_graph_logic_with_a_cpu_stand_in(tiny, tmp_path, monkeypatch):
    """The fused pack's CUDA-graph path (one graph for the K runs' step, re-captured each epoch
    and when a run leaves; warm-up without a trace; CRD's draws from each run's generator; the
    eager last partial batch) on CPU with a stand-in for the CUDA primitives: the same results as
    the eager fused pack."""
    from kdbench.engine.fast import Runtime
    from conftest import FakeGraphs
    long = Recipe.from_config({"epochs": 3, "batch_size": 16})

    def specs(**execution):
        ex = Execution(**execution)
        return [RunSpec("cifar100", str(tiny / "data"), "resnet8", m, s, "resnet8", (str(tiny / "t.pt"),), recipe=r,
                        method_overrides=o, execution=ex)
                for m, s, r, o in (("kd", 0, RECIPE, {}), ("crd", 1, long, {"params": {"crd": {"nce_k": 16}}}),
                                   ("dkd", 2, long, {}))]
    eager = fit_packed(specs(), [tmp_path / f"e{k}" for k in range(3)], "cpu", fuse=True)
    monkeypatch.setattr(Runtime, "graph_backend", FakeGraphs)
    FakeGraphs.calls.update(capture=0, replay=0)
    graph = fit_packed(specs(compile="graph"), [tmp_path / f"g{k}" for k in range(3)], "cpu", fuse=True)
    assert FakeGraphs.calls["replay"] > 0 and FakeGraphs.calls["capture"] >= 3  # the step: one per epoch
    for a, b in zip(eager, graph):
        assert b["spec"].pop("execution")["compile"] == "graph" and a["spec"].pop("execution")["compile"] == "none"
        assert b["used"].pop("execution")["compile"] == "graph" and a["used"].pop("execution")["compile"] == "none"
        assert_same(strip(a), strip(b), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a GPU matter")
@pytest.mark.parametrize("compile_mode", ["none", "graph"])
def test_fused_pack_steps_do_not_synchronise_on_gpu(compile_mode):
    """torch.cuda's sync debug mode raises on any host synchronisation during fused steps 2..5 of
    three packed runs driven as ``kdbench pack`` drives them (Lockstep: one teacher pass, one fused
    step, each run's RNG slot); step 1 fuses the students and, in graph mode, captures the step:
    those may synchronise."""
    import argparse

    from kdbench.commands import bench
    from kdbench.engine.pack import Lockstep
    setup = bench.Setup(argparse.Namespace(images=64 * 8, pair=("resnet8", "resnet8"), batch=64), torch.device("cuda"))
    runs = setup.runs(["kd", "crd", "kd"], Execution(compile=compile_mode))
    lockstep = Lockstep(runs, fuse_keys=["resnet8"] * 3)
    bench.take_rounds(lockstep, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bench.take_rounds(lockstep, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [r.steps_done for r in runs] == [5, 5, 5] and lockstep.fusers  # fused, 5 of the epoch's 9 steps


def test_fused_pack_under_bf16_autocast_and_channels_last(tiny, tmp_path):
    """The GPU configuration's precision and layout on the fused path (bf16 autocast for the fused
    forward, fp32 losses, NHWC grouped convolutions): the same first-epoch loss as the unfused
    pack within bf16 rounding."""
    ex = Execution(precision="bf16", channels_last=True)
    specs = [RunSpec("cifar100", str(tiny / "data"), "resnet8", m, s, "resnet8", (str(tiny / "t.pt"),), recipe=RECIPE,
                     execution=ex) for m, s in (("kd", 0), ("dkd", 1))]
    plain = fit_packed(specs, [tmp_path / f"p{k}" for k in range(2)], "cpu")
    fused = fit_packed(specs, [tmp_path / f"f{k}" for k in range(2)], "cpu", fuse=True)
    for a, b in zip(plain, fused):
        assert b["status"] == "ok" and b["spec"]["execution"]["precision"] == "bf16"
        assert b["curve"][0]["loss"] == pytest.approx(a["curve"][0]["loss"], rel=2e-2)
