"""linear_probe (CRD/DKD transfer protocol): the frozen student keeps its weights and BN
statistics, only a new linear layer trains, with weight decay 0. The expected probe is computed
here with plain torch (features in eval mode, hand-written SGD with momentum)."""

import json

import pytest
import torch
from torch import nn

from kdbench.data import load_dataset
from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.engine.checkpoint import read_file, save_model
from kdbench.engine.fit import fit  # a linear_probe spec trains a ProbeRun
from kdbench.commands.cli import probe_main as main
from kdbench.core.seeding import derive_seed, generator
from kdbench.core.spec import Recipe, RunSpec
from kdbench.models import build_model
from kdbench.core.spec import PROBE_RECIPE


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    student = build_model("resnet8", 100)
    with torch.no_grad():  # a "distilled" student with its own BN statistics
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    save_model(tmp_path / "student.pt", student, "resnet8", 100, "cifar100")
    root = tmp_path / "stl10"
    ensure_synthetic("stl10", str(root), {"classes": 4, "train_per_class": 6, "test_per_class": 3, "seed": 1})
    recipe = Recipe.from_config({**PROBE_RECIPE, "epochs": 3, "milestones": [2], "batch_size": 8, "test_batch_size": 5})
    spec = RunSpec("stl10", str(root), "resnet8", "crd", 0, recipe=recipe, protocol="linear_probe",
                   init_ckpt=str(tmp_path / "student.pt"), init_id="cifar100/x/crd/seed0")
    return student, spec, tmp_path


def expected_probe(student, spec):
    """The protocol by hand: eval-mode pooled features, a Linear layer, SGD(momentum, wd) on it only."""
    data = load_dataset(spec.dataset, spec.data_root)
    train, test = data.loaders(spec.recipe.batch_size, spec.recipe.test_batch_size, "cpu")
    r = spec.recipe
    torch.manual_seed(derive_seed(spec.seed, "probe-init"))
    head = nn.Linear(64, data.num_classes)
    student.eval()
    bufs = [None, None]
    accs = []
    for epoch in range(1, r.epochs + 1):
        lr = r.lr * r.lr_decay ** sum(epoch > m for m in r.milestones)
        for x, y, _ in train.batches(generator(torch.device("cpu"), derive_seed(spec.seed, "data", "probe", epoch))):
            with torch.no_grad():
                f = student(x).pooled
            loss = nn.functional.cross_entropy(head(f), y)
            grads = torch.autograd.grad(loss, list(head.parameters()))
            with torch.no_grad():  # torch.optim.SGD's update: b = d at the first step, then m·b + d
                for i, (p, g) in enumerate(zip(head.parameters(), grads)):
                    d = g + r.weight_decay * p
                    bufs[i] = d.clone() if bufs[i] is None else r.momentum * bufs[i] + d
                    p.sub_(lr * bufs[i])
        with torch.no_grad():
            correct = sum((head(student(x).pooled).argmax(1) == y).sum().item() for x, y, _ in test.batches())
        accs.append(100 * correct / test.num_samples)
    return head, accs


def test_probe_trains_only_the_new_layer(setup):
    student, spec, tmp = setup
    before = {k: v.clone() for k, v in student.state_dict().items()}
    m = fit(spec, tmp / "probe", device="cpu", progress=False)
    assert m["status"] == "ok" and spec.recipe.weight_decay == 0.0 == PROBE_RECIPE["weight_decay"]
    saved = read_file(tmp / "probe/model.pt", "kdbench-model/1")
    assert saved["num_classes"] == 4 and saved["state_dict"]["fc.weight"].shape == (4, 64)
    for k, v in before.items():  # every weight and BN statistic of the student is unchanged
        if not k.startswith("fc."):
            assert torch.equal(saved["state_dict"][k], v), k
    head, accs = expected_probe(student, spec)
    torch.testing.assert_close(saved["state_dict"]["fc.weight"], head.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(saved["state_dict"]["fc.bias"], head.bias.detach(), rtol=1e-5, atol=1e-6)
    assert [c["test_acc"] for c in m["curve"]] == pytest.approx(accs)
    assert [c["lr"] for c in m["curve"]] == pytest.approx([0.1, 0.1, 0.01])
    on_disk = json.loads((tmp / "probe/metrics.json").read_text())
    for key in ("status", "acc_last", "acc_best", "epoch_best", "curve", "provenance", "spec", "probe"):
        assert key in on_disk
    assert on_disk["acc_last"] == pytest.approx(accs[-1]) and on_disk["spec"]["protocol"] == "linear_probe"
    assert on_disk["probe"]["feature_dim"] == 64 and on_disk["probe"]["image_size"] == 32


def test_probe_with_weight_decay_would_differ(setup):
    """The comparison above is sensitive to the weight decay the protocol fixes at 0."""
    student, spec, tmp = setup
    fit(spec, tmp / "a", device="cpu", progress=False)
    decayed = RunSpec(**{**spec.__dict__, "recipe": Recipe.from_config({**spec.recipe.__dict__, "weight_decay": 0.5})})
    fit(decayed, tmp / "b", device="cpu", progress=False)
    a = read_file(tmp / "a/model.pt", "kdbench-model/1")["state_dict"]["fc.weight"]
    b = read_file(tmp / "b/model.pt", "kdbench-model/1")["state_dict"]["fc.weight"]
    assert (a - b).abs().max() > 1e-3


def test_probe_resumes_and_cli(setup, capsys):
    student, spec, tmp = setup
    whole = fit(spec, tmp / "whole", device="cpu", progress=False)
    assert fit(spec, tmp / "cut", device="cpu", progress=False, stop_after_epochs=1)["status"] == "stopped"
    resumed = fit(spec, tmp / "cut", device="cpu", progress=False)
    assert [c["test_acc"] for c in resumed["curve"]] == [c["test_acc"] for c in whole["curve"]]
    assert [c["loss"] for c in resumed["curve"]] == pytest.approx([c["loss"] for c in whole["curve"]], rel=1e-12)
    assert main([spec.init_ckpt, "--dataset", "stl10", "--root", spec.data_root, "--out", str(tmp / "cli"),
                 "--epochs", "1", "--device", "cpu", "--quiet"]) == 0
    assert '"status": "ok"' in capsys.readouterr().out
    assert main([spec.init_ckpt, "--dataset", "stl10", "--root", str(tmp / "nowhere"), "--out", str(tmp / "x"),
                 "--epochs", "1", "--device", "cpu", "--quiet"]) == 2
    assert "kdbench fetch stl10" in capsys.readouterr().err
