"""DDP: two CPU processes (gloo, started by torchrun through kdbench's launcher) train exactly
what the documented single-process semantics computes (kdbench/core/distributed.py):

    each global batch is split into the two rank slices; each slice goes through the model
    separately in train mode; the slice losses' gradients are averaged; one SGD step; BN running
    statistics are slice 0's; the epoch's metrics are sums over both slices.

The expected values are computed here in one process with the same components and no
distributed code. Also: the rank shards of both loaders are exactly the single-process batches.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from kdbench.data import load_dataset
from kdbench.data.imagenet import write_imagenet
from kdbench.data.cifar import ImageSet
from kdbench.data.sharded import ShardedTensorLoader
from kdbench.data.stream import StreamingLoader
from kdbench.engine.checkpoint import read_file
from kdbench.engine.teachers import load_teacher
from kdbench.engine.optim import SGD
from kdbench.core.seeding import derive_seed, generator
from kdbench.engine.step import evaluate
from kdbench.methods import METHODS, Batch, MethodContext, build_objective
from kdbench.models import build_model, feature_shapes
from kdbench.planning.suite import load_suite

WORLD = 2


def emulate(spec, world: int = WORLD):
    """The single-process semantics of a ``world``-rank DDP run (see the module docstring)."""
    data = load_dataset(spec.dataset, spec.data_root)
    train, test = data.loaders(spec.recipe.batch_size, spec.recipe.test_batch_size, "cpu")
    recipe = spec.recipe
    torch.manual_seed(derive_seed(spec.seed, "init"))
    student = build_model(spec.student, data.num_classes)
    mspec = METHODS.get(spec.method).with_overrides(spec.method_overrides)
    teacher = load_teacher(spec.teacher_ckpts, spec.teacher, data.num_classes, "cpu") if mspec.needs_teacher else None
    ctx = MethodContext(feature_shapes(student, 32), feature_shapes(teacher, 32) if teacher is not None else None,
                        data.num_classes, train.labels, spec.student, spec.teacher)
    objective = build_objective(mspec, ctx)
    opt = SGD(list(student.parameters()) + list(objective.parameters()), lr=recipe.lr, momentum=recipe.momentum,
              weight_decay=recipe.weight_decay)
    curve = []
    for epoch in range(1, recipe.epochs + 1):
        opt.lr = recipe.lr_at(epoch, spec.student)
        gen = generator(torch.device("cpu"), derive_seed(spec.seed, "data", "main", epoch))
        student.train()
        objective.train()
        loss_sum, n = 0.0, 0
        for x, y, idx in train.batches(gen):
            b = len(y)
            if b < world:
                continue
            losses, after_rank0 = [], None
            for r in range(world):
                lo, hi = b * r // world, b * (r + 1) // world
                s = student(x[lo:hi])
                with torch.no_grad():
                    t = teacher(x[lo:hi]) if teacher is not None else None
                loss = sum(objective(s, t, Batch(x[lo:hi], y[lo:hi], idx[lo:hi], epoch, gen)).values())
                if r == 0:
                    after_rank0 = [t.clone() for t in student.buffers()]
                losses.append(loss)
                loss_sum += loss.item() * (hi - lo)
                n += hi - lo
            opt.zero_grad()
            (sum(losses) / world).backward()
            opt.step()
            with torch.no_grad():  # only rank 0's BN statistics survive (DDP broadcasts them)
                for buf, kept in zip(student.buffers(), after_rank0):
                    buf.copy_(kept)
        curve.append({"loss": loss_sum / n, "test_acc": evaluate(student, test)["top1"]})
    return student, curve


@pytest.fixture(scope="module")
def ddp_suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = {"name": "ddp", "device": "cpu", "threads": 1, "runs_dir": str(tmp / "runs"),
           "datasets": {"cifar100": {"root": str(tmp / "data"),
                                     "synthetic": {"classes": 4, "train_per_class": 9, "test_per_class": 5, "seed": 0}}},
           "recipe": {"epochs": 2, "batch_size": 8, "test_batch_size": 7},
           "experiments": [{"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]],
                            "methods": ["student", "fitnet"], "seeds": [0]}]}
    path = tmp / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from kdbench.data.synthetic_files import ensure_synthetic
    ensure_synthetic("cifar100", str(tmp / "data"), cfg["datasets"]["cifar100"]["synthetic"])
    return load_suite(path)


def run_ddp(suite, run_id, command, subprocess_env):
    cmd = [sys.executable, "-m", "kdbench.planning.launch", "--gpus", "0", "--nproc", str(WORLD), "--",
           command, "--suite", str(suite.path), "--run", run_id, "--quiet"]
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["status"] == "ok"  # rank 0 alone prints the summary
    out = suite.run_dir(run_id)
    return json.load(open(f"{out}/metrics.json")), read_file(f"{out}/model.pt", "kdbench-model/1")["state_dict"]


def check_equal(metrics, state, student, curve):
    assert metrics["status"] == "ok"
    for k, v in student.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=2e-5, msg=f"parameter {k}")
    for got, want in zip(metrics["curve"], curve, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["test_acc"] == pytest.approx(want["test_acc"], abs=1e-9)


def test_ddp_two_processes_equal_single_process_semantics(ddp_suite, subprocess_env):
    teacher_id = next(r for r, run in ddp_suite.runs.items() if run.kind == "train")
    distill_id = next(r for r, run in ddp_suite.runs.items() if run.spec.method == "fitnet")

    metrics, state = run_ddp(ddp_suite, teacher_id, "train-teacher", subprocess_env)
    student, curve = emulate(ddp_suite.runs[teacher_id].spec)
    check_equal(metrics, state, student, curve)
    # the comparison is sensitive: one process with the whole batch (BN over 8, not 2×4) differs
    single, _ = emulate(ddp_suite.runs[teacher_id].spec, world=1)
    assert max((state[k].float() - v.float()).abs().max().item() for k, v in single.state_dict().items()) > 1e-4

    # a distillation method with its own parameters (FitNet's regressor: averaged by hand)
    metrics, state = run_ddp(ddp_suite, distill_id, "distill", subprocess_env)
    student, curve = emulate(ddp_suite.runs[distill_id].spec)
    check_equal(metrics, state, student, curve)


def _collect(loader, gen_seed):
    g = torch.Generator().manual_seed(gen_seed) if gen_seed is not None else None
    return list(loader.batches(g))


def test_tensor_loader_shards_are_the_single_process_batches():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (21, 32, 32, 3), dtype=np.uint8), rng.integers(0, 5, 21)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    from kdbench.data.loader import TensorLoader
    whole = _collect(TensorLoader(images, labels, mean, std, 8, True), 3)
    ranks = [_collect(ShardedTensorLoader(images, labels, mean, std, 8, True, rank=r, world_size=WORLD), 3)
             for r in range(WORLD)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole) == 3  # 8, 8, 5: every rank steps 3 times
    for (x, y, i), parts in zip(whole, zip(*ranks)):
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([p[2] for p in parts]), i) and torch.equal(torch.cat([p[1] for p in parts]), y)
    # world size 1 is the reference loader itself; test shards cover the test set once
    one = _collect(ShardedTensorLoader(images, labels, mean, std, 8, True), 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, whole))
    tests = [_collect(ShardedTensorLoader(images, labels, mean, std, 4, False, rank=r, world_size=WORLD), None)
             for r in range(WORLD)]
    assert torch.equal(torch.cat([b[2] for t in tests for b in t]), torch.arange(21))


def test_streaming_loader_shards_are_the_single_process_batches(tmp_path):
    rng = np.random.default_rng(1)
    tr = ImageSet(rng.integers(0, 256, (10, 40, 48, 3), dtype=np.uint8), np.arange(10) % 3, ["a", "b", "c"])
    te = ImageSet(rng.integers(0, 256, (5, 40, 48, 3), dtype=np.uint8), np.arange(5) % 3, ["a", "b", "c"])
    write_imagenet(tmp_path, tr, te)
    ds = load_dataset("imagenet", str(tmp_path))
    kw = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop=24, resize=28, workers=0)
    whole = _collect(StreamingLoader(ds.train, batch_size=4, train=True, **kw), 7)
    ranks = [_collect(StreamingLoader(ds.train, batch_size=4, train=True, rank=r, world_size=WORLD, **kw), 7)
             for r in range(WORLD)]
    assert [len(b[1]) for b in whole] == [4, 4, 2] and len(ranks[0]) == len(ranks[1]) == 3
    for (x, y, i), parts in zip(whole, zip(*ranks)):
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([p[2] for p in parts]), i)
    # the augmentation is a function of (epoch seed, image), not of the worker processes
    with_workers = _collect(StreamingLoader(ds.train, batch_size=4, train=True, **{**kw, "workers": 2}), 7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(with_workers, whole))
    assert not torch.equal(_collect(StreamingLoader(ds.train, batch_size=4, train=True, **kw), 8)[0][0], whole[0][0])


def _state_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: CRD's memory update and KDA's centroids from this rank's slice of a global batch."""
    import os
    from kdbench.core import distributed
    from kdbench.methods import LOSSES
    from kdbench.core.features import Features, FeatureShapes

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    crd, kda, (f_s, f_t, y, idx) = _state_terms(LOSSES, Features, FeatureShapes)
    lo, hi = 9 * rank // world, 9 * (rank + 1) // world  # slices of 4 and 5 samples
    part = lambda f: Features([], [], f[lo:hi], f[lo:hi, :5])  # noqa: E731
    gen = torch.Generator().manual_seed(0)  # every rank holds the epoch's generator, as in the engine
    loss = crd(part(f_s), part(f_t), Batch(f_s[lo:hi], y[lo:hi], idx[lo:hi], 1, gen))
    kda(part(f_s), part(f_t), Batch(f_s[lo:hi], y[lo:hi], idx[lo:hi], 1))
    kda.on_epoch_end(1)
    torch.save({"crd": crd.state_dict(), "kda": kda.state_dict(), "loss": loss.detach(), "n": hi - lo},
               f"{out}/rank{rank}.pt")
    distributed.close()


def _state_terms(LOSSES, Features, FeatureShapes):
    """CRD and KDA terms with fixed initial state, and a fixed global batch of 9 features."""
    torch.manual_seed(0)
    shapes = FeatureShapes((), (), torch.Size([6]), torch.Size([5]))
    labels = torch.arange(40) % 5
    ctx = MethodContext(shapes, shapes, 5, labels)
    crd, kda = LOSSES.get("crd")(ctx, feat_dim=4, nce_k=8), LOSSES.get("kda")(ctx, warmup_epochs=0)
    f_s, f_t = torch.randn(9, 6), torch.randn(9, 6)
    idx = torch.randperm(40)[:9]
    return crd.train(), kda.train(), (f_s, f_t, labels[idx], idx)


def test_crd_and_kda_under_ddp_equal_one_process(tmp_path):
    """Under DDP (two gloo processes, slices of 4 and 5 samples of a global batch of 9), CRD
    draws the global batch's negatives as one process does and keeps this rank's, normalises
    with the global batch's mean, and every rank applies the global batch's memory update; KDA
    takes the whole epoch's class means. So the objective's state is identical on both ranks and
    equal to one process seeing the whole batch, and the ranks' CRD losses average to its loss."""
    import socket

    import torch.multiprocessing as mp
    from kdbench.methods import LOSSES
    from kdbench.core.features import Features, FeatureShapes

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_state_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("crd", "kda"):
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), (name, key)
    crd, kda, (f_s, f_t, y, idx) = _state_terms(LOSSES, Features, FeatureShapes)
    initial = crd.memory_s.clone()
    whole_s, whole_t = Features([], [], f_s, f_s[:, :5]), Features([], [], f_t, f_t[:, :5])
    loss = crd(whole_s, whole_t, Batch(f_s, y, idx, 1, torch.Generator().manual_seed(0)))
    kda(whole_s, whole_t, Batch(f_s, y, idx, 1))
    kda.on_epoch_end(1)
    for name, term in (("crd", crd), ("kda", kda)):
        for key, value in term.state_dict().items():
            torch.testing.assert_close(ranks[0][name][key], value, rtol=1e-5, atol=1e-7, msg=f"{name}.{key}")
    per_rank = sum(r["loss"] * r["n"] for r in ranks) / 9
    torch.testing.assert_close(per_rank, loss.detach(), rtol=1e-5, atol=1e-6)
    assert crd.Z_s > 0 and not torch.equal(crd.memory_s, initial)
