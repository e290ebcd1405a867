import json
import signal
import subprocess
import time

import pytest
import torch

from kdbench.engine.checkpoint import CheckpointError, load_model, save_model
from kdbench.engine.teachers import load_teacher
from kdbench.core.spec import Recipe, RunSpec
from kdbench.engine.fit import fit
from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.models import build_model
from kdbench.planning.suite import load_suite

from conftest import kdbench_cmd, write_suite


@pytest.fixture
def data_root(tmp_path):
    ensure_synthetic("cifar100", str(tmp_path / "data"), {"classes": 5, "train_per_class": 20, "test_per_class": 10})
    return str(tmp_path / "data")


def strip_times(metrics):
    return [{k: v for k, v in row.items()} for row in metrics["curve"]]


def test_recipe_scales_milestones_and_small_student_lr():
    r = Recipe.from_config({"epochs": 24})
    assert r.milestones == (15, 18, 21)
    assert r.lr_at(15, "resnet8") == pytest.approx(0.05) and r.lr_at(16, "resnet8") == pytest.approx(0.005)
    assert r.lr_at(22, "resnet8") == pytest.approx(0.05 * 1e-3)
    assert Recipe().base_lr("ShuffleV2") == 0.01 and Recipe().base_lr("MobileNetV2") == 0.01
    with pytest.raises(ValueError, match="valid"):
        Recipe.from_config({"epoch": 3})


def test_metrics_have_provenance_and_both_statistics(tmp_path, data_root):
    spec = RunSpec("cifar100", data_root, "resnet8", seed=3, recipe=Recipe.from_config({"epochs": 2}))
    m = fit(spec, tmp_path / "run", device="cpu", run_id="r", progress=False)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["seed"] == 3 and len(on_disk["curve"]) == 2
    assert on_disk["acc_last"] == on_disk["curve"][-1]["test_acc"]
    assert on_disk["acc_best"] == max(r["test_acc"] for r in on_disk["curve"])
    for key in ("git_sha", "torch", "torchvision", "cuda", "device", "device_name", "python"):
        assert key in on_disk["provenance"]
    assert on_disk["wall_time_s"] > 0 and on_disk["spec"]["recipe"]["epochs"] == 2
    assert m["hash"] == spec.config_hash()
    model = load_model(tmp_path / "run" / "model.pt", "resnet8", 5)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_same_seed_same_result_different_seed_differs(tmp_path, data_root):
    spec = RunSpec("cifar100", data_root, "resnet8", seed=0, recipe=Recipe.from_config({"epochs": 1}))
    a = fit(spec, tmp_path / "a", device="cpu", progress=False)
    b = fit(spec, tmp_path / "b", device="cpu", progress=False)
    c = fit(RunSpec("cifar100", data_root, "resnet8", seed=1, recipe=spec.recipe), tmp_path / "c", device="cpu", progress=False)
    assert a["curve"][0]["loss"] == b["curve"][0]["loss"]
    assert a["curve"][0]["loss"] != c["curve"][0]["loss"]


def test_killed_run_resumes_to_identical_metrics(tmp_path, subprocess_env):
    """SIGKILL a training process mid-run, restart it, compare with an uninterrupted run."""
    suite_file = write_suite(tmp_path / "s.yaml", tmp_path / "data", recipe={"epochs": 6},
                             experiments=[{"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]],
                                           "methods": ["student"], "seeds": [0]}])
    ensure_synthetic("cifar100", str(tmp_path / "data"), {"classes": 5, "train_per_class": 20, "test_per_class": 10, "seed": 0})
    suite = load_suite(suite_file)
    (run_id,) = suite.runs
    run_dir = tmp_path / "runs" / run_id
    cmd = kdbench_cmd("train-teacher", "--suite", str(suite_file), "--run", run_id, "--quiet")
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = run_dir / "checkpoint.pt"
        if ck.exists() and torch.load(ck, weights_only=True)["state"]["epoch"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed"
    subprocess.run(cmd, env=subprocess_env, check=True, capture_output=True)
    resumed = json.loads((run_dir / "metrics.json").read_text())
    straight = fit(suite.runs[run_id].spec, tmp_path / "straight", device="cpu", progress=False)
    assert strip_times(resumed) == strip_times(straight)
    assert resumed["acc_last"] == straight["acc_last"]


def test_non_finite_loss_marks_run_failed(tmp_path, data_root):
    spec = RunSpec("cifar100", data_root, "resnet8", recipe=Recipe.from_config({"epochs": 2, "lr": 1e12}))
    m = fit(spec, tmp_path / "run", device="cpu", progress=False)
    assert m["status"] == "failed" and "non-finite" in m["failure"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "model.pt").exists()


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(bad)
    m = build_model("resnet8", 5)
    save_model(tmp_path / "m.pt", m, "resnet8", 5, "cifar100")
    with pytest.raises(CheckpointError, match="'resnet20' was expected"):
        load_model(tmp_path / "m.pt", "resnet20")
    with pytest.raises(CheckpointError, match="classes"):
        load_model(tmp_path / "m.pt", "resnet8", 10)
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    obj["state_dict"].pop(next(iter(obj["state_dict"])))
    torch.save(obj, tmp_path / "trunc.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model(tmp_path / "trunc.pt")


def test_teacher_is_frozen_and_ensemble_averages_probabilities(tmp_path):
    for i in range(2):
        torch.manual_seed(i)
        save_model(tmp_path / f"t{i}.pt", build_model("resnet8", 5), "resnet8", 5, "cifar100")
    single = load_teacher((str(tmp_path / "t0.pt"),), "resnet8", 5, "cpu")
    assert not single.training and not any(p.requires_grad for p in single.parameters())
    ens = load_teacher((str(tmp_path / "t0.pt"), str(tmp_path / "t1.pt")), "resnet8", 5, "cpu")
    x = torch.randn(3, 3, 32, 32)
    out = ens(x)
    members = [load_model(tmp_path / f"t{i}.pt").eval()(x) for i in range(2)]
    probs = sum(m.logits.softmax(1) for m in members) / 2
    torch.testing.assert_close(out.logits.exp(), probs)
    assert len(out.members) == 2 and out.pooled.shape[1] == 2 * members[0].pooled.shape[1]


def test_distillation_gradients_reach_student_not_teacher(tmp_path, data_root):
    torch.manual_seed(0)
    save_model(tmp_path / "t.pt", build_model("resnet8", 5), "resnet8", 5, "cifar100")
    before = torch.load(tmp_path / "t.pt", weights_only=True)["state_dict"]
    spec = RunSpec("cifar100", data_root, "resnet8", "kd", 0, "resnet8", (str(tmp_path / "t.pt"),),
                   recipe=Recipe.from_config({"epochs": 1}))
    m = fit(spec, tmp_path / "run", device="cpu", progress=False)
    assert m["status"] == "ok" and m["curve"][0]["kd"] > 0
    after = torch.load(tmp_path / "t.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sgd_matches_torch_optim_bit_for_bit():
    from kdbench.engine.optim import SGD
    torch.manual_seed(0)
    a = build_model("resnet8", 5)
    b = build_model("resnet8", 5)
    b.load_state_dict(a.state_dict())
    mine = SGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=False)
    for step in range(4):
        x = torch.randn(4, 3, 32, 32)
        for model, opt in ((a, mine), (b, ref)):
            opt.zero_grad()
            model(x).logits.square().mean().backward()
            opt.step()
        if step == 1:
            mine.lr = ref.param_groups[0]["lr"] = 0.005
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_cosine_schedule_with_warmup_per_step():
    r = Recipe.from_config({"epochs": 10, "lr": 0.1, "schedule": "cosine", "warmup_epochs": 2})
    assert r.lr_at(1, "resnet8", 0.5) == pytest.approx(0.1 * 0.5 / 2)
    assert r.lr_at(3, "resnet8", 0.0) == pytest.approx(0.1)
    assert r.lr_at(7, "resnet8", 0.0) == pytest.approx(0.05)  # halfway through the 8 cosine epochs
    assert r.lr_at(10, "resnet8", 0.999) == pytest.approx(0.0, abs=1e-5)


def test_cross_dataset_distillation_with_a_teacher_of_another_label_space(tmp_path, data_root):
    torch.manual_seed(0)
    save_model(tmp_path / "t.pt", build_model("resnet8", 7), "resnet8", 7, "cifar10")  # 7 classes vs the data's 5
    recipe = Recipe.from_config({"epochs": 1})
    spec = RunSpec("cifar100", data_root, "resnet8", "fkd", 0, "resnet8", (str(tmp_path / "t.pt"),),
                   recipe=recipe, teacher_dataset="cifar10")
    m = fit(spec, tmp_path / "run", device="cpu", progress=False)
    assert m["status"] == "ok" and m["curve"][0]["fkd"] > 0
    kd = RunSpec("cifar100", data_root, "resnet8", "kd", 0, "resnet8", (str(tmp_path / "t.pt"),),
                 recipe=recipe, teacher_dataset="cifar10")
    with pytest.raises(ValueError, match="label spaces differ"):
        fit(kd, tmp_path / "kd", device="cpu", progress=False)


def test_test_every_skips_test_passes_only(tmp_path, data_root):
    """``test_every: 2`` over 3 epochs tests after epochs 2 and 3; the training (losses, weights)
    is that of the run tested after every epoch, acc_last the same, acc_best over the tested epochs;
    test_every 1 keeps the old run id, 2 gets its own."""
    every = RunSpec("cifar100", data_root, "resnet8", seed=0, recipe=Recipe.from_config({"epochs": 3, "milestones": [2]}))
    sparse = RunSpec("cifar100", data_root, "resnet8", seed=0,
                     recipe=Recipe.from_config({"epochs": 3, "milestones": [2], "test_every": 2}))
    a = fit(every, tmp_path / "a", device="cpu", progress=False)
    b = fit(sparse, tmp_path / "b", device="cpu", progress=False)
    assert [r["loss"] for r in a["curve"]] == [r["loss"] for r in b["curve"]]
    assert ["test_acc" in r for r in b["curve"]] == [False, True, True]
    assert [r["test_acc"] for r in b["curve"][1:]] == [r["test_acc"] for r in a["curve"][1:]]
    assert b["acc_last"] == a["acc_last"] and b["epochs_done"] == 3
    assert b["acc_best"] == max(r["test_acc"] for r in a["curve"][1:])
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    old = dict(every.to_dict(), recipe={k: v for k, v in every.to_dict()["recipe"].items() if k != "test_every"})
    assert RunSpec.from_dict(old).config_hash() == every.config_hash() != sparse.config_hash()
    assert Recipe.from_config({"epochs": 30, "test_every": 5}).test_passes() == 6
    with pytest.raises(ValueError, match="test_every"):
        Recipe.from_config({"test_every": 0})
