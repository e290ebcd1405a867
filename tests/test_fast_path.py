"""The fast path computes what the plain path computes (kdbench/engine/fast.py, optim.py, spec.py).

No timing here: speed is measured by `kdbench bench`. CUDA-graph tests run only where CUDA is
available; torch.compile's test needs KDBENCH_SLOW_TESTS=1 (≈80 s of compilation on 2 cores).
"""

import dataclasses
import os

import pytest
import torch

from kdbench.engine.fast import Runtime
from kdbench.engine.step import TeacherInput, split_features, step_names, train_step
from kdbench.engine.optim import SGD
from kdbench.core.spec import Execution, Recipe, RunSpec
from kdbench.engine.fit import fit
from kdbench.methods import METHODS, Batch, MethodContext, build_objective
from kdbench.models import build_model, feature_shapes

from conftest import FakeGraphs

CUDA = torch.cuda.is_available()


def spec(tiny, method="kd", seed=0, **execution):
    return RunSpec("cifar100", str(tiny / "data"), "resnet8", method, seed, "resnet8", (str(tiny / "t.pt"),),
                   recipe=Recipe.from_config({"epochs": 2, "batch_size": 16}), execution=Execution(**execution))


def curve(metrics):
    return [{k: v for k, v in row.items()} for row in metrics["curve"]]


def assert_curves_close(a, b, rel):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-9), k


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-4), (0.9, 0.0), (0.0, 5e-4), (0.0, 0.0)])
def test_capturable_sgd_matches_plain_sgd_bit_for_bit(momentum, weight_decay):
    """Device-tensor lr + preallocated momentum (the CUDA-graph optimiser) = plain SGD = torch's
    per-parameter loop, with and without momentum and weight decay (linear probes use wd 0)."""
    torch.manual_seed(0)
    models = [build_model("resnet8", 5) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    hyper = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay)
    plain = SGD(models[0].parameters(), **hyper)
    graph = SGD(models[1].parameters(), **hyper).make_capturable()
    ref = torch.optim.SGD(models[2].parameters(), **hyper, foreach=False)
    for step in range(4):
        x = torch.randn(4, 3, 32, 32)
        for model, opt in zip(models, (plain, graph, ref)):
            opt.zero_grad()
            model(x).logits.square().mean().backward()
            if step == 0:  # the stem conv gets no gradient in step 0: left untouched, no momentum yet
                next(model.parameters()).grad = None
            opt.step()
        if step == 1:
            plain.lr = graph.lr = ref.param_groups[0]["lr"] = 0.005
    assert graph.lr_tensor.item() == pytest.approx(0.005) and graph.capturable and not plain.capturable
    for pa, pb, pc in zip(*(m.parameters() for m in models)):
        assert torch.equal(pa, pb) and torch.equal(pa, pc)
    # a plain optimiser's state (None buffers included) loads into a capturable one in place
    fresh = SGD(models[1].parameters(), lr=1.0, momentum=0.9, weight_decay=5e-4).make_capturable()
    before = [b.data_ptr() for b in fresh.buffers]
    fresh.load_state_dict(plain.state_dict())
    assert [b.data_ptr() for b in fresh.buffers] == before
    assert all(torch.equal(a, b) for a, b in zip(fresh.buffers, plain.buffers) if b is not None)
    assert fresh.lr_tensor.item() == pytest.approx(0.005)


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-4), (0.9, 0.0), (0.0, 5e-4)])
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("kernel", ["cpu", "cuda-branch"])
def test_sgd_against_the_per_parameter_loop_on_odd_sizes(monkeypatch, momentum, weight_decay, capturable, kernel):
    """6 steps of random gradients and lr changes on tensors whose sizes leave vector tails (7, 5,
    85 ...). CPU's ``_foreach`` path: bit for bit torch.optim.SGD's loop. The branch CUDA takes
    (``torch._fused_sgd_``: its arguments, the tensor lr, zero-started momentum), run on CPU's
    implementation of that kernel: equal up to an ulp (that kernel rounds vector tails
    differently, which is why CPU does not use it)."""
    if kernel == "cuda-branch":
        monkeypatch.setattr(SGD, "fused_kernel_devices", ("cpu",))
    torch.manual_seed(0)
    shapes = [(7,), (5,), (17, 5), (3, 3, 3, 3), (100,), (1,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = SGD(ours, lr=0.0123, momentum=momentum, weight_decay=weight_decay)
    if capturable:
        opt.make_capturable()
    ref = torch.optim.SGD(twins, lr=0.0123, momentum=momentum, weight_decay=weight_decay, foreach=False)
    for step in range(6):
        for a, b in zip(ours, twins):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        opt.lr = ref.param_groups[0]["lr"] = 0.0123 / (step + 2)
    for a, b, s in zip(ours, twins, start):
        assert not torch.equal(a, s)
        if kernel == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_train_step_is_one_hand_written_kd_step():
    """train_step against the textbook KD step written out with torch.optim.SGD."""
    torch.manual_seed(1)
    student, teacher = build_model("resnet8", 5), build_model("resnet8", 5).eval()
    twin = build_model("resnet8", 5)
    twin.load_state_dict(student.state_dict())
    labels = torch.arange(5).repeat(4)
    ctx = MethodContext(feature_shapes(student), feature_shapes(teacher), 5, labels)
    objective = build_objective(METHODS.get("kd"), ctx)
    x, y = torch.randn(8, 3, 32, 32), labels[:8]
    names = step_names(objective)
    sums = torch.zeros(len(names) + 1, dtype=torch.float64)
    with torch.no_grad():
        t = teacher(x)
    opt = SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train_step(student, objective, opt, Batch(x, y, torch.arange(8)), t, None, names, sums)

    ref_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=False)
    out = twin(x).logits
    T = 4.0
    p_t = torch.softmax(t.logits / T, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(out / T, 1))).sum() / 8 * T * T
    ce = torch.nn.functional.cross_entropy(out, y)
    loss = 0.1 * ce + 0.9 * kl
    ref_opt.zero_grad()
    loss.backward()
    ref_opt.step()
    assert names == ["loss", "kd", "ce"]
    torch.testing.assert_close(sums[:3].float(), 8 * torch.stack([loss, 0.9 * kl, 0.1 * ce]).detach(), rtol=1e-5, atol=1e-6)
    assert sums[3] == (out.argmax(1) == y).sum()
    for a, b in zip(student.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_channels_last_gives_the_plain_metrics(tiny, tmp_path):
    plain = fit(spec(tiny, "kd"), tmp_path / "a", "cpu", progress=False)
    nhwc = fit(spec(tiny, "kd", channels_last=True), tmp_path / "b", "cpu", progress=False)
    assert_curves_close(curve(plain), curve(nhwc), rel=1e-5)
    assert plain["hash"] == nhwc["hash"]


def test_bf16_autocast_is_applied_and_close_to_fp32(tiny, tmp_path):
    runtime = Runtime(Execution(precision="bf16"), "cpu")
    teacher = build_model("resnet8", 5).eval()
    with runtime.autocast():
        s = build_model("resnet8", 5)(torch.randn(2, 3, 32, 32))
    assert s.logits.dtype == torch.bfloat16
    (t,) = runtime.teacher_features(teacher, [TeacherInput(torch.randn(2, 3, 32, 32), torch.arange(2))])
    assert t.logits.dtype == torch.bfloat16
    fp32 = fit(spec(tiny, "kd"), tmp_path / "a", "cpu", progress=False)
    bf16 = fit(spec(tiny, "kd", precision="bf16"), tmp_path / "b", "cpu", progress=False)
    assert fp32["curve"][0]["loss"] != bf16["curve"][0]["loss"]  # it did run in bf16
    assert bf16["curve"][0]["loss"] == pytest.approx(fp32["curve"][0]["loss"], rel=2e-2)
    assert fp32["hash"] != bf16["hash"]


def test_only_result_changing_options_enter_the_hash(tiny):
    base = spec(tiny)
    same = [dict(channels_last=True), dict(compile="graph"), dict(compile="compile"), dict(teacher_cache="fp32"),
            dict(cache_dir="/somewhere")]
    for ex in same:
        assert spec(tiny, **ex).config_hash() == base.config_hash(), ex
    hashes = {spec(tiny, **ex).config_hash() for ex in (dict(precision="bf16"), dict(teacher_cache="bf16"),
                                                         dict(teacher_cache="fp16"))}
    assert len(hashes) == 3 and base.config_hash() not in hashes
    # a spec written before execution options existed still loads, with the same hash
    old = base.to_dict()
    old.pop("execution")
    assert RunSpec.from_dict(old).config_hash() == base.config_hash()
    s = spec(tiny, precision="bf16", channels_last=True)
    assert RunSpec.from_dict(s.to_dict()) == s


def test_bad_execution_options_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid: fp32, bf16"):
        Execution(precision="fp16")
    with pytest.raises(ValueError, match="valid: none, graph, compile"):
        Execution.from_config({"compile": "jit"})
    with pytest.raises(ValueError, match="unknown execution keys"):
        Execution.from_config({"precison": "bf16"})
    if not CUDA:
        with pytest.raises(ValueError, match="needs a CUDA device"):
            Runtime(Execution(compile="graph"), "cpu")


def test_split_features_cuts_every_field():
    torch.manual_seed(0)
    f = build_model("resnet8", 5).eval()(torch.randn(5, 3, 32, 32))
    a, b = split_features(f, [2, 3])
    for whole, parts in ((f.logits, (a.logits, b.logits)), (f.pooled, (a.pooled, b.pooled)),
                         (f.stages[-1], (a.stages[-1], b.stages[-1])), (f.preact[1], (a.preact[1], b.preact[1]))):
        assert torch.equal(torch.cat(parts), whole)
    assert a.logits.shape[0] == 2 and len(b.stages) == len(f.stages)


@pytest.mark.parametrize("method", ["kd", "crd", "dkd", "ab"])
def test_graph_step_logic_with_a_cpu_stand_in(tiny, tmp_path, monkeypatch, method):
    """The CUDA-graph path's own logic — static buffers, the eager last partial batch, warm-up
    without a trace, per-epoch re-capture, generator draws inside the step (CRD), epoch-dependent
    terms (DKD), an init stage with its own optimiser (AB), the device-tensor lr — run on CPU
    with a stand-in for the CUDA primitives: the same metrics as the eager path."""
    monkeypatch.setattr(Runtime, "graph_backend", FakeGraphs)
    FakeGraphs.calls.update(capture=0, replay=0)
    overrides = {"crd": {"params": {"crd": {"nce_k": 16}}}, "ab": {"params": {"ab": {"init_epochs": 1}}}}.get(method, {})
    eager = fit(dataclasses.replace(spec(tiny, method), method_overrides=overrides), tmp_path / "a", "cpu", progress=False)
    graph = fit(dataclasses.replace(spec(tiny, method, compile="graph"), method_overrides=overrides), tmp_path / "b",
                "cpu", progress=False)
    assert FakeGraphs.calls["replay"] > 0 and FakeGraphs.calls["capture"] >= 2
    assert_curves_close(curve(eager), curve(graph), rel=1e-6)
    assert len(graph["init_curve"]) == (1 if method == "ab" else 0)
    for a, b in zip(eager["init_curve"], graph["init_curve"]):
        assert a["stage"] == b["stage"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["kd", "crd", "fitnet"])
def test_cuda_graph_step_matches_eager_on_gpu(tiny, tmp_path, method):
    """Whole-step CUDA graphs vs eager, same fp32 maths: equal up to kernel rounding."""
    overrides = {"params": {"crd": {"nce_k": 16}}} if method == "crd" else {}
    a = fit(dataclasses.replace(spec(tiny, method), method_overrides=overrides), tmp_path / "a", "cuda", progress=False)
    b = fit(dataclasses.replace(spec(tiny, method, compile="graph"), method_overrides=overrides), tmp_path / "b", "cuda",
            progress=False)
    assert_curves_close(curve(a), curve(b), rel=1e-3)


@pytest.mark.skipif(os.environ.get("KDBENCH_SLOW_TESTS") != "1", reason="torch.compile takes minutes; KDBENCH_SLOW_TESTS=1")
def test_torch_compile_matches_eager(tiny, tmp_path):
    a = fit(spec(tiny, "kd"), tmp_path / "a", "cpu", progress=False)
    b = fit(spec(tiny, "kd", compile="compile"), tmp_path / "b", "cpu", progress=False)
    assert_curves_close(curve(a), curve(b), rel=1e-4)


@pytest.mark.skipif(not CUDA, reason="host synchronisation is a GPU matter")
@pytest.mark.parametrize("method", ["kd", "crd"])
@pytest.mark.parametrize("compile_mode", ["none", "graph"])
def test_no_host_sync_inside_training_steps_on_gpu(method, compile_mode):
    """torch.cuda's sync debug mode raises on any host synchronisation during the steps (after
    the epoch's first step: its data order and, in graph mode, the capture may synchronise)."""
    import argparse

    from kdbench.commands import bench
    from kdbench.engine.run import loop
    setup = bench.Setup(argparse.Namespace(images=64 * 8, pair=("resnet8", "resnet8"), batch=64), torch.device("cuda"))
    [run] = setup.runs([method], Execution(compile=compile_mode))
    steps = loop(run)  # driven as kdbench.engine.run.train drives it
    request = next(steps)

    def step():
        nonlocal request
        request = steps.send(run.teacher_outputs(*request))
    step()  # step 1 done
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):  # steps 2..6 of 9
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        steps.close()
    assert run.steps_done == 6
