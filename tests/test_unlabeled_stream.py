"""The unlabelled training stream (``RunSpec.unlabeled``): FKD's STL-10 cross-dataset protocol."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.data import ImageSet, load_dataset, load_stream
from kdbench.data.stl10 import write_stl10
from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.core import distributed
from kdbench.engine import fit as train
from kdbench.engine.checkpoint import load_model, save_model
from kdbench.engine.fast import Runtime
from kdbench.engine.step import Eager
from kdbench.engine.rules import check_packable
from kdbench.core.seeding import derive_seed, generator
from kdbench.core.spec import Execution, Recipe, RunSpec
from kdbench.engine.rules import check_run as check_unlabeled
from kdbench.engine.fit import fit
from kdbench.methods.base import label_free_methods
from kdbench.models import build_model

from conftest import FakeGraphs

N_TRAIN, N_UNL, UB = 40, 30, 24  # labelled images, unlabelled images, unlabelled batch
RECIPE = Recipe.from_config({"epochs": 2, "batch_size": 16})  # 3 steps/epoch: 72 unlabelled draws wrap around 30


@pytest.fixture(scope="module")
def stl(tmp_path_factory):
    """Synthetic 5-class STL-10 (40 train, 20 test) whose unlabelled split is 30 other images,
    and a random resnet8 'CIFAR-100' teacher with 7 classes (``stl/t.pt``)."""
    root = tmp_path_factory.mktemp("stl")
    ensure_synthetic("stl10", str(root / "data"), {"classes": 5, "train_per_class": 8, "test_per_class": 4})
    rng = np.random.default_rng(0)
    classes = [f"class{i}" for i in range(5)]
    write_stl10(root / "data", {"unlabeled": ImageSet(rng.integers(0, 256, (N_UNL, 96, 96, 3), dtype=np.uint8),
                                                      np.full(N_UNL, -1), classes)}, classes)
    torch.manual_seed(0)
    save_model(root / "t.pt", build_model("resnet8", 7), "resnet8", 7, "cifar100")
    return root


def spec(stl, method="fkd", recipe=RECIPE, unlabeled=None, **execution):
    return RunSpec("stl10", str(stl / "data"), "resnet8", method, 0, "resnet8",
                   (str(stl / "t.pt"),) if method != "student" else (), ("cifar100/t",), recipe=recipe,
                   teacher_dataset="cifar100", execution=Execution(**execution),
                   unlabeled={"batch_size": UB} if unlabeled is None else unlabeled)


def test_runs_without_the_field_hash_as_before():
    """Hashes computed before ``unlabeled`` existed (pinned): existing run ids do not change."""
    cross = RunSpec("stl10", "data/stl10", "vgg8", "fkd", 3, "vgg13", ("t.pt",), ("cifar100/scratch/vgg13/seed0-abcdef12",),
                    {"terms": {"fkd": 50.0}}, Recipe.from_config({"epochs": 2, "batch_size": 16}), teacher_dataset="cifar100")
    assert cross.config_hash() == "4a749829"
    assert RunSpec("cifar100", "d", "resnet8").config_hash() == "3d919c89"
    assert RunSpec("cifar100", "d", "resnet8", execution=Execution(precision="bf16")).config_hash() == "58ae380e"
    old = cross.to_dict()
    old.pop("unlabeled")  # a metrics.json spec written before the field existed
    assert RunSpec.from_dict(old).config_hash() == "4a749829"
    with_it = dataclasses.replace(cross, unlabeled={"batch_size": 512})
    assert with_it.config_hash() != "4a749829"
    assert with_it.unlabeled == {"split": "unlabeled", "batch_size": 512, "terms_on": "unlabeled", "bn": "joint"}
    assert dataclasses.replace(cross, unlabeled={}).config_hash() == with_it.config_hash()  # defaults filled in
    assert RunSpec.from_dict(with_it.to_dict()) == with_it
    assert dataclasses.replace(cross, unlabeled={"bn": "separate"}).config_hash() != with_it.config_hash()


@pytest.mark.parametrize("cfg, match", [
    ({"splt": "unlabeled"}, r"unknown unlabeled keys \['splt'\]; valid: split, batch_size, terms_on, bn"),
    ({"terms_on": "labeled"}, "valid: unlabeled, all"),
    ({"bn": "sync"}, "valid: joint, separate"),
    ({"batch_size": 0}, "integer ≥ 2"),
    ({"batch_size": "512"}, "integer ≥ 2"),
    ({"split": ""}, "split name"),
    ("unlabeled", "expected a mapping"),
])
def test_bad_config_names_the_valid_choices(cfg, match):
    with pytest.raises(ValueError, match=match):
        RunSpec("stl10", "d", "resnet8", "fkd", unlabeled=cfg)


def test_bad_split_and_unusable_methods_are_refused(stl, monkeypatch):
    with pytest.raises(ValueError, match="no split 'extra' to stream; valid: train, test, unlabeled"):
        check_unlabeled(spec(stl, unlabeled={"split": "extra"}))
    with pytest.raises(ValueError, match="valid: train, test$"):
        check_unlabeled(dataclasses.replace(spec(stl), dataset="cifar100"))
    with pytest.raises(ValueError, match="streamed from files"):
        check_unlabeled(dataclasses.replace(spec(stl), dataset="imagenet"))
    free = label_free_methods()  # from the registry: terms without labels, indices or init stages
    assert {"fkd", "fkd_no_fr", "rkd", "sp", "pkt", "cc", "kd"} <= set(free)
    assert not {"crd", "crd_kd", "ipot_crd", "dkd", "kda_before", "kda_after", "ab", "ft", "fsp", "student"} & set(free)
    for method, why in (("crd", "reads labels or training-set indices"), ("kda_before", "reads labels"),
                        ("dkd", "reads labels"), ("ab", "initialisation stage"), ("ft_kd", "initialisation stage"),
                        ("student", "no distillation term")):
        with pytest.raises(ValueError, match=why) as e:
            fit(spec(stl, method), stl / "refused", "cpu", progress=False)  # refused before any data is read
        assert f"Methods that can: {', '.join(free)}" in str(e.value)
    assert not (stl / "refused").exists() or not any((stl / "refused").iterdir())
    with pytest.raises(ValueError, match="cannot be packed"):
        check_packable([spec(stl), spec(stl)])
    with pytest.raises(ValueError, match="teacher_cache 'bf16' does not apply"):
        check_unlabeled(spec(stl, teacher_cache="bf16"))
    monkeypatch.setattr(train.distributed, "init", lambda dev: distributed.DistContext(0, 2, 0, dev))
    with pytest.raises(ValueError, match="not supported under DDP"):
        fit(spec(stl), stl / "ddp", "cpu", progress=False)


def test_stream_draws_full_augmented_batches_of_the_unlabelled_split(stl):
    loader = load_stream("stl10", str(stl / "data"), "unlabeled", UB, "cpu")
    assert loader.num_samples == N_UNL and loader.num_samples != len(load_dataset("stl10", str(stl / "data")).train.labels)
    draw = lambda seed: list(loader.stream(3, generator(torch.device("cpu"), seed)))  # noqa: E731
    a, b, c = draw(1), draw(1), draw(2)
    assert len(a) == 3
    for x, y, idx in a:
        assert x.shape == (UB, 3, 32, 32) and (y == -1).all() and idx.max() < N_UNL
    seen = torch.cat([idx for _, _, idx in a])
    assert torch.equal(seen[:N_UNL].sort().values, torch.arange(N_UNL))  # a permutation, then wrap-around
    assert all(torch.equal(p, q) for ra, rb in zip(a, b) for p, q in zip(ra, rb))
    assert not torch.equal(a[0][2], c[0][2])


def reference_step(stl, terms_on, bn):
    """One step written out: the student on [labelled; unlabelled] (one forward, or one per part),
    CE on the labelled part, FKD's correlation-kernel loss and feature regulariser on the part the
    terms read, with the teacher's pooled features of those images only; torch.optim.SGD."""
    dev = torch.device("cpu")
    data = load_dataset("stl10", str(stl / "data"))
    train_loader, _ = data.loaders(64, 64, dev)  # one labelled batch of all 40
    x, y, _ = next(train_loader.batches(generator(dev, derive_seed(0, "data", "main", 1))))
    unl = load_stream("stl10", str(stl / "data"), "unlabeled", UB, dev)
    xu, yu, _ = next(unl.stream(1, generator(dev, derive_seed(0, "unlabeled", "main", 1))))
    assert (yu == -1).all() and xu.shape[0] == UB
    torch.manual_seed(derive_seed(0, "init"))
    student = build_model("resnet8", 5)
    teacher = load_model(stl / "t.pt", "resnet8", 7).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=False)
    xs = torch.cat([x, xu])
    if bn == "joint":
        out = student(xs)
        logits, pooled = out.logits, out.pooled
    else:
        a, b = student(x), student(xu)
        logits, pooled = torch.cat([a.logits, b.logits]), torch.cat([a.pooled, b.pooled])
    part = slice(len(y), None) if terms_on == "unlabeled" else slice(None)
    with torch.no_grad():
        f_t = teacher(xs[part]).pooled
    h = F.normalize(pooled[part], dim=1)
    g = F.normalize(f_t, dim=1)
    off = ~torch.eye(h.shape[0], dtype=torch.bool)
    fkd = ((h @ h.t() - g @ g.t())[off] ** 2).mean()
    fr = (pooled[part] ** 2).sum(1).mean()
    ce = F.cross_entropy(logits[:len(y)], y)
    loss = ce + 100.0 * fkd + 5e-4 * fr
    opt.zero_grad()
    loss.backward()
    opt.step()
    return student, {"loss": loss.item(), "ce": ce.item(), "fkd": 100.0 * fkd.item(), "feature_reg": 5e-4 * fr.item()}


@pytest.mark.parametrize("terms_on, bn", [("unlabeled", "joint"), ("all", "separate")])
def test_one_step_equals_a_hand_written_step(stl, tmp_path, terms_on, bn):
    one_step = Recipe.from_config({"epochs": 1, "batch_size": 64})  # 40 labelled images: one step
    m = fit(spec(stl, recipe=one_step, unlabeled={"batch_size": UB, "terms_on": terms_on, "bn": bn}), tmp_path, "cpu",
            progress=False)
    ref, losses = reference_step(stl, terms_on, bn)
    for k, v in losses.items():
        assert m["curve"][0][k] == pytest.approx(v, rel=1e-5), k
    got = load_model(tmp_path / "model.pt", "resnet8", 5).state_dict()
    for k, v in ref.state_dict().items():  # parameters and BN statistics after the step
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_trains_end_to_end_deterministically_and_resumes_exactly(stl, tmp_path, monkeypatch):
    sizes = []
    answer = Eager.teacher_features  # the teacher pass of every execution (Runtime's calls it too)
    monkeypatch.setattr(Eager, "teacher_features",
                        lambda self, t, reqs: sizes.append(reqs[0].x.shape[0]) or answer(self, t, reqs))
    with pytest.warns(UserWarning, match="teacher_cache skipped"):
        straight = fit(spec(stl, teacher_cache="fp32"), tmp_path / "a", "cpu", run_id="r", progress=False)
    assert sizes == [UB] * 6  # the teacher sees the unlabelled images only
    on_disk = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert on_disk["status"] == "ok" and len(on_disk["curve"]) == 2 and (tmp_path / "a" / "model.pt").exists()
    assert on_disk["spec"]["unlabeled"] == {"split": "unlabeled", "batch_size": UB, "terms_on": "unlabeled", "bn": "joint"}
    assert on_disk["unlabeled_samples"] == N_UNL
    assert {"fkd", "feature_reg", "ce", "train_acc", "test_acc"} <= set(on_disk["curve"][0])
    again = fit(spec(stl), tmp_path / "b", "cpu", run_id="r", progress=False)
    assert again["curve"] == straight["curve"]
    stopped = fit(spec(stl), tmp_path / "c", "cpu", run_id="r", progress=False, stop_after_epochs=1)
    assert stopped["status"] == "stopped" and not (tmp_path / "c" / "metrics.json").exists()
    resumed = fit(spec(stl), tmp_path / "c", "cpu", run_id="r", progress=False)
    assert resumed["curve"] == straight["curve"] and resumed["acc_last"] == straight["acc_last"]
    sizes.clear()
    alone = fit(dataclasses.replace(spec(stl), unlabeled=None), tmp_path / "d", "cpu", progress=False)
    assert sizes == [16, 16, 8] * 2 and alone["curve"][0]["loss"] != straight["curve"][0]["loss"]
    sizes.clear()
    fit(spec(stl, unlabeled={"batch_size": UB, "terms_on": "all"}), tmp_path / "e", "cpu", progress=False)
    assert sizes == [16 + UB, 16 + UB, 8 + UB] * 2


def test_graph_path_with_a_cpu_stand_in_equals_eager(stl, tmp_path, monkeypatch):
    monkeypatch.setattr(Runtime, "graph_backend", FakeGraphs)
    FakeGraphs.calls.update(capture=0, replay=0)
    eager = fit(spec(stl), tmp_path / "a", "cpu", progress=False)
    graph = fit(spec(stl, compile="graph"), tmp_path / "b", "cpu", progress=False)
    assert FakeGraphs.calls["replay"] > 0
    for a, b in zip(eager["curve"], graph["curve"]):
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=1e-6), k


def test_non_finite_loss_still_marks_the_run_failed(stl, tmp_path):
    m = fit(spec(stl, recipe=Recipe.from_config({"epochs": 2, "batch_size": 16, "lr": 1e12})), tmp_path, "cpu",
            progress=False)
    assert m["status"] == "failed" and "non-finite" in m["failure"] and not (tmp_path / "model.pt").exists()
