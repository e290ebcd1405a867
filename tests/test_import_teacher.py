"""kdbench import-teacher: fake checkpoints in the published formats, built from fresh models
(RepDistiller's ckpt_epoch_240.pth dict, torchvision's bare state dict), imported and checked."""

import hashlib
from collections import OrderedDict

import numpy as np
import pytest
import torch

from kdbench.data.cifar import CIFAR100_MEAN, CIFAR100_STD, read_cifar
from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.engine.checkpoint import CheckpointError, load_model, read_file
from kdbench.commands.teachers import import_teacher_main as main
from kdbench.teachers.imported import import_teacher
from kdbench.models import build_model


def decayed_optimizer(model, epoch=240, lr=0.05, decay_epochs=(150, 180, 210)):
    """An SGD optimizer after a step and RepDistiller's adjust_learning_rate at ``epoch``:
    ``lr * 0.1 ** np.sum(epoch > np.asarray(decay_epochs))`` is a numpy.float64 (mdistiller's
    adjust_learning_rate computes it the same way)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    opt.step()
    model.zero_grad()
    steps = np.sum(epoch > np.asarray(decay_epochs))
    if steps > 0:
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 ** steps)
    assert isinstance(opt.param_groups[0]["lr"], np.float64)
    return opt


def repdistiller_ckpt(path, model, **extra):
    """Exactly what RepDistiller's train_teacher.py saves every save_freq epochs (mdistiller
    re-hosts these files): epoch, the state dict, the test accuracy (a tensor: AverageMeter of
    accuracy()'s tensors) and the optimizer's state after the lr decays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opt = decayed_optimizer(model)
    model.eval()
    state = {"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(70.1),
             "optimizer": opt.state_dict(), **extra}
    torch.save(state, path)
    return path


def mdistiller_ckpt(path, model):
    """What mdistiller's trainer saves (engine/trainer.py: save_checkpoint of ``state``): the
    DataParallel-wrapped distiller's state dict (Vanilla: ``module.student.*``), the optimizer
    (numpy.float64 lr after a decay) and best_acc (a tensor)."""
    opt = decayed_optimizer(model)
    model.eval()
    torch.save({"epoch": 240, "model": {f"module.student.{k}": v for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "best_acc": torch.tensor(71.5)}, path)
    return path


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_repdistiller_checkpoint_arch_from_folder(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet8", 100)
    src = repdistiller_ckpt(tmp_path / "save/models/resnet8_vanilla/ckpt_epoch_240.pth", model)
    report = import_teacher(src, tmp_path / "t.pt")
    assert report["arch"] == "resnet8" and report["num_classes"] == 100 and report["format"] == "repdistiller"
    assert report["file_epoch"] == 240 and report["file_accuracy"] == pytest.approx(70.1)
    assert report["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert same_weights(load_model(tmp_path / "t.pt", "resnet8", 100), model)
    meta = read_file(tmp_path / "t.pt", "kdbench-model/1")
    assert meta["dataset"] == "cifar100" and meta["meta"]["imported"]["source"] == str(src)


def test_sequential_classifier_and_dataparallel_prefix_are_mapped(tmp_path):
    torch.manual_seed(1)
    mv2 = build_model("MobileNetV2", 100)
    state = OrderedDict((k.replace("classifier.", "classifier.0.") if k.startswith("classifier.") else k, v)
                        for k, v in mv2.state_dict().items())  # RepDistiller's Sequential(Linear)
    assert "classifier.0.weight" in state
    torch.save({"model": state, "epoch": 240}, tmp_path / "mv2.pth")
    import_teacher(tmp_path / "mv2.pth", tmp_path / "mv2.pt", arch="MobileNetV2")
    assert same_weights(load_model(tmp_path / "mv2.pt"), mv2)
    wrn = build_model("wrn_16_1", 100)
    torch.save({"model": {f"module.{k}": v for k, v in wrn.state_dict().items()}}, tmp_path / "dp.pth")
    import_teacher(tmp_path / "dp.pth", tmp_path / "wrn.pt", arch="wrn_16_1")
    assert same_weights(load_model(tmp_path / "wrn.pt"), wrn)


def test_torchvision_weights_with_hash_in_name(tmp_path):
    torch.manual_seed(2)
    r18 = build_model("imagenet_resnet18", 1000)
    tmp = tmp_path / "r18.pth"
    torch.save(r18.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    good = tmp.rename(tmp_path / f"resnet18-{digest[:8]}.pth")
    report = import_teacher(good, tmp_path / "r18.pt")
    assert (report["arch"], report["format"], report["dataset"], report["num_classes"]) == \
        ("imagenet_resnet18", "torchvision", "imagenet", 1000)
    assert report["published_top1"] == pytest.approx(69.758)
    assert same_weights(load_model(tmp_path / "r18.pt"), r18)
    bad = good.rename(tmp_path / "resnet18-0badbeef.pth")
    with pytest.raises(CheckpointError, match="SHA-256 .* does not start with the 0badbeef"):
        import_teacher(bad, tmp_path / "x.pt")


def test_mismatched_files_are_refused(tmp_path):
    src = repdistiller_ckpt(tmp_path / "resnet8_vanilla/ckpt_epoch_240.pth", build_model("resnet8", 100))
    with pytest.raises(CheckpointError, match="missing keys: .*layer"):
        import_teacher(src, tmp_path / "x.pt", arch="resnet14")
    wide = repdistiller_ckpt(tmp_path / "w/ckpt.pth", build_model("wrn_16_2", 100))
    with pytest.raises(CheckpointError, match="shape mismatches: .*file .* vs model"):
        import_teacher(wide, tmp_path / "x.pt", arch="wrn_16_1")
    with pytest.raises(CheckpointError, match="no classifier weight 'fc.weight'"):
        import_teacher(repdistiller_ckpt(tmp_path / "v/c.pth", build_model("vgg8", 100)), tmp_path / "x.pt", arch="resnet8")
    garbled = {"conv.weight": torch.zeros(3, 3, 3, 3), "fc.weight": torch.zeros(10, 3)}
    torch.save({"model": garbled}, tmp_path / "g.pth")
    with pytest.raises(CheckpointError, match="cannot tell the architecture.*fit no kdbench architecture.*--arch"):
        import_teacher(tmp_path / "g.pth", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_corrupt_files_are_refused(tmp_path):
    model = build_model("resnet8", 100)
    src = repdistiller_ckpt(tmp_path / "resnet8_vanilla/ckpt_epoch_240.pth", model)
    data = src.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read .*download it again"):
        import_teacher(tmp_path / "cut.pth", tmp_path / "x.pt", arch="resnet8")
    torch.save({"net": "resnet8", "lr": 0.05}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="neither a RepDistiller checkpoint"):
        import_teacher(tmp_path / "other.pth", tmp_path / "x.pt", arch="resnet8")
    state = model.state_dict()
    state["fc.weight"] = state["fc.weight"].clone().fill_(float("nan"))
    torch.save({"model": state}, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="non-finite values in fc.weight"):
        import_teacher(tmp_path / "nan.pth", tmp_path / "x.pt", arch="resnet8")
    with pytest.raises(CheckpointError, match="no such file"):
        import_teacher(tmp_path / "missing.pth", tmp_path / "x.pt")


def test_accuracy_check_against_published_value(tmp_path, capsys):
    root = tmp_path / "cifar100"
    ensure_synthetic("cifar100", str(root), {"classes": 100, "train_per_class": 1, "test_per_class": 2, "seed": 0})
    torch.manual_seed(3)
    model = build_model("resnet8", 100).eval()
    for m in model.modules():  # non-trivial BN statistics, so eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    src = repdistiller_ckpt(tmp_path / "resnet8_vanilla/ckpt_epoch_240.pth", model)
    test = read_cifar(root, "cifar100", "test")  # the expected accuracy, computed here
    x = (torch.from_numpy(test.images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(CIFAR100_MEAN)[:, None, None]) \
        / torch.tensor(CIFAR100_STD)[:, None, None]
    with torch.no_grad():
        expected = 100 * float((model(x).logits.argmax(1).numpy() == test.labels).mean())
    out = tmp_path / "t.pt"
    assert main([str(src), str(out), "--check-data", str(root), "--published", f"{expected:.4f}", "--tolerance", "0.01",
                 "--device", "cpu"]) == 0
    assert f"measured top-1 {expected:.2f}%" in capsys.readouterr().out
    assert read_file(out, "kdbench-model/1")["meta"]["imported"]["measured_top1"] == pytest.approx(expected, abs=1e-9)
    out.unlink()
    assert main([str(src), str(out), "--check-data", str(root), "--published", f"{expected + 5:.4f}", "--device", "cpu"]) == 2
    assert "does not reproduce its published accuracy" in capsys.readouterr().err
    assert not out.exists()


def test_repdistiller_checkpoint_with_numpy_lr_imports_and_evaluates_as_the_model(tmp_path):
    torch.manual_seed(4)
    model = build_model("resnet8", 100)
    src = repdistiller_ckpt(tmp_path / "save/models/resnet8_vanilla/ckpt_epoch_240.pth", model)
    with pytest.raises(Exception, match="numpy"):  # what the plain weights-only load refuses
        torch.load(src, weights_only=True)
    report = import_teacher(src, tmp_path / "t.pt")
    assert report["file_epoch"] == 240 and report["file_accuracy"] == pytest.approx(70.1)
    imported = load_model(tmp_path / "t.pt").eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(imported(x).logits, model.eval()(x).logits)
    # a legacy (pre-zip, torch < 1.6: the released files' era) file of the same content
    legacy = tmp_path / "legacy/resnet8_vanilla/ckpt_epoch_240.pth"
    legacy.parent.mkdir(parents=True)
    torch.save(torch.load(src, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    import_teacher(legacy, tmp_path / "l.pt")
    assert same_weights(load_model(tmp_path / "l.pt"), model)


def test_mdistiller_checkpoint_imports(tmp_path):
    torch.manual_seed(5)
    model = build_model("wrn_16_1", 100)
    report = import_teacher(mdistiller_ckpt(tmp_path / "latest", model), tmp_path / "t.pt", arch="wrn_16_1")
    assert report["file_best_acc"] == pytest.approx(71.5) and report["format"] == "repdistiller"
    assert same_weights(load_model(tmp_path / "t.pt"), model)


def test_unsafe_object_is_told_apart_from_truncation(tmp_path):
    import pathlib

    model = build_model("resnet8", 100)
    torch.save({"model": model.state_dict(), "where": pathlib.PurePosixPath("/x")}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError, match=r"holds an object .*\(pathlib.PurePosixPath\).*complete") as e:
        import_teacher(tmp_path / "obj.pth", tmp_path / "x.pt", arch="resnet8")
    assert "truncated" not in str(e.value)
    src = repdistiller_ckpt(tmp_path / "resnet8_vanilla/ckpt_epoch_240.pth", model)
    data = src.read_bytes()
    for cut in (len(data) // 2, len(data) - 8, 0):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt: download it again"):
            import_teacher(tmp_path / "cut.pth", tmp_path / "x.pt", arch="resnet8")


def test_architecture_from_run_folder_or_shapes(tmp_path):
    torch.manual_seed(6)
    wrn = build_model("wrn_40_1", 100)
    run = repdistiller_ckpt(tmp_path / "save/models/wrn_40_1_cifar100_lr_0.05_decay_0.0005_trial_0/ckpt_epoch_240.pth", wrn)
    assert import_teacher(run, tmp_path / "a.pt")["arch"] == "wrn_40_1"
    vgg = build_model("vgg8", 10)
    anywhere = repdistiller_ckpt(tmp_path / "elsewhere/best.pth", vgg)
    report = import_teacher(anywhere, tmp_path / "b.pt")
    assert (report["arch"], report["num_classes"]) == ("vgg8", 10)
    assert same_weights(load_model(tmp_path / "b.pt"), vgg)


def test_check_data_without_published_value_fails_unless_allowed(tmp_path, capsys):
    root = tmp_path / "cifar100"
    ensure_synthetic("cifar100", str(root), {"classes": 100, "train_per_class": 1, "test_per_class": 1, "seed": 0})
    src = repdistiller_ckpt(tmp_path / "resnet8_vanilla/ckpt_epoch_240.pth", build_model("resnet8", 100))
    out = tmp_path / "t.pt"
    assert main([str(src), str(out), "--check-data", str(root), "--device", "cpu"]) == 2
    assert "no published top-1 is known for resnet8 on cifar100" in capsys.readouterr().err and not out.exists()
    assert main([str(src), str(out), "--check-data", str(root), "--device", "cpu", "--no-published-ok"]) == 0
    assert "accuracy check: not run (no published top-1; measured only)" in capsys.readouterr().out
    assert read_file(out, "kdbench-model/1")["meta"]["imported"]["accuracy_check"].startswith("not run")
