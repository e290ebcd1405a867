"""kdbench import-teacher: fake checkpoints in the published formats, built from fresh models
(RepDistiller's ckpt_epoch_240.pth dict, torchvision's bare state dict), imported and checked."""

import hashlib
from collections import OrderedDict

import pytest
import torch

from kdbench.data.cifar import CIFAR100_MEAN, CIFAR100_STD, read_cifar
from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.engine.checkpoint import CheckpointError, load_model, read_file
from kdbench.engine.import_teacher import import_teacher, main
from kdbench.models import build_model


def repdistiller_ckpt(path, model, **extra):
    """What RepDistiller's train_teacher.py saves (mdistiller re-hosts the same files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(70.1),
             "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "momentum": 0.9}]}, **extra}
    torch.save(state, path)
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
    with pytest.raises(CheckpointError, match="cannot tell the architecture.*--arch"):
        import_teacher(repdistiller_ckpt(tmp_path / "models/c.pth", build_model("resnet8", 10)), tmp_path / "x.pt")
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
